/**
 * Binary encodings of WorkerService.Connect messages written on hot paths,
 * built straight from their parts instead of through a message object and
 * `toBinary`: heartbeat acks (one per heartbeat of every stream) and the
 * framing of a batch (ConnectResponse.batch, ConnectRequest.batch) around
 * messages already encoded. Each produces exactly the bytes `toBinary` would
 * (a unit test compares them). Used by the worker service and the agent SDK.
 */

/** Protobuf wire tags (field number << 3 | wire type). */
const TAG_HEARTBEAT_ACK = (3 << 3) | 2; // ConnectResponse.heartbeat_ack
const TAG_RESPONSE_BATCH = (7 << 3) | 2; // ConnectResponse.batch
const TAG_REQUEST_BATCH = (8 << 3) | 2; // ConnectRequest.batch
const TAG_BATCH_MESSAGES = (1 << 3) | 2; // Connect{Request,Response}Batch.messages
const TAG_SEQUENCE = (1 << 3) | 0; // HeartbeatAck.sequence
const TAG_REMAINING = (2 << 3) | 2; // HeartbeatAck.remaining
const TAG_SECONDS = (1 << 3) | 0; // Duration.seconds
const TAG_NANOS = (2 << 3) | 0; // Duration.nanos

const MAX_SAFE_SEQUENCE = BigInt(Number.MAX_SAFE_INTEGER);

/** Bytes of a varint holding `n`, a non-negative safe integer. */
function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    size += 1;
  }
  return size;
}

/** Writes `n` (a non-negative safe integer) as a varint at `at`; returns the next offset. */
function writeVarint(into: Uint8Array, at: number, n: number): number {
  while (n >= 0x80) {
    into[at++] = (n % 0x80) | 0x80;
    n = Math.floor(n / 0x80);
  }
  into[at++] = n;
  return at;
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
