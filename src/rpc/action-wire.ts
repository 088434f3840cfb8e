import { ActionState } from "../gen/leasehold/v1/action_pb.js";
import type { ActionRecord } from "../work/action.js";
import { isCount, messageFieldSize, stringFieldSize, uintFieldSize, Writer } from "./wire.js";

/** The fields of one item's result: the action as stored, and whether this call created it. */
export interface SubmitResult {
  readonly action: ActionRecord;
  readonly created: boolean;
}

/** Lengths and sizes of one result, from the size pass. */
const PER_RESULT = 8;

/**
 * `SubmitActionsResponse` in ACTION_VIEW_BASIC, in the binary format, written
 * straight from the records: each action's id, request_id, run_id, cluster,
 * state, create_time and created_by (action.proto), exactly the bytes
 * `toBinary` gives for `toBasicProtoAction` (a unit test compares them).
 * protobuf-es took about 2.3 ms to build and encode the answer of 1,000.
 * Undefined when a record falls outside the fast path (a creation time before
 * 1970 or not a time): encode those the ordinary way.
 */
export function encodeBasicSubmitResults(results: readonly SubmitResult[]): Buffer | undefined {
  const sizes: number[] = [];
  let total = 0;
  for (const { action: a, created } of results) {
    const ms = a.createdAt.getTime();
    if (!isCount(ms)) return undefined;
    const seconds = Math.floor(ms / 1000);
    const nanos = (ms - seconds * 1000) * 1_000_000;
    const id = Buffer.byteLength(a.id);
    const requestId = a.requestId ? Buffer.byteLength(a.requestId) : 0;
    const runId = Buffer.byteLength(a.runId);
    const cluster = Buffer.byteLength(a.cluster);
    const createdBy = Buffer.byteLength(a.createdBy);
    const time = uintFieldSize(1, seconds) + uintFieldSize(2, nanos);
    const action =
      stringFieldSize(1, id) +
      stringFieldSize(2, requestId) +
      stringFieldSize(3, runId) +
      stringFieldSize(4, cluster) +
      uintFieldSize(10, ActionState[a.state]) +
      messageFieldSize(21, time) +
      stringFieldSize(25, createdBy);
    const result = messageFieldSize(1, action) + uintFieldSize(2, created ? 1 : 0);
    // PER_RESULT numbers, in this order.
    sizes.push(id, requestId, runId, cluster, createdBy, time, action, result);
    total += messageFieldSize(1, result);
  }
  const w = new Writer(Buffer.allocUnsafe(total), []);
  for (let i = 0; i < results.length; i++) {
    const { action: a, created } = results[i] as SubmitResult;
    const ms = a.createdAt.getTime();
    const seconds = Math.floor(ms / 1000);
    const at = i * PER_RESULT;
    const size = (k: number) => sizes[at + k] as number;
    w.message(1, size(7)).message(1, size(6)); // results[i], its action
    w.string(1, a.id, size(0))
      .string(2, a.requestId ?? "", size(1))
      .string(3, a.runId, size(2))
      .string(4, a.cluster, size(3))
      .uint(10, ActionState[a.state]);
    w.message(21, size(5))
      .uint(1, seconds)
      .uint(2, (ms - seconds * 1000) * 1_000_000);
    w.string(25, a.createdBy, size(4));
    w.uint(2, created ? 1 : 0);
  }
  return w.done();
}
