import { createRequire } from "node:module";

/**
 * The parts of grpc-js's internal `BaseServerInterceptingCall`
 * (build/src/server-interceptors.js, 1.14) this module relies on. Each
 * message read from a client's stream becomes a queue entry of type
 * COMPRESSED (5-byte prefix included); `decompressAndMaybePush` makes it
 * READABLE (decoded by `handler.deserialize`) and `maybePushNextMessage`
 * hands the queue's head on when it is readable and a read is pending.
 */
interface QueueEntry {
  type: string;
  compressedMessage: Buffer;
  parsedMessage: unknown;
}
interface InterceptingCallShape {
  handler: { deserialize(bytes: Buffer): unknown };
  decompressAndMaybePush(entry: QueueEntry): unknown;
  maybePushNextMessage(): void;
  decompressMessage(message: Buffer, encoding: string): unknown;
  sendStatus(status: unknown): void;
}

let installed: boolean | undefined;

/**
 * Makes grpc-js's server hand each uncompressed message of a client's stream
 * on as it is read. As released (1.14.7) every message goes through an
 * `async` function that awaits the "decompression" even when there is none:
 * a promise, a suspended call and a microtask for every heartbeat of every
 * worker stream. About 600 bytes of garbage a message at 10,000 streams
 * (`bench/heartbeats.ts` with an allocation profile: 4,744 against 5,325
 * bytes a heartbeat), and the same work for every report.
 *
 * Nothing else changes: the message is decoded by the same deserializer and
 * joins the same queue, which still hands messages on in the order they came
 * (a compressed message ahead of it is still waited for); a deserializer that
 * throws, and every compressed message, take grpc-js's own path. If grpc-js's
 * call no longer has this shape, nothing is patched. Returns whether it is in
 * place; safe to call more than once.
 */
export function pushUncompressedAtOnce(): boolean {
  if (installed !== undefined) return installed;
  installed = false;
  let proto: InterceptingCallShape;
  try {
    const require = createRequire(import.meta.url);
    const { BaseServerInterceptingCall } = require("@grpc/grpc-js/build/src/server-interceptors.js");
    proto = BaseServerInterceptingCall?.prototype;
    const shaped =
      typeof proto?.decompressAndMaybePush === "function" &&
      typeof proto.maybePushNextMessage === "function" &&
      typeof proto.decompressMessage === "function" &&
      typeof proto.sendStatus === "function";
    if (!shaped) return false;
  } catch {
    return false;
  }
  const original = proto.decompressAndMaybePush;
  proto.decompressAndMaybePush = function (this: InterceptingCallShape, entry: QueueEntry): unknown {
    // Compress flag 0: the message follows the prefix as it is.
    if (entry.type !== "COMPRESSED" || entry.compressedMessage[0] !== 0) return original.call(this, entry);
    let parsed: unknown;
    try {
      parsed = this.handler.deserialize(entry.compressedMessage.subarray(5));
    } catch {
      // grpc-js answers it (INTERNAL), as it would have.
      return original.call(this, entry);
    }
    entry.parsedMessage = parsed;
    entry.type = "READABLE";
    try {
      this.maybePushNextMessage();
    } catch (error) {
      // Where grpc-js's async function would have put it: a rejection nobody awaits.
      return Promise.reject(error);
    }
    return undefined;
  };
  installed = true;
  return installed;
}
