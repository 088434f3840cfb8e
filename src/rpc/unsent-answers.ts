import { constants as http2, type ServerHttp2Stream } from "node:http2";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import { DEFAULT_REQUEST_STALL_MS, STALL_PROGRESS_BYTES } from "./partial-requests.js";
import { perSecond } from "./per-second.js";

/** Default of `UnsentAnswerOptions.maxBytes`: 256 MiB. */
export const DEFAULT_UNSENT_ANSWER_BYTES = 256 * 1024 * 1024;

/**
 * A unary answer of at most this many bytes is always sent (it is counted
 * all the same): the answers of calls that change something (a bulk
 * submit's 1,000 ids take 40 KB) and of health checks are never refused for
 * the budget, which only the large pages of reads can fill.
 */
export const SMALL_ANSWER_BYTES = 128 * 1024;

/** Options of {@link createUnsentAnswerLimit}. */
export interface UnsentAnswerOptions {
  readonly log: Logger;
  /**
   * Bytes of unary answers the process holds for calls whose HTTP/2 stream
   * has not closed (the answer, or its end, is not sent yet), across all
   * connections. A unary answer that would take the total past it is not
   * sent: the call ends RESOURCE_EXHAUSTED (reason ANSWERS_OVER_BUDGET),
   * unless it takes at most {@link SMALL_ANSWER_BYTES}. Default
   * {@link DEFAULT_UNSENT_ANSWER_BYTES}.
   */
  readonly maxBytes?: number | undefined;
  /**
   * A call (unary or server stream) whose sent messages wait for the
   * transport and make no progress for this long is reset (checked once a
   * period: it goes one to two periods after it stalled). Default
   * `DEFAULT_REQUEST_STALL_MS` (30 s), the bound on requests that stop arriving.
   */
  readonly stallMs?: number | undefined;
}

/** Bounds on what clients that do not read their answers make the server hold. */
export interface UnsentAnswerLimit {
  /** Follows the HTTP/2 stream of every call: put it in the grpc-js server's `interceptors`, where it gets grpc-js's own call. */
  readonly interceptor: grpc.ServerInterceptor;
  /** Bytes of unary answers held now, as the budget counts them. */
  readonly heldBytes: number;
  /**
   * Counts a unary answer of `bytes` for the call whose request metadata
   * these are, until its HTTP/2 stream closes; returns the error to end the
   * call with instead (nothing counted) when it would take the total past
   * the budget. A call the interceptor did not follow is not counted.
   */
  hold(metadata: grpc.Metadata, bytes: number): LeaseholdError | undefined;
  /** Stops the stall checks (the server is closing). Idempotent. */
  close(): void;
}

/** One call the limit follows. */
interface Followed {
  readonly stream: ServerHttp2Stream;
  readonly method: string;
  /** Bytes of its unary answer counted in the budget. */
  answerBytes: number;
  /** `stream.writableLength` at the last stall check; -1 when nothing waited then. */
  mark: number;
}

/** Log lines about resets per second at most; the rest are counted in the next line. */
const RESETS_LOGGED_PER_SECOND = 10;

const mib = (bytes: number) => `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;

/** The parts of grpc-js's `BaseServerInterceptingCall` (1.14) this module reads. */
interface BaseCallShape {
  readonly stream: ServerHttp2Stream;
  readonly metadata: grpc.Metadata;
}

const isBaseCall = (call: unknown): call is BaseCallShape => {
  const c = call as Partial<BaseCallShape>;
  return (
    c.metadata instanceof grpc.Metadata &&
    typeof c.stream?.once === "function" &&
    typeof c.stream.writableLength === "number"
  );
};

/**
 * Bounds what peers that do not read their answers make the server hold.
 * grpc-js hands an answer to HTTP/2 at once and HTTP/2 keeps it until the
 * client's flow-control window lets it go, with no bound and no timeout: a
 * client announcing a window of 0 that sent 1,536 ListActions calls on six
 * connections made the process hold 1,389 answers of 2 MB (2.9 GiB). Two
 * rules, as for request messages still arriving (partial-requests.ts):
 * - a budget across the process of unary answers whose stream has not
 *   closed: an answer that would take it past `maxBytes` is not sent, the
 *   call ends RESOURCE_EXHAUSTED (reason ANSWERS_OVER_BUDGET), unless the
 *   answer is small ({@link SMALL_ANSWER_BYTES});
 * - a stall bound: a unary call or server stream whose sent messages wait
 *   for the transport, none of them taken in `stallMs` while its connection
 *   sent less than {@link STALL_PROGRESS_BYTES} per such call, is reset
 *   (HTTP/2 ENHANCE_YOUR_CALM, which gRPC clients report as
 *   RESOURCE_EXHAUSTED; logged with reason ANSWER_STALLED), which lets go
 *   of its answer, its share of the budget and its address's open call.
 * Worker streams (bidirectional) are left to their own bounds (a stream
 * whose worker does not read is reset after half a grace period).
 */
export function createUnsentAnswerLimit(options: UnsentAnswerOptions): UnsentAnswerLimit {
  const { log } = options;
  const maxBytes = options.maxBytes ?? DEFAULT_UNSENT_ANSWER_BYTES;
  const stallMs = options.stallMs ?? DEFAULT_REQUEST_STALL_MS;
  const followed = new Set<Followed>();
  const byMetadata = new WeakMap<grpc.Metadata, Followed>();
  /** Bytes each connection had written at the last check. */
  const written = new WeakMap<object, number>();
  let heldBytes = 0;
  let checkTimer: NodeJS.Timeout | undefined;
  let closed = false;
  let unfollowed = false;
  const logLimited = perSecond(RESETS_LOGGED_PER_SECOND);

  const scheduleCheck = () => {
    if (checkTimer || closed || followed.size === 0) return;
    checkTimer = setTimeout(check, stallMs);
    checkTimer.unref();
  };

  /** Bytes the connection of `stream` has written to its socket (TLS records included). */
  const bytesWritten = (stream: ServerHttp2Stream): number | undefined => {
    const socket = stream.session?.socket as { bytesWritten?: unknown } | undefined;
    return typeof socket?.bytesWritten === "number" ? socket.bytesWritten : undefined;
  };

  const reset = (f: Followed, waiting: number) => {
    followed.delete(f);
    f.stream.close(http2.NGHTTP2_ENHANCE_YOUR_CALM);
    logLimited((suppressed) =>
      log.warn(
        {
          method: f.method,
          peer: `${f.stream.session?.socket?.remoteAddress ?? "unknown"}`,
          reason: "ANSWER_STALLED",
          unsentBytes: waiting,
          ...(suppressed > 0 ? { suppressedBefore: suppressed } : {}),
        },
        `reset a call of ${f.method}: its client took none of its answer (${waiting} bytes) in ${stallMs} ms`,
      ),
    );
  };

  function check() {
    checkTimer = undefined;
    /** Calls whose messages waited a whole period with none taken, by connection. */
    const stalled = new Map<object, Followed[]>();
    for (const f of followed) {
      const waiting = f.stream.writableLength;
      if (waiting === 0) f.mark = -1;
      else if (f.mark < 0 || waiting < f.mark) f.mark = waiting;
      else if (f.stream.session) {
        const on = stalled.get(f.stream.session) ?? [];
        on.push(f);
        stalled.set(f.stream.session, on);
      }
    }
    for (const [session, calls] of stalled) {
      // A large answer is taken whole: while its client reads it (a slow link), only the
      // connection's bytes move.
      const now = calls[0] ? bytesWritten(calls[0].stream) : undefined;
      const before = written.get(session);
      const moved = now === undefined || before === undefined ? Number.POSITIVE_INFINITY : now - before;
      if (moved >= STALL_PROGRESS_BYTES * calls.length) continue;
      for (const f of calls) reset(f, f.stream.writableLength);
    }
    for (const f of followed) {
      const session = f.stream.session;
      const now = bytesWritten(f.stream);
      if (session && now !== undefined) written.set(session, now);
    }
    scheduleCheck();
  }

  const interceptor: grpc.ServerInterceptor = (method, call) => {
    // grpc-js passes the interceptors over one another, as the interface: the call goes on as it is.
    const same = call as grpc.ServerInterceptingCall;
    if (method.requestStream && method.responseStream) return same;
    if (!isBaseCall(call)) {
      if (!unfollowed) {
        unfollowed = true;
        log.warn({ method: method.path }, "unsent answers are not bounded: the call is not grpc-js's own");
      }
      return same;
    }
    const f: Followed = { stream: call.stream, method: method.path, answerBytes: 0, mark: -1 };
    followed.add(f);
    byMetadata.set(call.metadata, f);
    call.stream.once("close", () => {
      followed.delete(f);
      heldBytes -= f.answerBytes;
      f.answerBytes = 0;
    });
    scheduleCheck();
    return same;
  };

  return {
    interceptor,
    get heldBytes() {
      return heldBytes;
    },
    hold(metadata, bytes) {
      const f = byMetadata.get(metadata);
      if (!f || f.stream.closed) return undefined;
      if (bytes > SMALL_ANSWER_BYTES && heldBytes + bytes > maxBytes) {
        logLimited((suppressed) =>
          log.warn(
            {
              method: f.method,
              reason: "ANSWERS_OVER_BUDGET",
              answerBytes: bytes,
              heldBytes,
              limitBytes: maxBytes,
              ...(suppressed > 0 ? { suppressedBefore: suppressed } : {}),
            },
            `an answer of ${f.method} was not sent: the answers clients have not read hold ${mib(heldBytes)}, the most the server keeps`,
          ),
        );
        return new LeaseholdError(
          Code.ResourceExhausted,
          `the server holds ${mib(heldBytes)} of answers its clients have not read, past its limit of ${mib(maxBytes)} ` +
            `with this one (${bytes} bytes): it was not sent, and what the call did stands; retry the read later, ` +
            "or ask for smaller pages",
          { reason: "ANSWERS_OVER_BUDGET", metadata: { limit_bytes: String(maxBytes) } },
        );
      }
      f.answerBytes += bytes;
      heldBytes += bytes;
      return undefined;
    },
    close() {
      closed = true;
      clearTimeout(checkTimer);
      checkTimer = undefined;
    },
  };
}
