/**
 * The WorkerService.Connect messages of hot paths in the binary format, by
 * hand instead of through protobuf-es's generic `toBinary` and `fromBinary`.
 * Written straight from their parts: heartbeat acks (one per heartbeat of
 * every stream), grants and report results (one of each per action) by the
 * server; successful completions and grant acks by the agent; and the
 * framing of a batch (ConnectResponse.batch, ConnectRequest.batch) around
 * messages already encoded. Each produces exactly the bytes `toBinary` would.
 * Read: bare heartbeats, completions and grant acks by the server; grants,
 * report results and heartbeat acks by the agent. Each gives exactly the
 * object `fromBinary` would, or undefined for the caller to decode the
 * ordinary way. Unit tests compare both with protobuf-es.
 */

import type { JsonObject as ProtoJsonObject } from "@bufbuild/protobuf";
import type {
  CompletionReport,
  ConnectRequest,
  ConnectResponse,
  Grant,
  GrantAck,
  HeartbeatAck,
  ReportResult,
} from "../gen/leasehold/v1/worker_pb.js";
import type { JsonObject } from "../work/action.js";
import type { RejectReason, ServerMessage } from "../work/worker-messages.js";
import {
  DECLINE,
  fields,
  isCount,
  messageFieldSize,
  Reader,
  stringFieldSize,
  structSize,
  uintFieldSize,
  varintSize,
  Writer,
  writeVarint,
} from "./wire.js";

/** Protobuf wire tags (field number << 3 | wire type). */
const TAG_HEARTBEAT_ACK = (3 << 3) | 2; // ConnectResponse.heartbeat_ack
const TAG_RESPONSE_BATCH = (7 << 3) | 2; // ConnectResponse.batch
const TAG_REQUEST_BATCH = (8 << 3) | 2; // ConnectRequest.batch
const TAG_BATCH_MESSAGES = (1 << 3) | 2; // Connect{Request,Response}Batch.messages
const TAG_HEARTBEAT = (2 << 3) | 2; // ConnectRequest.heartbeat
const TAG_GRANT_ACK = (3 << 3) | 2; // ConnectRequest.grant_ack
const TAG_COMPLETION = (5 << 3) | 2; // ConnectRequest.completion
const TAG_SEQUENCE = (1 << 3) | 0; // HeartbeatAck.sequence, Heartbeat.sequence
const TAG_REMAINING = (2 << 3) | 2; // HeartbeatAck.remaining
const TAG_SECONDS = (1 << 3) | 0; // Duration.seconds
const TAG_NANOS = (2 << 3) | 0; // Duration.nanos

const MAX_SAFE_SEQUENCE = BigInt(Number.MAX_SAFE_INTEGER);

/** RejectReason's numbers (worker.proto). */
const REJECT_REASONS: Record<RejectReason, number> = { FENCED: 1, INVALID: 2, NOT_FOUND: 3, UNAVAILABLE: 4 };

/**
 * `bytes` decoded, when they are a ConnectRequest holding a heartbeat with a
 * sequence and nothing else (no held leases): the message a worker sends
 * most, once per interval on every stream. The result is the object
 * `fromBinary` gives for the same bytes, and such a message has nothing the
 * request validator could refuse. Anything else (held leases, another field,
 * a sequence over 2^53 - 1, bytes cut short) is undefined: the caller decodes
 * and validates it the ordinary way. protobuf-es and the validator took about
 * 900 bytes of garbage for each heartbeat; this takes the two objects.
 */
export function decodeBareHeartbeat(bytes: Uint8Array): ConnectRequest | undefined {
  const length = bytes.length;
  // Tag, length, then nothing or the sequence's tag and its varint (2^53 - 1 takes 8 bytes).
  if (length < 2 || length > 12 || bytes[0] !== TAG_HEARTBEAT || bytes[1] !== length - 2) return undefined;
  let sequence = 0;
  if (length > 2) {
    if (bytes[2] !== TAG_SEQUENCE || length < 4) return undefined;
    let scale = 1;
    for (let i = 3; i < length; i++) {
      const byte = bytes[i] as number;
      sequence += (byte & 0x7f) * scale;
      scale *= 128;
      // The varint must end exactly at the end of the message.
      if ((byte & 0x80) === 0) {
        if (i !== length - 1) return undefined;
        break;
      }
      if (i === length - 1) return undefined;
    }
    if (sequence > Number.MAX_SAFE_INTEGER) return undefined;
  }
  return {
    $typeName: "leasehold.v1.ConnectRequest",
    message: {
      case: "heartbeat",
      value: { $typeName: "leasehold.v1.Heartbeat", sequence: BigInt(sequence), heldLeases: [] },
    },
  };
}

/**
 * `ConnectResponse{heartbeat_ack: {sequence, remaining: durationFromMs(remainingMs)}}`
 * in the binary format, or undefined when the values fall outside the fast
 * path (a sequence over 2^53 − 1, a negative or fractional remaining time):
 * encode those the ordinary way.
 */
export function encodeHeartbeatAck(sequence: bigint, remainingMs: number): Buffer | undefined {
  if (sequence < 0n || sequence > MAX_SAFE_SEQUENCE) return undefined;
  if (!Number.isSafeInteger(remainingMs) || remainingMs < 0) return undefined;
  const seq = Number(sequence);
  const seconds = Math.floor(remainingMs / 1000);
  const nanos = (remainingMs - seconds * 1000) * 1_000_000;
  // Proto3 leaves zero scalars out; the Duration message itself is always present.
  const durationSize =
    (seconds === 0 ? 0 : 1 + varintSize(seconds)) + (nanos === 0 ? 0 : 1 + varintSize(nanos));
  const ackSize = (seq === 0 ? 0 : 1 + varintSize(seq)) + 1 + varintSize(durationSize) + durationSize;
  const bytes = Buffer.allocUnsafe(1 + varintSize(ackSize) + ackSize);
  let at = 0;
  bytes[at++] = TAG_HEARTBEAT_ACK;
  at = writeVarint(bytes, at, ackSize);
  if (seq !== 0) {
    bytes[at++] = TAG_SEQUENCE;
    at = writeVarint(bytes, at, seq);
  }
  bytes[at++] = TAG_REMAINING;
  at = writeVarint(bytes, at, durationSize);
  if (seconds !== 0) {
    bytes[at++] = TAG_SECONDS;
    at = writeVarint(bytes, at, seconds);
  }
  if (nanos !== 0) {
    bytes[at++] = TAG_NANOS;
    at = writeVarint(bytes, at, nanos);
  }
  return bytes;
}

/** The fields of a grant, as `ServerMessage` carries them. */
export type GrantFields = Omit<Extract<ServerMessage, { type: "grant" }>, "type">;

/**
 * `ConnectResponse{grant}` in the binary format, or undefined outside the fast
 * path (an epoch or attempt that is not a non-negative safe integer, a payload
 * or checkpoint that is not plain JSON): encode those the ordinary way.
 */
export function encodeGrant(g: GrantFields): Buffer | undefined {
  if (!isCount(g.epoch) || !isCount(g.attempt) || g.attempt > 0xffffffff) return undefined;
  const sizes: number[] = [];
  const id = Buffer.byteLength(g.actionId);
  const runId = Buffer.byteLength(g.runId);
  const trace = g.traceParent ? Buffer.byteLength(g.traceParent) : 0;
  const payload = g.payload ? structSize(g.payload, sizes) : 0;
  const checkpoint = g.checkpoint ? structSize(g.checkpoint, sizes) : 0;
  if (payload < 0 || checkpoint < 0) return undefined;
  const size =
    stringFieldSize(1, id) +
    uintFieldSize(2, g.epoch) +
    uintFieldSize(3, g.attempt) +
    (g.payload ? messageFieldSize(4, payload) : 0) +
    stringFieldSize(5, runId) +
    (g.checkpoint ? messageFieldSize(6, checkpoint) : 0) +
    stringFieldSize(7, trace);
  const w = new Writer(Buffer.allocUnsafe(messageFieldSize(2, size)), sizes);
  w.message(2, size); // ConnectResponse.grant
  w.string(1, g.actionId, id).uint(2, g.epoch).uint(3, g.attempt);
  if (g.payload) w.message(4, payload).struct(g.payload);
  w.string(5, g.runId, runId);
  if (g.checkpoint) w.message(6, checkpoint).struct(g.checkpoint);
  if (g.traceParent) w.string(7, g.traceParent, trace);
  return w.done();
}

/** The fields of a report result, as `ServerMessage` carries them. */
export type ReportResultFields = Omit<Extract<ServerMessage, { type: "report_result" }>, "type">;

/**
 * `ConnectResponse{report_result}` in the binary format, or undefined outside
 * the fast path (a report id over 2^53 − 1, an epoch that is not a
 * non-negative safe integer): encode those the ordinary way.
 */
export function encodeReportResult(r: ReportResultFields): Buffer | undefined {
  if (r.reportId < 0n || r.reportId > MAX_SAFE_SEQUENCE || !isCount(r.epoch)) return undefined;
  const reportId = Number(r.reportId);
  const reason = r.rejectReason ? REJECT_REASONS[r.rejectReason] : 0;
  const id = Buffer.byteLength(r.actionId);
  const message = Buffer.byteLength(r.message);
  const size =
    uintFieldSize(1, reportId) +
    stringFieldSize(2, id) +
    uintFieldSize(3, r.epoch) +
    (r.accepted ? 2 : 0) +
    (reason === 0 ? 0 : 2) +
    stringFieldSize(6, message);
  const w = new Writer(Buffer.allocUnsafe(messageFieldSize(5, size)), []);
  w.message(5, size); // ConnectResponse.report_result
  w.uint(1, reportId)
    .string(2, r.actionId, id)
    .uint(3, r.epoch)
    .uint(4, r.accepted ? 1 : 0);
  w.uint(5, reason).string(6, r.message, message);
  return w.done();
}

/** A successful completion report's fields, as the agent sends them. */
export interface SuccessFields {
  readonly reportId: bigint;
  readonly actionId: string;
  readonly epoch: bigint;
  readonly traceParent: string;
  readonly output: JsonObject | undefined;
}

/**
 * `ConnectRequest{completion: {…, succeeded: {output}}}` in the binary format,
 * or undefined outside the fast path (a report id or epoch past 2^53 − 1, an
 * output that is not plain JSON): encode those the ordinary way.
 */
export function encodeSuccess(c: SuccessFields): Buffer | undefined {
  if (c.reportId < 0n || c.reportId > MAX_SAFE_SEQUENCE || c.epoch < 0n || c.epoch > MAX_SAFE_SEQUENCE)
    return undefined;
  const reportId = Number(c.reportId);
  const epoch = Number(c.epoch);
  const sizes: number[] = [];
  // Any output but null or undefined is a Struct to protobuf-es (one that is not an object: an
  // empty one); structSize leaves those to it.
  const present = c.output !== undefined && c.output !== null;
  const output = present ? structSize(c.output as JsonObject, sizes) : 0;
  if (output < 0) return undefined;
  const id = Buffer.byteLength(c.actionId);
  const trace = Buffer.byteLength(c.traceParent);
  // ActionSuccess is written even when empty: it is the oneof's case.
  const success = present ? messageFieldSize(1, output) : 0;
  const size =
    uintFieldSize(1, reportId) +
    stringFieldSize(2, id) +
    uintFieldSize(3, epoch) +
    messageFieldSize(4, success) +
    stringFieldSize(6, trace);
  const w = new Writer(Buffer.allocUnsafe(1 + varintSize(size) + size), sizes);
  w.tag(TAG_COMPLETION).varint(size);
  w.uint(1, reportId).string(2, c.actionId, id).uint(3, epoch);
  w.message(4, success);
  if (present) w.message(1, output).struct(c.output as JsonObject);
  w.string(6, c.traceParent, trace);
  return w.done();
}

/**
 * `ConnectRequest{grant_ack: {report_id, action_id, epoch}}` in the binary
 * format, or undefined for a report id or epoch past 2^53 − 1.
 */
export function encodeGrantAck(reportId: bigint, actionId: string, epoch: bigint): Buffer | undefined {
  if (reportId < 0n || reportId > MAX_SAFE_SEQUENCE || epoch < 0n || epoch > MAX_SAFE_SEQUENCE)
    return undefined;
  const id = Buffer.byteLength(actionId);
  const size = uintFieldSize(1, Number(reportId)) + stringFieldSize(2, id) + uintFieldSize(3, Number(epoch));
  const w = new Writer(Buffer.allocUnsafe(1 + varintSize(size) + size), []);
  w.tag(TAG_GRANT_ACK).varint(size);
  w.uint(1, Number(reportId)).string(2, actionId, id).uint(3, Number(epoch));
  return w.done();
}

/**
 * `ConnectResponse{batch: {messages}}` in the binary format, from the binary
 * form of each message (a repeated message field is each element's bytes
 * behind its tag and length, so nothing is decoded or encoded again).
 */
export function encodeResponseBatch(messages: readonly Uint8Array[]): Buffer {
  return encodeBatch(TAG_RESPONSE_BATCH, messages);
}

/** `ConnectRequest{batch: {messages}}` in the binary format, from the binary form of each message. */
export function encodeRequestBatch(messages: readonly Uint8Array[]): Buffer {
  return encodeBatch(TAG_REQUEST_BATCH, messages);
}

function encodeBatch(tag: number, messages: readonly Uint8Array[]): Buffer {
  let batchSize = 0;
  for (const m of messages) batchSize += 1 + varintSize(m.byteLength) + m.byteLength;
  const bytes = Buffer.allocUnsafe(1 + varintSize(batchSize) + batchSize);
  let at = 0;
  bytes[at++] = tag;
  at = writeVarint(bytes, at, batchSize);
  for (const m of messages) {
    bytes[at++] = TAG_BATCH_MESSAGES;
    at = writeVarint(bytes, at, m.byteLength);
    bytes.set(m, at);
    at += m.byteLength;
  }
  return bytes;
}

/**
 * Splits encoded messages into runs for batches: at most `maxMessages` each,
 * and at most `maxBytes` of messages unless a run is one message alone.
 * Calls `write` with each run in order.
 */
export function batchRuns(
  messages: readonly Uint8Array[],
  maxMessages: number,
  maxBytes: number,
  write: (run: readonly Uint8Array[]) => void,
): void {
  let from = 0;
  while (from < messages.length) {
    let to = from;
    let bytes = 0;
    while (to < messages.length && to - from < maxMessages) {
      const size = (messages[to] as Uint8Array).byteLength;
      if (to > from && bytes + size > maxBytes) break;
      bytes += size;
      to += 1;
    }
    write(messages.slice(from, to));
    from = to;
  }
}

/** ConnectResponse's fields the agent decodes by hand. */
const RESPONSE_GRANT = 2;
const RESPONSE_HEARTBEAT_ACK = 3;
const RESPONSE_REPORT_RESULT = 5;
const RESPONSE_BATCH = 7;

/**
 * `bytes` decoded, when they are a ConnectResponse holding a grant, a report
 * result, a heartbeat ack, or a batch of those: what an agent receives for
 * every action. The result is the object `fromBinary` gives for the same
 * bytes. Anything else (a welcome, a revoke, a field this does not know, a
 * value past 2^53 − 1, a payload that is not plain JSON) is undefined: the
 * caller decodes it the ordinary way. protobuf-es's `fromBinary` was about a
 * tenth of an agent's CPU with no-op handlers.
 */
export function decodeServerMessage(bytes: Buffer): ConnectResponse | undefined {
  return decodeConnect(bytes, RESPONSE_BATCH, responseAt, (messages) => ({
    $typeName: "leasehold.v1.ConnectResponse",
    message: { case: "batch", value: { $typeName: "leasehold.v1.ConnectResponseBatch", messages } },
  }));
}

/** A ConnectResponse holding `field`, whose message ends at `end`. */
function responseAt(r: Reader, field: number, end: number): ConnectResponse | undefined {
  switch (field) {
    case RESPONSE_GRANT: {
      const value = grantAt(r, end);
      return value && { $typeName: "leasehold.v1.ConnectResponse", message: { case: "grant", value } };
    }
    case RESPONSE_REPORT_RESULT: {
      const value = reportResultAt(r, end);
      return value && { $typeName: "leasehold.v1.ConnectResponse", message: { case: "reportResult", value } };
    }
    case RESPONSE_HEARTBEAT_ACK: {
      const value = heartbeatAckAt(r, end);
      return value && { $typeName: "leasehold.v1.ConnectResponse", message: { case: "heartbeatAck", value } };
    }
    default:
      return undefined;
  }
}

/**
 * A Connect message (request or response) from `bytes`: one message field,
 * read by `one` (given its field number and where it ends), or the batch
 * field `batchField`, whose messages are each read so (batches do not nest)
 * and wrapped by `batch`. Undefined when anything is left over or declined.
 */
function decodeConnect<M>(
  bytes: Buffer,
  batchField: number,
  one: (r: Reader, field: number, end: number) => M | undefined,
  batch: (messages: M[]) => M,
): M | undefined {
  const r = new Reader(bytes);
  let field = fieldAt(r, bytes.length);
  if (field !== batchField) return field === DECLINE ? undefined : one(r, field, bytes.length);
  const messages: M[] = [];
  while (r.at < bytes.length) {
    if (r.bytes[r.at++] !== TAG_BATCH_MESSAGES) return undefined;
    const end = r.delimited(bytes.length);
    if (end === DECLINE) return undefined;
    field = fieldAt(r, end);
    const m = field === DECLINE || field === batchField ? undefined : one(r, field, end);
    if (m === undefined) return undefined;
    messages.push(m);
  }
  return batch(messages);
}

/**
 * The field number of the one message field a Connect message ending at
 * `end` holds (its oneof), with the reader at that message; DECLINE unless
 * the field's message is all there is.
 */
function fieldAt(r: Reader, end: number): number {
  if (end - r.at < 2) return DECLINE;
  const tag = r.bytes[r.at++] as number;
  if (tag >= 0x80 || (tag & 7) !== 2) return DECLINE;
  return r.delimited(end) === end ? tag >>> 3 : DECLINE;
}

/** A uint64 field's value as protobuf-es gives it, or undefined past 2^53 − 1. */
function uint64(r: Reader, end: number): bigint | undefined {
  const n = r.varint(end);
  return n === DECLINE ? undefined : BigInt(n);
}

function grantAt(r: Reader, end: number): Grant | undefined {
  let actionId: string | undefined = "";
  let epoch = 0n;
  let attempt = 0;
  let runId: string | undefined = "";
  let traceParent: string | undefined = "";
  let payload: ProtoJsonObject | undefined;
  let checkpoint: ProtoJsonObject | undefined;
  const ok = fields(r, end, (n, wireType) => {
    if (n === 2 || n === 3) {
      if (wireType !== 0) return false;
      if (n === 3) {
        attempt = r.varint(end);
        return attempt !== DECLINE && attempt <= 0xffffffff;
      }
      const e = uint64(r, end);
      if (e === undefined) return false;
      epoch = e;
      return true;
    }
    if (wireType !== 2) return false;
    const to = r.delimited(end);
    if (to === DECLINE) return false;
    switch (n) {
      case 1:
        actionId = r.string(to);
        return actionId !== undefined;
      case 4:
        payload = r.struct(to);
        return payload !== undefined && r.at === to;
      case 5:
        runId = r.string(to);
        return runId !== undefined;
      case 6:
        checkpoint = r.struct(to);
        return checkpoint !== undefined && r.at === to;
      case 7:
        traceParent = r.string(to);
        return traceParent !== undefined;
      default:
        return false;
    }
  });
  if (!ok || actionId === undefined || runId === undefined || traceParent === undefined) return undefined;
  const grant: Grant = { $typeName: "leasehold.v1.Grant", actionId, epoch, attempt, runId, traceParent };
  if (payload !== undefined) grant.payload = payload;
  if (checkpoint !== undefined) grant.checkpoint = checkpoint;
  return grant;
}

function reportResultAt(r: Reader, end: number): ReportResult | undefined {
  const result: ReportResult = {
    $typeName: "leasehold.v1.ReportResult",
    reportId: 0n,
    actionId: "",
    epoch: 0n,
    accepted: false,
    rejectReason: 0,
    message: "",
  };
  const ok = fields(r, end, (n, wireType) => {
    if (n === 2 || n === 6) {
      if (wireType !== 2) return false;
      const to = r.delimited(end);
      if (to === DECLINE) return false;
      const text = r.string(to);
      if (text === undefined) return false;
      if (n === 2) result.actionId = text;
      else result.message = text;
      return true;
    }
    if (wireType !== 0) return false;
    switch (n) {
      case 1:
      case 3: {
        const v = uint64(r, end);
        if (v === undefined) return false;
        if (n === 1) result.reportId = v;
        else result.epoch = v;
        return true;
      }
      case 4: {
        const b = r.varint(end);
        result.accepted = b === 1;
        return b === 0 || b === 1;
      }
      case 5: {
        // An open enum: any int32 number; a negative one (ten bytes) is left to protobuf-es.
        const reason = r.varint(end);
        result.rejectReason = reason;
        return reason !== DECLINE && reason <= 0x7fffffff;
      }
      default:
        return false;
    }
  });
  return ok ? result : undefined;
}

function heartbeatAckAt(r: Reader, end: number): HeartbeatAck | undefined {
  const ack: HeartbeatAck = {
    $typeName: "leasehold.v1.HeartbeatAck",
    sequence: 0n,
    databaseUnreachable: false,
  };
  const ok = fields(r, end, (n, wireType) => {
    if (n === 1 && wireType === 0) {
      const sequence = uint64(r, end);
      if (sequence === undefined) return false;
      ack.sequence = sequence;
      return true;
    }
    if (n === 3 && wireType === 0) {
      // A bool as every encoder writes it; anything else is left to protobuf-es.
      const b = r.varint(end);
      ack.databaseUnreachable = b === 1;
      return b === 0 || b === 1;
    }
    if (n !== 2 || wireType !== 2) return false;
    const to = r.delimited(end);
    if (to === DECLINE) return false;
    let seconds = 0n;
    let nanos = 0;
    const read = fields(r, to, (f, type) => {
      if (type !== 0 || (f !== 1 && f !== 2)) return false;
      // Negative values (ten bytes) are left to protobuf-es.
      const v = r.varint(to);
      if (v === DECLINE) return false;
      if (f === 1) seconds = BigInt(v);
      else nanos = v;
      return f === 1 || v <= 0x7fffffff;
    });
    if (!read) return false;
    ack.remaining = { $typeName: "google.protobuf.Duration", seconds, nanos };
    return true;
  });
  return ok ? ack : undefined;
}

/** ConnectRequest's fields the server decodes by hand (besides a bare heartbeat). */
const REQUEST_GRANT_ACK = 3;
const REQUEST_COMPLETION = 5;
const REQUEST_BATCH = 8;

/**
 * `bytes` decoded, when they are a ConnectRequest holding a successful
 * completion report (its output a Struct of plain JSON, or none), a grant
 * ack, or a batch of those: what an agent sends for every action. The result
 * is the object `fromBinary` gives for the same bytes; the caller still runs
 * the request validator on it. Anything else (a failure, a release, a
 * progress report, a field this does not know, a value past 2^53 − 1) is
 * undefined: the caller decodes it the ordinary way.
 */
export function decodeWorkerReports(bytes: Buffer): ConnectRequest | undefined {
  return decodeConnect(bytes, REQUEST_BATCH, requestAt, (messages) => ({
    $typeName: "leasehold.v1.ConnectRequest",
    message: { case: "batch", value: { $typeName: "leasehold.v1.ConnectRequestBatch", messages } },
  }));
}

/** A ConnectRequest holding `field`, whose message ends at `end`. */
function requestAt(r: Reader, field: number, end: number): ConnectRequest | undefined {
  switch (field) {
    case REQUEST_COMPLETION: {
      const value = completionAt(r, end);
      return value && { $typeName: "leasehold.v1.ConnectRequest", message: { case: "completion", value } };
    }
    case REQUEST_GRANT_ACK: {
      const value = grantAckAt(r, end);
      return value && { $typeName: "leasehold.v1.ConnectRequest", message: { case: "grantAck", value } };
    }
    default:
      return undefined;
  }
}

/**
 * The fields every report shares: report_id (1), action_id (2), epoch (3).
 * Gives false to decline, true when read, and undefined for another field
 * (the caller's to read).
 */
function reportField(
  r: Reader,
  end: number,
  n: number,
  wireType: number,
  into: { reportId: bigint; actionId: string; epoch: bigint },
): boolean | undefined {
  if (n === 1 || n === 3) {
    if (wireType !== 0) return false;
    const v = uint64(r, end);
    if (v === undefined) return false;
    if (n === 1) into.reportId = v;
    else into.epoch = v;
    return true;
  }
  if (n !== 2) return undefined;
  if (wireType !== 2) return false;
  const to = r.delimited(end);
  const id = to === DECLINE ? undefined : r.string(to);
  if (id === undefined) return false;
  into.actionId = id;
  return true;
}

function grantAckAt(r: Reader, end: number): GrantAck | undefined {
  const ack: GrantAck = { $typeName: "leasehold.v1.GrantAck", reportId: 0n, actionId: "", epoch: 0n };
  const ok = fields(r, end, (n, wireType) => reportField(r, end, n, wireType, ack) ?? false);
  return ok ? ack : undefined;
}

function completionAt(r: Reader, end: number): CompletionReport | undefined {
  const report: CompletionReport = {
    $typeName: "leasehold.v1.CompletionReport",
    reportId: 0n,
    actionId: "",
    epoch: 0n,
    outcome: { case: undefined },
    traceParent: "",
  };
  const ok = fields(r, end, (n, wireType) => {
    const common = reportField(r, end, n, wireType, report);
    if (common !== undefined) return common;
    if (wireType !== 2 || (n !== 4 && n !== 6)) return false;
    const to = r.delimited(end);
    if (to === DECLINE) return false;
    if (n === 6) {
      const trace = r.string(to);
      if (trace === undefined) return false;
      report.traceParent = trace;
      return true;
    }
    // ActionSuccess: an output (field 1) or nothing.
    const value: CompletionReport["outcome"] & { case: "succeeded" } = {
      case: "succeeded",
      value: { $typeName: "leasehold.v1.ActionSuccess" },
    };
    if (r.at < to) {
      if (r.bytes[r.at++] !== ((1 << 3) | 2)) return false;
      const outputEnd = r.delimited(to);
      if (outputEnd !== to) return false;
      const output = r.struct(to);
      if (output === undefined || r.at !== to) return false;
      value.value.output = output;
    }
    report.outcome = value;
    return true;
  });
  return ok && report.outcome.case !== undefined ? report : undefined;
}
