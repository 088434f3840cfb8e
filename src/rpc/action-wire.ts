import type { Duration, Timestamp } from "@bufbuild/protobuf/wkt";
import {
  type Action,
  ActionState,
  type RetryPolicy,
  type SubmitActionRequest,
  type SubmitActionResponse,
  type SubmitActionsRequest,
  type SubmitActionsResponse,
} from "../gen/leasehold/v1/action_pb.js";
import type { ActionRecord } from "../work/action.js";
import {
  DECLINE,
  fields,
  isCount,
  messageFieldSize,
  Reader,
  stringFieldSize,
  uintFieldSize,
  Writer,
} from "./wire.js";

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

/** Largest value of an int32 field (a negative one takes ten bytes: left to protobuf-es). */
const INT32_MAX = 0x7fffffff;
const UINT32_MAX = 0xffffffff;

/**
 * `SubmitActionsRequest` decoded by hand: the object `fromBinary` gives for
 * the same bytes, or undefined for anything outside what clients send (a
 * field this does not know or that comes twice, a negative or out-of-range
 * number, a Struct that is not plain JSON, bytes cut short); the caller then
 * decodes it the ordinary way, and runs the request validator either way.
 * protobuf-es took 0.4–17 ms for a call of 1,000 actions, most on the first
 * calls of a process, while its reader was not yet compiled.
 */
export function decodeSubmitActionsRequest(bytes: Buffer): SubmitActionsRequest | undefined {
  const r = new Reader(bytes);
  const actions: SubmitActionRequest[] = [];
  let view = 0;
  const ok = fields(
    r,
    bytes.length,
    (n, wireType) => {
      if (n === 1 && wireType === 2) {
        const end = r.delimited(bytes.length);
        const action = end === DECLINE ? undefined : submitActionAt(r, end);
        if (action === undefined) return false;
        actions.push(action);
        return true;
      }
      if (n !== 2 || wireType !== 0) return false;
      view = r.varint(bytes.length);
      return view !== DECLINE && view <= INT32_MAX;
    },
    1 << 1,
  );
  return ok ? { $typeName: "leasehold.v1.SubmitActionsRequest", actions, view } : undefined;
}

function submitActionAt(r: Reader, end: number): SubmitActionRequest | undefined {
  const action: SubmitActionRequest = {
    $typeName: "leasehold.v1.SubmitActionRequest",
    requestId: "",
    cluster: "",
    runId: "",
    labelSelector: {},
    priority: 0,
    maxSystemRetries: 0,
  };
  const ok = fields(
    r,
    end,
    (n, wireType) => {
      if (n === 6 || n === 8) {
        if (wireType !== 0) return false;
        const v = r.varint(end);
        if (v === DECLINE || v > (n === 6 ? INT32_MAX : UINT32_MAX)) return false;
        if (n === 6) action.priority = v;
        else action.maxSystemRetries = v;
        return true;
      }
      if (wireType !== 2 || n < 1 || n > 7) return false;
      const to = r.delimited(end);
      if (to === DECLINE) return false;
      switch (n) {
        case 4:
          return labelAt(r, to, action.labelSelector);
        case 5: {
          const payload = r.struct(to);
          if (payload === undefined || r.at !== to) return false;
          action.payload = payload;
          return true;
        }
        case 7: {
          const policy = retryPolicyAt(r, to);
          if (policy === undefined) return false;
          action.retryPolicy = policy;
          return true;
        }
        default: {
          const text = r.string(to);
          if (text === undefined) return false;
          if (n === 1) action.requestId = text;
          else if (n === 2) action.cluster = text;
          else action.runId = text;
          return true;
        }
      }
    },
    1 << 4,
  );
  return ok ? action : undefined;
}

/** One entry of the label_selector map, into `labels` (a later entry of one key wins, as in protobuf-es). */
function labelAt(r: Reader, end: number, labels: { [key: string]: string }): boolean {
  let key: string | undefined = "";
  let value: string | undefined = "";
  const ok = fields(r, end, (n, wireType) => {
    if (wireType !== 2 || (n !== 1 && n !== 2)) return false;
    const to = r.delimited(end);
    const text = to === DECLINE ? undefined : r.string(to);
    if (n === 1) key = text;
    else value = text;
    return text !== undefined;
  });
  if (!ok || key === undefined || value === undefined || key === "__proto__") return false;
  labels[key] = value;
  return true;
}

function retryPolicyAt(r: Reader, end: number): RetryPolicy | undefined {
  const policy: RetryPolicy = { $typeName: "leasehold.v1.RetryPolicy", maxAttempts: 0, backoffMultiplier: 0 };
  const ok = fields(r, end, (n, wireType) => {
    if (n === 1) {
      if (wireType !== 0) return false;
      const v = r.varint(end);
      policy.maxAttempts = v;
      return v !== DECLINE && v <= UINT32_MAX;
    }
    if (n === 3) {
      if (wireType !== 1 || end - r.at < 8) return false;
      policy.backoffMultiplier = r.bytes.readDoubleLE(r.at);
      r.at += 8;
      return true;
    }
    if ((n !== 2 && n !== 4) || wireType !== 2) return false;
    const to = r.delimited(end);
    const duration =
      to === DECLINE
        ? undefined
        : secondsAndNanosAt(r, to, { $typeName: "google.protobuf.Duration", seconds: 0n, nanos: 0 });
    if (duration === undefined) return false;
    if (n === 2) policy.initialBackoff = duration;
    else policy.maxBackoff = duration;
    return true;
  });
  return ok ? policy : undefined;
}

/**
 * `SubmitActionsResponse` in ACTION_VIEW_BASIC decoded by hand (the client's
 * side of {@link encodeBasicSubmitResults}): the object `fromBinary` gives
 * for the same bytes, or undefined for anything else (the full view, a field
 * twice, a time before 1970, a value past 2^53 − 1), which the client then
 * decodes the ordinary way. protobuf-es took 1.5–21 ms for an answer of
 * 1,000, most on a process's first calls.
 */
export function decodeBasicSubmitResults(bytes: Buffer): SubmitActionsResponse | undefined {
  const r = new Reader(bytes);
  const results: SubmitActionResponse[] = [];
  const ok = fields(
    r,
    bytes.length,
    (n, wireType) => {
      if (n !== 1 || wireType !== 2) return false;
      const end = r.delimited(bytes.length);
      const result = end === DECLINE ? undefined : submitResultAt(r, end);
      if (result === undefined) return false;
      results.push(result);
      return true;
    },
    1 << 1,
  );
  return ok ? { $typeName: "leasehold.v1.SubmitActionsResponse", results } : undefined;
}

function submitResultAt(r: Reader, end: number): SubmitActionResponse | undefined {
  const result: SubmitActionResponse = { $typeName: "leasehold.v1.SubmitActionResponse", created: false };
  const ok = fields(r, end, (n, wireType) => {
    if (n === 2 && wireType === 0) {
      // A bool written as 0 or 1; any other varint is left to protobuf-es.
      const v = r.varint(end);
      result.created = v === 1;
      return v === 0 || v === 1;
    }
    if (n !== 1 || wireType !== 2) return false;
    const to = r.delimited(end);
    const action = to === DECLINE ? undefined : basicActionAt(r, to);
    if (action === undefined) return false;
    result.action = action;
    return true;
  });
  return ok ? result : undefined;
}

/** Tags of the basic view's fields past 15 (two bytes each): create_time (21) and created_by (25). */
const TAG_CREATE_TIME = (21 << 3) | 2;
const TAG_CREATED_BY = (25 << 3) | 2;

/** An Action holding only the basic view's fields, each at most once. */
function basicActionAt(r: Reader, end: number): Action | undefined {
  const action: Action = {
    $typeName: "leasehold.v1.Action",
    id: "",
    requestId: "",
    runId: "",
    cluster: "",
    labelSelector: {},
    priority: 0,
    maxSystemRetries: 0,
    state: 0,
    epoch: 0n,
    attemptCount: 0,
    failureCount: 0,
    systemRetryCount: 0,
    cancelRequested: false,
    failureReason: "",
    phase: "",
    createdBy: "",
  };
  // Field numbers seen, as bits (the basic view's go up to 25).
  let seen = 0;
  while (r.at < end) {
    const from = r.at;
    const tag = r.varint(end);
    const n = tag >>> 3;
    // A tag longer than 5 bytes overflows 32 bits: protobuf-es refuses it.
    if (tag === DECLINE || r.at - from > 5 || n > 25 || seen & (1 << n)) return undefined;
    seen |= 1 << n;
    if (tag === 10 << 3) {
      const state = r.varint(end);
      if (state === DECLINE || state > INT32_MAX) return undefined;
      action.state = state;
      continue;
    }
    const to = r.delimited(end);
    if (to === DECLINE) return undefined;
    if (tag === TAG_CREATE_TIME) {
      const time = secondsAndNanosAt(r, to, {
        $typeName: "google.protobuf.Timestamp",
        seconds: 0n,
        nanos: 0,
      });
      if (time === undefined) return undefined;
      action.createTime = time;
      continue;
    }
    const text = r.string(to);
    if (text === undefined) return undefined;
    if (tag === ((1 << 3) | 2)) action.id = text;
    else if (tag === ((2 << 3) | 2)) action.requestId = text;
    else if (tag === ((3 << 3) | 2)) action.runId = text;
    else if (tag === ((4 << 3) | 2)) action.cluster = text;
    else if (tag === TAG_CREATED_BY) action.createdBy = text;
    else return undefined;
  }
  return action;
}

/**
 * A google.protobuf.Duration or Timestamp (seconds, nanos) into `into`, when
 * both are non-negative (a negative one takes ten bytes: left to protobuf-es).
 */
function secondsAndNanosAt<T extends Duration | Timestamp>(r: Reader, end: number, into: T): T | undefined {
  const ok = fields(r, end, (n, wireType) => {
    if ((n !== 1 && n !== 2) || wireType !== 0) return false;
    const v = r.varint(end);
    if (v === DECLINE) return false;
    if (n === 1) into.seconds = BigInt(v);
    else into.nanos = v;
    return n === 1 || v <= INT32_MAX;
  });
  return ok ? into : undefined;
}
