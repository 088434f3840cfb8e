import { constants as http2, type ServerHttp2Stream } from "node:http2";
import { createRequire } from "node:module";
import type * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import { perSecond } from "./per-second.js";
import { toStatusObject } from "./status.js";

/** Default of `PartialRequestOptions.maxBytes`: 256 MiB. */
export const DEFAULT_PARTIAL_REQUEST_BYTES = 256 * 1024 * 1024;

/** Default of `PartialRequestOptions.stallMs`. */
export const DEFAULT_REQUEST_STALL_MS = 30_000;

/**
 * A message that holds at most this much memory is never reset for the
 * budget (it is counted, and stall checks still apply): two network reads at
 * Node's read size (64 KiB), so that a heartbeat or report that came split
 * between two reads always goes through, even while the budget is taken. A
 * heartbeat listing more than about 1,500 leases is larger than one read, and
 * can be reset (worker.proto says so).
 */
export const SMALL_PARTIAL_BYTES = 128 * 1024;

/**
 * What a message still arriving must gain in each stall period (unless the
 * server is the one not reading): one HTTP/2 DATA frame at the default frame
 * size. A link of 1 KB/s passes; a peer that sends a byte now and then does not.
 */
export const STALL_PROGRESS_BYTES = 16 * 1024;

/** Options of {@link createPartialRequestLimit}. */
export interface PartialRequestOptions {
  readonly log: Logger;
  /**
   * Memory the server lets request messages hold while they arrive, across
   * all calls of all connections: the network reads their bytes came in
   * (grpc-js keeps slices of them, and a slice keeps its whole read), each
   * counted once however many messages share it. A chunk that takes the total
   * past it resets its stream, unless its message holds at most
   * {@link SMALL_PARTIAL_BYTES}. At least the largest message the server
   * accepts, or that message never arrives. Default
   * {@link DEFAULT_PARTIAL_REQUEST_BYTES}.
   */
  readonly maxBytes?: number | undefined;
  /**
   * A request message that gains less than {@link STALL_PROGRESS_BYTES} in
   * this long, while the server reads its stream, is reset (checked once a
   * period: it goes one to two periods after it stalled). Default
   * {@link DEFAULT_REQUEST_STALL_MS}.
   */
  readonly stallMs?: number | undefined;
}

/** Bounds on what clients make the server hold in request messages that have not fully arrived. */
export interface PartialRequestLimit {
  /**
   * Follows the request stream of every call: put it first in the grpc-js
   * server's `interceptors`.
   */
  readonly interceptor: grpc.ServerInterceptor;
  /** Bytes held now by request messages still arriving, as the budget counts them. */
  readonly heldBytes: number;
  /**
   * Counts `bytes` of a request body arriving elsewhere (the console's HTTP
   * port) against the same budget; returns the function that lets them go,
   * or undefined, counting nothing, when they would take the total past it
   * (a body of at most {@link SMALL_PARTIAL_BYTES} is always counted).
   */
  hold(bytes: number): (() => void) | undefined;
  /** Stops the stall checks (the server is closing). Idempotent. */
  close(): void;
}

/**
 * The parts of grpc-js's internal `BaseServerInterceptingCall` and of its
 * `StreamDecoder` (build/src/server-interceptors.js and stream-decoder.js,
 * 1.14) this module relies on. The decoder splits the stream's DATA chunks
 * into messages. Out of state NO_DATA a message is arriving: its flag byte is
 * a slice of the chunk it came in (`readCompressFlag`); in state
 * READING_MESSAGE the announced length is in `readMessageSize`, the bytes
 * still to come in `readMessageRemaining`, and slices of the chunks received
 * in `readPartialMessage`, a new array for each message.
 */
interface DecoderShape {
  readState: number;
  readCompressFlag: unknown;
  readMessageSize: number;
  readMessageRemaining: number;
  readPartialMessage: unknown[];
}
interface BaseCallShape {
  readonly stream: ServerHttp2Stream;
  readonly decoder: DecoderShape;
  /** Set once the call ended, by either side; grpc-js then drops what still arrives. */
  readonly cancelled: boolean;
  sendStatus(status: grpc.StatusObject): void;
  getPeer(): string;
}

const NO_DATA = 0;
const READING_MESSAGE = 2;

/** One call's request stream. */
interface Arrival {
  readonly call: BaseCallShape;
  readonly method: string;
  /** The decoder's `readPartialMessage` of the message arriving; undefined between messages. */
  parts: unknown[] | undefined;
  /** How many of `parts` are counted. */
  seen: number;
  /** The read buffers the message holds, each counted once (made at the stream's first message). */
  buffers: Set<ArrayBufferLike> | undefined;
  /** Their bytes. */
  retained: number;
  /** Bytes of the message received (progress). */
  held: number;
  /** Its announced length; 0 while the length prefix arrives. */
  size: number;
  /**
   * `held` at the last stall check; -1 for a message that began since (or,
   * once reset, for a stream no check has seen yet).
   */
  mark: number;
  /** Reset by this module: the status is sent, the stream waits to be closed. */
  reset: boolean;
}

/** Log lines about resets per second at most; the rest are counted in the next line. */
const RESETS_LOGGED_PER_SECOND = 10;

const mib = (bytes: number) => `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;

/**
 * Bounds what peers make the server hold in request messages that have begun
 * to arrive and not finished (SPEC §5): grpc-js
 * buffers each message until its last byte, up to the receive limit, with no
 * timeout, so peers that announce large messages and never finish them
 * could hold any amount of memory (two connections of 256 such streams held
 * 2 GiB). Two rules, each resetting the stream with RESOURCE_EXHAUSTED:
 * - a budget across the server: the chunk that takes the memory such
 *   messages hold past `maxBytes` resets its stream, unless its message holds
 *   no more than {@link SMALL_PARTIAL_BYTES} (reason
 *   PARTIAL_REQUESTS_OVER_BUDGET). What a message holds is the network reads
 *   its bytes came in, not its bytes: a slice keeps its whole read, and peers
 *   that mix a few bytes of a message into each read would hold far more
 *   than they send of it;
 * - a stall bound: a message, of any size, that gains less than
 *   {@link STALL_PROGRESS_BYTES} in `stallMs` while the server reads its
 *   stream is reset (reason REQUEST_STALLED), which frees the budget of
 *   peers that stop sending.
 * A stream between two messages holds nothing and is never checked: a worker
 * stream idle between heartbeats costs nothing here. With authentication on,
 * only callers it accepted get to send a message (call-authorization.ts).
 *
 * It follows each call through a server interceptor, which grpc-js hands the
 * call itself, and reads its decoder's state after each DATA chunk (its own
 * listener runs first); it changes nothing in grpc-js. A reset lets go of the
 * message, ends the call with the status (grpc-js drops what arrives after)
 * and, once the status has left, sends RST_STREAM NO_ERROR, which tells the
 * client to stop sending the rest (RFC 9113 §8.1). Not before: nghttp2 sends
 * an RST_STREAM ahead of the stream's queued HEADERS, and the client would
 * get no status. A status still queued at the next stall check (the client
 * does not read) is cut with ENHANCE_YOUR_CALM, which gRPC clients report as
 * RESOURCE_EXHAUSTED. Returns undefined, with nothing bounded, if grpc-js's
 * call no longer has the expected shape.
 */
export function createPartialRequestLimit(options: PartialRequestOptions): PartialRequestLimit | undefined {
  const baseCall = baseCallClass();
  if (!baseCall) return undefined;
  const { log } = options;
  const maxBytes = options.maxBytes ?? DEFAULT_PARTIAL_REQUEST_BYTES;
  const stallMs = options.stallMs ?? DEFAULT_REQUEST_STALL_MS;
  /** Streams with a message arriving. */
  const arriving = new Set<Arrival>();
  /** Streams reset whose status has not left yet. */
  const closing = new Set<Arrival>();
  /** Each read buffer a message arriving holds, and how many do. */
  const holders = new Map<ArrayBufferLike, number>();
  let heldBytes = 0;
  let checkTimer: NodeJS.Timeout | undefined;
  let closed = false;
  let unfollowed = false;

  const scheduleCheck = () => {
    if (checkTimer || closed || (arriving.size === 0 && closing.size === 0)) return;
    checkTimer = setTimeout(check, stallMs);
    // A stalled stream alone must not keep the process alive.
    checkTimer.unref();
  };

  const retain = (a: Arrival, slice: unknown) => {
    if (!(slice instanceof Uint8Array)) return;
    const buffer = slice.buffer;
    a.buffers ??= new Set();
    if (a.buffers.has(buffer)) return;
    a.buffers.add(buffer);
    a.retained += buffer.byteLength;
    const n = holders.get(buffer) ?? 0;
    if (n === 0) heldBytes += buffer.byteLength;
    holders.set(buffer, n + 1);
  };

  const forget = (a: Arrival) => {
    for (const buffer of a.buffers ?? []) {
      const n = (holders.get(buffer) ?? 1) - 1;
      if (n > 0) holders.set(buffer, n);
      else {
        holders.delete(buffer);
        heldBytes -= buffer.byteLength;
      }
    }
    a.buffers?.clear();
    a.retained = 0;
    a.parts = undefined;
    a.held = 0;
    arriving.delete(a);
  };

  /** Closes the stream of a reset call once its status is out (`localClose`: END_STREAM sent). */
  const closeIfAnswered = (a: Arrival) => {
    const stream = a.call.stream;
    if (stream.closed || stream.destroyed) closing.delete(a);
    else if (stream.state.localClose) {
      closing.delete(a);
      stream.close(http2.NGHTTP2_NO_ERROR);
    }
  };

  const logLimited = perSecond(RESETS_LOGGED_PER_SECOND);
  const reset = (a: Arrival, error: LeaseholdError) => {
    const { call } = a;
    const { held, retained } = a;
    forget(a);
    a.reset = true;
    a.mark = -1;
    // grpc-js drops whatever comes after the call ended; this lets go of what it has.
    call.decoder.readPartialMessage = [];
    call.decoder.readCompressFlag = null;
    call.decoder.readState = NO_DATA;
    // A call that already ended has its status; this one goes trailers-only, or as trailers
    // after the messages queued.
    if (!call.cancelled) call.sendStatus(toStatusObject(error, log, a.method));
    closing.add(a);
    closeIfAnswered(a);
    scheduleCheck();
    logLimited((suppressed) =>
      log.warn(
        {
          method: a.method,
          peer: call.getPeer(),
          reason: error.reason,
          receivedBytes: held,
          heldBytes: retained,
          announcedBytes: a.size,
          ...(suppressed > 0 ? { suppressedBefore: suppressed } : {}),
        },
        `reset a request of ${a.method}: ${error.message}`,
      ),
    );
  };

  const received = (a: Arrival) => {
    if (a.reset) return closeIfAnswered(a);
    const d = a.call.decoder;
    if (a.call.cancelled) {
      // The call ended (a deadline, an answer, a length over the receive limit) with part of a
      // message in hand: grpc-js keeps it until the client closes the stream, which a hostile
      // one never does.
      if (d.readState !== NO_DATA) reset(a, endedEarly());
      return;
    }
    if (d.readState === NO_DATA) {
      if (a.parts) forget(a);
      return;
    }
    const parts = d.readPartialMessage;
    if (parts !== a.parts) {
      // A new message: the first, or the next one began in the chunk that ended the last.
      forget(a);
      a.parts = parts;
      a.seen = 0;
      a.mark = -1;
      arriving.add(a);
      scheduleCheck();
      retain(a, d.readCompressFlag);
    }
    for (let i = a.seen; i < parts.length; i++) retain(a, parts[i]);
    a.seen = parts.length;
    const reading = d.readState === READING_MESSAGE;
    a.size = reading ? d.readMessageSize : 0;
    a.held = reading ? d.readMessageSize - d.readMessageRemaining : 0;
    if (heldBytes > maxBytes && a.retained > SMALL_PARTIAL_BYTES) {
      reset(a, overBudget(a, heldBytes, maxBytes));
    }
  };

  function check() {
    checkTimer = undefined;
    for (const a of arriving) {
      // Paused: grpc-js waits for the handler to read, so the client cannot send more.
      if (a.mark < 0 || a.call.stream.isPaused()) a.mark = a.held;
      else if (a.held - a.mark < STALL_PROGRESS_BYTES) reset(a, stalled(a, stallMs));
      else a.mark = a.held;
    }
    for (const a of closing) {
      closeIfAnswered(a);
      if (!closing.has(a)) continue;
      if (a.mark < 0) a.mark = 0;
      else {
        closing.delete(a);
        a.call.stream.close(http2.NGHTTP2_ENHANCE_YOUR_CALM);
      }
    }
    scheduleCheck();
  }

  const interceptor: grpc.ServerInterceptor = (method, call) => {
    // grpc-js passes the interceptors over one another, as the interface: the call goes on as it is.
    const followed = call as grpc.ServerInterceptingCall;
    if (!(call instanceof baseCall)) {
      // Another interceptor came first (server credentials can bring some): grpc-js's call is
      // out of reach, and so is its stream.
      if (!unfollowed) {
        unfollowed = true;
        log.warn({ method: method.path }, "request streams are not bounded: the call is not grpc-js's own");
      }
      return followed;
    }
    const a: Arrival = {
      call: call as unknown as BaseCallShape,
      method: method.path,
      parts: undefined,
      seen: 0,
      buffers: undefined,
      retained: 0,
      held: 0,
      size: 0,
      mark: -1,
      reset: false,
    };
    // grpc-js's own listeners were added when the call was made: this one sees each chunk
    // after the decoder took it in.
    a.call.stream.on("data", () => received(a));
    a.call.stream.once("close", () => {
      forget(a);
      closing.delete(a);
    });
    return followed;
  };

  return {
    interceptor,
    get heldBytes() {
      return heldBytes;
    },
    hold(bytes) {
      if (bytes > SMALL_PARTIAL_BYTES && heldBytes + bytes > maxBytes) return undefined;
      heldBytes += bytes;
      let held = true;
      return () => {
        if (held) heldBytes -= bytes;
        held = false;
      };
    },
    close() {
      closed = true;
      clearTimeout(checkTimer);
      checkTimer = undefined;
    },
  };
}

function overBudget(a: Arrival, heldBytes: number, maxBytes: number): LeaseholdError {
  return new LeaseholdError(
    Code.ResourceExhausted,
    `the server holds ${mib(heldBytes)} for request messages still arriving, past its limit of ${mib(maxBytes)}; retry later (this message: ${a.held} of ${a.size} bytes came)`,
    { reason: "PARTIAL_REQUESTS_OVER_BUDGET", metadata: { limit_bytes: String(maxBytes) } },
  );
}

function stalled(a: Arrival, stallMs: number): LeaseholdError {
  return new LeaseholdError(
    Code.ResourceExhausted,
    a.size > 0
      ? `the request message stopped arriving: ${a.held} of its ${a.size} bytes came, and less than ${STALL_PROGRESS_BYTES} bytes more in ${stallMs} ms`
      : `the request message stopped arriving: its 5-byte prefix did not come whole in ${stallMs} ms`,
    { reason: "REQUEST_STALLED" },
  );
}

/** Only logged: the call already has its status. */
function endedEarly(): LeaseholdError {
  return new LeaseholdError(Code.ResourceExhausted, "the call ended while its request message was arriving", {
    reason: "CALL_ENDED",
  });
}

/**
 * grpc-js's `BaseServerInterceptingCall`, if it and a fresh `StreamDecoder`
 * have the shape this module reads; else undefined.
 */
function baseCallClass(): (abstract new (...args: never[]) => unknown) | undefined {
  try {
    const require = createRequire(import.meta.url);
    const { BaseServerInterceptingCall } = require("@grpc/grpc-js/build/src/server-interceptors.js");
    const { StreamDecoder } = require("@grpc/grpc-js/build/src/stream-decoder.js");
    const probe = new StreamDecoder(-1) as Partial<DecoderShape>;
    const proto = BaseServerInterceptingCall?.prototype;
    const shaped =
      probe.readState === NO_DATA &&
      "readCompressFlag" in probe &&
      typeof probe.readMessageSize === "number" &&
      typeof probe.readMessageRemaining === "number" &&
      Array.isArray(probe.readPartialMessage) &&
      typeof proto?.sendStatus === "function" &&
      typeof proto.getPeer === "function";
    return shaped ? BaseServerInterceptingCall : undefined;
  } catch {
    return undefined;
  }
}
