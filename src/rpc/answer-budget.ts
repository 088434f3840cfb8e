import {
  create,
  type DescMessage,
  fromJson,
  type JsonObject,
  type MessageInitShape,
  toBinary,
} from "@bufbuild/protobuf";
import { StructSchema } from "@bufbuild/protobuf/wkt";
import { PAGE_BYTES } from "../work/page.js";

/**
 * A Struct (or a string) of an answer that may be left out to keep the
 * answer readable: where it is (`path`, as the answer's `omitted` names it),
 * what it holds, and how to take it out of the answer.
 */
export interface Omissible {
  readonly path: string;
  readonly value: unknown;
  drop(): void;
}

/** Bytes `value` (a Struct's JSON, or a string) takes as sent. */
const sentBytes = (value: unknown): number =>
  typeof value === "string"
    ? Buffer.byteLength(value)
    : toBinary(StructSchema, fromJson(StructSchema, value as JsonObject)).byteLength;

/**
 * Bounds one answer that gathers many Structs (an action with its attempts'
 * errors, an explanation's events). Each Struct is bounded on its own (1 MiB
 * of JSON, up to five times that as sent), but a worker that fails a hundred
 * times with large details made GetAction answer 9.5 MB, which no default
 * gRPC client reads (4 MiB): the action could no longer be looked at with
 * the very calls meant for it. While the answer as sent is over
 * {@link PAGE_BYTES}, `parts` are left out in their order; returns the
 * answer to send with the paths left out (empty: all of it), and whether it
 * is still over once all of them are.
 */
export function fitAnswer<M extends DescMessage>(
  schema: M,
  answer: MessageInitShape<M>,
  parts: () => Iterable<Omissible>,
): { answer: MessageInitShape<M>; omitted: string[]; over: boolean } {
  let bytes = toBinary(schema, create(schema, answer)).byteLength;
  const omitted: string[] = [];
  if (bytes <= PAGE_BYTES) return { answer, omitted, over: false };
  for (const part of parts()) {
    if (bytes <= PAGE_BYTES) break;
    if (part.value === undefined || part.value === null || part.value === "") continue;
    bytes -= sentBytes(part.value);
    part.drop();
    omitted.push(part.path);
  }
  return { answer, omitted, over: bytes > PAGE_BYTES };
}

/** The Structs of an action, as the answers holding it leave them out: the least needed first. */
export function* actionParts(
  action: {
    phaseDetails?: unknown;
    lastError?: { details?: unknown } | undefined;
    output?: unknown;
    payload?: unknown;
  },
  at: string,
): Iterable<Omissible> {
  yield { path: `${at}.phase_details`, value: action.phaseDetails, drop: () => delete action.phaseDetails };
  const lastError = action.lastError;
  if (lastError)
    yield {
      path: `${at}.last_error.details`,
      value: lastError.details,
      drop: () => delete lastError.details,
    };
  yield { path: `${at}.output`, value: action.output, drop: () => delete action.output };
  yield { path: `${at}.payload`, value: action.payload, drop: () => delete action.payload };
}

/**
 * One field of the attempts' errors, oldest first: their details, or their
 * messages, the last resort once every Struct is out (a hundred failures of
 * 64 KiB messages take 6 MiB).
 */
export function* attemptParts(
  attempts: readonly { error?: { details?: unknown; message?: string } | undefined }[],
  at: (i: number) => string,
  field: "details" | "message" = "details",
): Iterable<Omissible> {
  for (const [i, attempt] of attempts.entries()) {
    const error = attempt.error;
    if (error)
      yield { path: `${at(i)}.error.${field}`, value: error[field], drop: () => delete error[field] };
  }
}

/** The details of a timeline's events, oldest first. */
export function* eventParts(
  timeline: readonly { event?: { details?: unknown } | undefined }[],
): Iterable<Omissible> {
  for (const [i, step] of timeline.entries()) {
    const event = step.event;
    if (event)
      yield { path: `timeline[${i}].event.details`, value: event.details, drop: () => delete event.details };
  }
}
