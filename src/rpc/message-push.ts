import { createRequire } from "node:module";
import { Code, LeaseholdError } from "../errors.js";
import { RejectedRequest } from "./request-decoder.js";

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
  handleEndEvent(): void;
  incomingEncoding: string;
  readQueue: QueueEntry[];
  /** grpc-js's StreamDecoder of the call: in state 0 (NO_DATA) between two messages. */
  decoder?: { readState?: number };
}

let installed: boolean | undefined;
let framing: boolean | undefined;

/** grpc-js's BaseServerInterceptingCall prototype, if it has the shape this module relies on. */
function interceptingCallPrototype(): InterceptingCallShape | undefined {
  try {
    const require = createRequire(import.meta.url);
    const { BaseServerInterceptingCall } = require("@grpc/grpc-js/build/src/server-interceptors.js");
    const proto = BaseServerInterceptingCall?.prototype as InterceptingCallShape | undefined;
    const shaped =
      typeof proto?.decompressAndMaybePush === "function" &&
      typeof proto.maybePushNextMessage === "function" &&
      typeof proto.decompressMessage === "function" &&
      typeof proto.sendStatus === "function";
    return shaped ? proto : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Makes grpc-js's server refuse two framings that gRPC calls protocol
 * errors and grpc-js lets pass (1.14): a message whose compressed flag is
 * set when the call names no grpc-encoding (read as if uncompressed), or is
 * neither 0 nor 1; and a stream that ends in the middle of a message (the
 * part dropped, the call ending as if the client had sent nothing more).
 * Each becomes, in its place among the call's messages, a message that
 * could not be read: the messages before it are handled first, then the
 * call ends INTERNAL saying which (worker.proto: "a message that cannot be
 * read ends the stream with its error"). Returns whether it is in place;
 * safe to call more than once.
 */
export function refuseMalformedFraming(): boolean {
  if (framing !== undefined) return framing;
  framing = false;
  const proto = interceptingCallPrototype();
  if (typeof proto?.handleEndEvent !== "function") return false;
  const unreadable = (message: string): QueueEntry => ({
    type: "READABLE",
    compressedMessage: Buffer.alloc(0),
    parsedMessage: new RejectedRequest(new LeaseholdError(Code.Internal, message)),
  });
  const decompress = proto.decompressAndMaybePush;
  proto.decompressAndMaybePush = function (this: InterceptingCallShape, entry: QueueEntry): unknown {
    const flag = entry.compressedMessage[0];
    const refused =
      flag === 1 && this.incomingEncoding === "identity"
        ? "a message has its compressed flag set but the call names no grpc-encoding: send it uncompressed (flag 0), or name its encoding"
        : flag !== 0 && flag !== 1
          ? `a message's compressed flag is ${flag}: it must be 0 (uncompressed) or 1 (compressed with the call's grpc-encoding)`
          : undefined;
    if (refused === undefined) return decompress.call(this, entry);
    Object.assign(entry, unreadable(refused));
    this.maybePushNextMessage();
    return undefined;
  };
  const end = proto.handleEndEvent;
  proto.handleEndEvent = function (this: InterceptingCallShape): void {
    const state = this.decoder?.readState;
    if (state !== undefined && state !== 0) {
      this.readQueue.push(
        unreadable(
          "the stream ended in the middle of a message (its length prefix promised more bytes than came): " +
            "send whole messages before ending the stream",
        ),
      );
    }
    end.call(this);
  };
  framing = true;
  return framing;
}

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
  const proto = interceptingCallPrototype();
  if (!proto) return false;
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
