import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import type { Logger } from "pino";
import { permissionDenied } from "../../auth/access.js";
import { Code, type FieldViolation, LeaseholdError, quote } from "../../errors.js";
import {
  type ConnectRequest,
  type ConnectRequestBatch,
  ConnectRequestSchema,
  ConnectResponseSchema,
  type Hello,
  RejectReason,
  RevokeReason,
  WorkerService,
} from "../../gen/leasehold/v1/worker_pb.js";
import {
  type HelloInput,
  WORKER_ID_IN_USE,
  WORKER_IN_OTHER_CLUSTER,
} from "../../store/queries/open-session.js";
import type { JsonObject } from "../../work/action.js";
import { createGate } from "../../work/gate.js";
import {
  DEFAULT_GRANT_HIGH_WATER_BYTES,
  type LeaseManager,
  type SessionHandle,
} from "../../work/lease-manager.js";
import type { LeaseToken, ServerMessage, WorkerLink, WorkerMessage } from "../../work/worker-messages.js";
import { type FastDecoders, READ_PAUSE_MESSAGES } from "../adapter.js";
import { charactersOver, MAX_BATCH_MESSAGES, MAX_CAPACITY } from "../limits.js";
import { DEFAULT_REQUEST_STALL_MS } from "../partial-requests.js";
import { decodeMendingStrings, RejectedRequest, requestDecoder } from "../request-decoder.js";
import { requestValidator, violationError } from "../request-validator.js";
import { bind, type ServiceBinding } from "../server.js";
import { checkWorkerNames, Violations } from "../validate.js";
import {
  batchRuns,
  decodeBareHeartbeat,
  decodeWorkerReports,
  encodeGrant,
  encodeHeartbeatAck,
  encodeReportResult,
  encodeResponseBatch,
} from "../worker-wire.js";

/** Flow-control and admission limits of worker streams; every field has a default. */
export interface WorkerStreamLimits {
  /**
   * The lease manager's grant high-water mark (`grantHighWaterBytes`): when a
   * stream's outbound buffer falls under it, grants to it go on. Default 1 MiB.
   */
  readonly grantHighWaterBytes?: number;
  /**
   * A stream whose outbound buffer stays at or above the grant high-water
   * mark this long (its worker does not read) is reset (ENHANCE_YOUR_CALM,
   * RESOURCE_EXHAUSTED to gRPC clients) and counts as a lost stream: its session enters grace
   * and the worker may reconnect and resume it. The server passes half its
   * grace period unless told otherwise: the heartbeats it stopped reading
   * renewed nothing, so a whole one left the session expired at the end.
   */
  readonly stalledStreamMs: number;
  /**
   * A stream whose outbound buffer passes this many bytes is ended at once,
   * the same way (a worker that sends requests and reads none of the
   * answers). Default {@link DEFAULT_MAX_BUFFERED_BYTES}.
   */
  readonly maxBufferedBytes?: number;
  /**
   * Hellos processed at once: each opens or resumes a session in the
   * database, those that arrive together in one transaction (up to 256).
   * Heartbeats of open streams never wait for them (they are answered from
   * memory). Default {@link DEFAULT_MAX_CONCURRENT_OPENS}.
   */
  readonly maxConcurrentOpens?: number;
  /**
   * Hellos waiting for one of those; past it a hello is answered
   * RESOURCE_EXHAUSTED (reason TOO_MANY_HELLOS) and its worker retries with
   * backoff. Default {@link DEFAULT_MAX_QUEUED_OPENS}.
   */
  readonly maxQueuedOpens?: number;
  /**
   * A stream whose first message (the hello) has not come this long after
   * the handler started reading it ends RESOURCE_EXHAUSTED (reason
   * HELLO_TIMEOUT): a stream that never says hello holds about 15 KiB, and
   * a peer may open 256 per connection. Default
   * {@link DEFAULT_HELLO_TIMEOUT_MS}.
   */
  readonly helloTimeoutMs?: number;
}

/** Default of `WorkerStreamLimits.maxBufferedBytes`: 16 MiB. */
export const DEFAULT_MAX_BUFFERED_BYTES = 16 * 1024 * 1024;
/** Default of `WorkerStreamLimits.maxConcurrentOpens`. */
export const DEFAULT_MAX_CONCURRENT_OPENS = 512;
/** Default of `WorkerStreamLimits.maxQueuedOpens`. */
export const DEFAULT_MAX_QUEUED_OPENS = 256;
/**
 * Default of `WorkerStreamLimits.helloTimeoutMs`: the bound a request message
 * that stops arriving has (partial-requests.ts), so neither way of sending
 * nothing holds a stream longer than the other.
 */
export const DEFAULT_HELLO_TIMEOUT_MS = DEFAULT_REQUEST_STALL_MS;
/** How long a refused hello is told to wait before it tries again. */
const RETRY_HELLO_MS = 1000;
/**
 * Most bytes of messages put in one ConnectResponse batch (a message larger
 * than this goes alone): well under the 4 MiB a gRPC client receives by
 * default.
 */
const MAX_RESPONSE_BATCH_BYTES = 1024 * 1024;

/**
 * Refusals of a hello for what the database holds about its worker
 * (open-session.ts). SESSION_OWNED_BY_OTHER is not among them: a
 * PERMISSION_DENIED, it is logged with every refused call (`refusalLogger`).
 */
const LOGGED_REFUSALS: ReadonlySet<string> = new Set([WORKER_ID_IN_USE, WORKER_IN_OTHER_CLUSTER]);
/** A worker refused again for the same reason within this time is not logged again. */
const REFUSAL_LOG_EVERY_MS = 60_000;
/** Workers whose last refusal is remembered, at most: a flood of new worker ids cannot grow it further. */
const REFUSALS_REMEMBERED = 10_000;

/**
 * Logs a hello refused for what the database holds about its worker: a
 * worker id another process is connected with, a live session in another
 * cluster. The worker learns why from the
 * stream's status; the operator, from this line. One line per worker and
 * reason a minute: a worker that retries with backoff writes one.
 */
function refusalLog(log: Logger): (hello: HelloInput, principal: string, error: unknown) => void {
  const lastLogged = new Map<string, number>();
  return (hello, principal, error) => {
    if (!(error instanceof LeaseholdError) || !LOGGED_REFUSALS.has(error.reason ?? "")) return;
    const key = `${error.reason}\0${hello.workerId}`;
    const now = performance.now();
    const last = lastLogged.get(key);
    if (last !== undefined && now - last < REFUSAL_LOG_EVERY_MS) return;
    if (lastLogged.size >= REFUSALS_REMEMBERED) lastLogged.clear();
    lastLogged.set(key, now);
    log.info(
      { workerId: hello.workerId, cluster: hello.cluster, principal, reason: error.reason },
      `hello of worker ${hello.workerId} refused: ${error.message}`,
    );
  };
}

/** The WorkerService.Connect handler over the lease manager. */
export function workerServiceBinding(
  leases: LeaseManager,
  log: Logger,
  limits: WorkerStreamLimits,
): ServiceBinding {
  const highWater = limits.grantHighWaterBytes ?? DEFAULT_GRANT_HIGH_WATER_BYTES;
  const maxBuffered = limits.maxBufferedBytes ?? DEFAULT_MAX_BUFFERED_BYTES;
  const opens = createGate(limits.maxConcurrentOpens ?? DEFAULT_MAX_CONCURRENT_OPENS, {
    queueLimit: limits.maxQueuedOpens ?? DEFAULT_MAX_QUEUED_OPENS,
    full: () =>
      new LeaseholdError(
        Code.ResourceExhausted,
        `too many workers are connecting at once; try again in ${RETRY_HELLO_MS} ms`,
        { reason: "TOO_MANY_HELLOS", metadata: { retry_after_ms: String(RETRY_HELLO_MS) } },
      ),
    cancelled: () => new LeaseholdError(Code.Canceled, "the stream ended while its hello waited"),
  });
  const flusher = createFlusher(log);
  const refused = refusalLog(log);
  const helloTimeoutMs = limits.helloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS;
  return bind(WorkerService, {
    async connect(stream, ctx) {
      const requests = stream.requests[Symbol.asyncIterator]();
      const first = await firstRequest(requests, helloTimeoutMs);
      if (first.done || first.value.message.case !== "hello") {
        // A report that breaks the checks (answered INVALID on a welcomed stream) is refused here as such.
        const refused = first.done
          ? undefined
          : (validateConnectRequest(first.value) ?? badStringsOf(first.value));
        if (refused) throw refused;
        throw LeaseholdError.invalidArgument(
          "message",
          `the first message on Connect must be a hello (got ${first.done ? "end of stream" : (first.value.message.case ?? "an empty message")})`,
        );
      }
      const hello = toHelloInput(first.value.message.value);
      const acceptsBatches = first.value.message.value.acceptsBatches;
      if (!ctx.access.mayRunWorker(hello.cluster, hello.workerId)) {
        throw permissionDenied(
          ctx.access.actor,
          "worker.connect",
          `for worker ${quote(hello.workerId)} in cluster ${quote(hello.cluster)} ` +
            "(the cluster or the worker id is outside what its role bindings allow)",
          { cluster: hello.cluster, worker_id: hello.workerId },
        );
      }

      // The lease manager closes the stream on takeover, reap or goodbye;
      // the adapter ends `requests` when the client goes or the server stops.
      let closeError: Error | undefined;
      let session: SessionHandle | undefined;
      let stalled: NodeJS.Timeout | undefined;
      /** Ends a stream whose worker does not read: RESOURCE_EXHAUSTED, and the session enters grace. */
      let reset = false;
      const exhausted = (why: string) => {
        if (reset) return;
        reset = true;
        clearTimeout(stalled);
        closeError = new LeaseholdError(Code.ResourceExhausted, why, { reason: "STREAM_NOT_READ" });
        log.warn(
          { workerId: hello.workerId, sessionId: session?.sessionId, bufferedBytes: held() },
          `ending the stream of worker ${hello.workerId}: ${why}`,
        );
        drop();
        stream.reset();
      };
      // What the lease manager sends waits here until the end of the current
      // turn of the event loop, then goes out in one write (one batch when the
      // worker takes them), so a burst of answers costs one write, not one each.
      const queued: Uint8Array[] = [];
      let queuedBytes = 0;
      /** The handler finished or the stream was reset: nothing more is written. */
      let finished = false;
      /**
       * Bytes this stream holds that the worker has not read: queued, or
       * buffered in the transport. Kept as a number (recounted on every send,
       * flush and transport write) because the lease manager asks every
       * stream for it on every dispatch.
       */
      let heldBytes = 0;
      const held = () => heldBytes;
      const recount = () => {
        heldBytes = stream.bufferedBytes + queuedBytes;
      };
      /** Runs after every send and every flush: the buffer's size decides. */
      const watch = () => {
        recount();
        if (reset) return;
        const bytes = heldBytes;
        if (bytes > maxBuffered) {
          exhausted(`its outbound buffer passed ${maxBuffered} bytes; the worker is not reading`);
        } else if (bytes >= highWater || stream.readingHeld) {
          stalled ??= setTimeout(
            () =>
              exhausted(
                `its outbound buffer stayed over ${highWater} bytes or ${READ_PAUSE_MESSAGES} messages for ${limits.stalledStreamMs} ms; the worker is not reading`,
              ),
            limits.stalledStreamMs,
          );
        } else {
          clearTimeout(stalled);
          stalled = undefined;
          session?.writable();
        }
      };
      /** Writes what is queued: one batch per run of up to 1024 messages and 1 MiB, if the worker takes batches. */
      const flush = () => {
        if (queued.length === 0 || finished) return;
        if (acceptsBatches && queued.length > 1) writeBatches(queued);
        else for (const bytes of queued) stream.sendBinary(bytes);
        queued.length = 0;
        queuedBytes = 0;
        // The bytes moved from the queue to the transport's buffer, but these writes may have held
        // the reading back (too many messages unread): the stall bound starts now if so.
        watch();
      };
      const writeBatches = (messages: readonly Uint8Array[]) =>
        batchRuns(messages, MAX_BATCH_MESSAGES, MAX_RESPONSE_BATCH_BYTES, (run) =>
          stream.sendBinary(run.length === 1 ? (run[0] as Uint8Array) : encodeResponseBatch(run)),
        );
      // A flush already scheduled finds nothing to do after these.
      const drop = () => {
        finished = true;
        queued.length = 0;
        queuedBytes = 0;
        recount();
      };
      /** Stops writing: what is queued goes out first. */
      const finish = () => {
        flush();
        finished = true;
      };
      let linkClosed = false;
      const offFlushed = stream.onFlushed(watch);
      const link: WorkerLink = {
        send: (message) => {
          if (finished) return;
          const bytes = encodeResponse(message);
          if (message.type === "welcome") {
            // Never part of a batch: whatever came before it goes first, then the welcome alone.
            flush();
            stream.sendBinary(bytes);
          } else {
            // Scheduled once per turn: by the first message queued in it. A turn that queues
            // a batch's worth writes it at once: the transport's count of unread messages then
            // stops the reading of a worker that sends without reading within this turn.
            const n = queued.push(bytes);
            queuedBytes += bytes.byteLength;
            if (n === 1) flusher.schedule(flush);
            else if (n >= MAX_BATCH_MESSAGES) flush();
          }
          watch();
        },
        close: (error) => {
          // What was sent before the close reaches the worker before the stream's status.
          linkClosed = true;
          flush();
          closeError = error;
          stream.stop();
        },
        bufferedBytes: held,
        throttle: stream.throttle,
      };

      try {
        const release = await opens.enter(ctx.signal);
        try {
          // The session belongs to this principal; another's session for the same worker id is
          // refused inside the open (SESSION_OWNED_BY_OTHER), atomically with the takeover.
          session = await leases.open(hello, link, ctx.access.actor, (cluster) =>
            ctx.access.mayRunWorker(cluster, hello.workerId),
          );
        } catch (error) {
          refused(hello, ctx.access.actor, error);
          throw error;
        } finally {
          release();
        }
        const open = session;
        const maxHeld = maxHeldLeases(hello.capacity, open.heldAtOpen);
        /** A goodbye was handled: nothing more is read from the stream. */
        let saidGoodbye = false;
        const deliver = (message: WorkerMessage | Invalid) => {
          if (message.type === "invalid") {
            open.heard();
            link.send({
              type: "report_result",
              reportId: message.reportId,
              actionId: message.actionId,
              // Echoed when it can be: a refused report's epoch may be out of range.
              epoch: message.epoch <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(message.epoch) : 0,
              accepted: false,
              rejectReason: "INVALID",
              message: message.message,
            });
            return;
          }
          // Reports need no principal check: this stream's session is the principal's (the hello
          // checked it), and reports are fenced by (action, epoch, session).
          open.receive(message);
          if (message.type === "goodbye") {
            // The last message read (worker.proto, Goodbye): what follows it, in its batch or
            // after, is neither applied nor answered, and cannot change how the stream ends.
            saidGoodbye = true;
            stream.stop();
          }
        };
        /**
         * The reports handled so far are answered before the stream ends: the worker half-closed
         * (every message it sent before was handled), or a message ended the stream.
         */
        let answerFirst = false;
        try {
          // Each message is handled synchronously as it arrives (no promise per message: at
          // 10,000 streams heartbeats are most of what this process does). What throws (a
          // batch wrong as a whole, a heartbeat listing too many leases) ends the stream.
          await stream.consume((request) => {
            if (request.message.case !== "batch") {
              deliver(toWorkerMessage(request, maxHeld, ""));
              return;
            }
            // The whole batch is checked before any of it is handled; then each message is
            // handled in order, as if it came alone (none after the stream was closed).
            const messages = toWorkerMessages(request.message.value, maxHeld);
            for (const message of messages) {
              if (linkClosed || saidGoodbye || ctx.signal.aborted) break;
              deliver(message);
            }
          });
          answerFirst = stream.halfClosed && !linkClosed && !ctx.signal.aborted;
        } catch (error) {
          answerFirst = !linkClosed && !ctx.signal.aborted;
          throw error;
        } finally {
          // Ended by this server to move the stream elsewhere: recorded as such, not as a loss.
          const rebalanced = closeError instanceof LeaseholdError && closeError.reason === "REBALANCING";
          // Ended by this server for another reason (its shutdown, a worker not reading): said in
          // the event, so that it does not read like the worker's crash or a network cut.
          const ending = closeError ?? (ctx.signal.aborted ? ctx.signal.reason : undefined);
          const endedBy = ending instanceof LeaseholdError ? ending.reason : undefined;
          await session.streamEnded({
            answerFirst,
            signal: ctx.signal,
            rebalanced,
            ...(endedBy ? { endedBy } : {}),
          });
        }
      } finally {
        offFlushed();
        clearTimeout(stalled);
        if (!reset) finish();
        // A status sent the ordinary way waits behind the buffer; a worker not reading never gets it.
        if (!reset && (stream.bufferedBytes >= highWater || stream.readingHeld)) {
          stream.reset();
        }
      }
      if (closeError) throw closeError;
    },
  });
}

/** The stream's first request; RESOURCE_EXHAUSTED (HELLO_TIMEOUT) if none comes within `timeoutMs`. */
async function firstRequest(
  requests: AsyncIterator<ConnectRequest>,
  timeoutMs: number,
): Promise<IteratorResult<ConnectRequest>> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new LeaseholdError(
            Code.ResourceExhausted,
            `no hello came in the ${timeoutMs} ms after the stream opened: send the hello as the first message, within ${timeoutMs} ms`,
            { reason: "HELLO_TIMEOUT", metadata: { timeout_ms: String(timeoutMs) } },
          ),
        ),
      timeoutMs,
    );
  });
  try {
    return await Promise.race([requests.next(), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

const validateConnectRequest = requestValidator(ConnectRequestSchema);
const decodeInFull = requestDecoder(ConnectRequestSchema);

/**
 * Most of what a worker stream carries is bare heartbeats, completions and
 * grant acks: decoded without protobuf-es (worker-wire.ts). A decoded report
 * still goes through the request validator; one it refuses is decoded again
 * the ordinary way, which answers it as before.
 */
function decodeConnectRequest(bytes: Buffer): object {
  const heartbeat = decodeBareHeartbeat(bytes);
  if (heartbeat) return heartbeat;
  const reports = decodeWorkerReports(bytes);
  if (reports && validateConnectRequest(reports) === undefined) return reports;
  const decoded = decodeInFull(bytes);
  if (!(decoded instanceof RejectedRequest)) return decoded as object;
  return decoded.message === undefined ? refuseBadStrings(bytes, decoded) : refuseReportsOnly(decoded);
}

/** The messages a report can be (worker.proto: ReportResult answers them). */
const REPORTS: ReadonlySet<ConnectRequest["message"]["case"]> = new Set([
  "grantAck",
  "progress",
  "completion",
  "release",
]);

/**
 * Reports whose fields break the checks, with what is wrong (field paths
 * within the report): {@link toWorkerMessage} answers each with a
 * ReportResult INVALID, and the stream goes on.
 */
const refusedReports = new WeakMap<ConnectRequest, readonly FieldViolation[]>();

/**
 * A request that failed the checks, when only reports in it did: the request,
 * each of those reports marked in {@link refusedReports}. Ending the stream
 * instead made a worker that follows the contract (a completion unanswered
 * is sent again on the next stream) end every stream it opened, its action
 * LEASED for as long as it tried: a failure message with a NUL from a
 * command's stderr was enough. Anything else that fails (a heartbeat, a
 * hello, a batch's own fields, a message that could not be decoded) still
 * ends the stream.
 */
function refuseReportsOnly(rejected: RejectedRequest): object {
  const request = rejected.message as ConnectRequest | undefined;
  const m = request?.message;
  if (!request || !m?.case) return rejected;
  if (REPORTS.has(m.case)) {
    refusedReports.set(request, rejected.error.fieldViolations);
    return request;
  }
  if (m.case !== "batch") return rejected;
  let refused = 0;
  for (const inner of m.value.messages) {
    const error = validateConnectRequest(inner);
    if (!error) continue;
    if (!REPORTS.has(inner.message.case)) return rejected;
    refusedReports.set(inner, error.fieldViolations);
    refused++;
  }
  return refused > 0 ? request : rejected;
}

/**
 * A request that could not be decoded, when the only reason is strings of
 * invalid UTF-8 in reports: the request, each of those reports marked in
 * {@link refusedReports} (naming the string's field) like a report that
 * breaks a limit. protobuf-es fails the whole request on any such string, and
 * a failure message cut from a command's output in the middle of a character
 * would otherwise end every stream that sent it again. Runs only for a
 * request that failed to decode.
 */
function refuseBadStrings(bytes: Buffer, rejected: RejectedRequest): object {
  const mended = decodeMendingStrings(ConnectRequestSchema, bytes);
  if (!mended) return rejected;
  const request = mended.message as ConnectRequest;
  const bad = new Map<ConnectRequest, FieldViolation[]>();
  for (const field of mended.badStrings) {
    // Paths within a batch start with the message's place in it; refused reports' paths do not.
    const inBatch = /^batch\.messages\[(\d+)\]\.(.+)$/.exec(field);
    const report =
      inBatch && request.message.case === "batch"
        ? request.message.value.messages[Number(inBatch[1])]
        : request;
    if (!report || !REPORTS.has(report.message.case)) {
      // Named itself: the decoder's error names the first bad string, maybe a report's.
      return new RejectedRequest(violationError([{ field, description: "is not valid UTF-8" }]));
    }
    const violations = bad.get(report) ?? [];
    violations.push({ field: inBatch?.[2] ?? field, description: "is not valid UTF-8" });
    bad.set(report, violations);
  }
  // The rest is checked as any request is: a heartbeat that breaks a limit still ends the stream.
  const invalid = validateConnectRequest(request);
  if (invalid) {
    const checked = refuseReportsOnly(new RejectedRequest(invalid, request));
    if (checked !== request) return checked;
  }
  for (const [report, violations] of bad) {
    refusedReports.set(report, [...violations, ...(refusedReports.get(report) ?? [])]);
  }
  return request;
}

/**
 * The strings of invalid UTF-8 in the reports of a request read around them
 * (see {@link refuseBadStrings}), as an error naming them; undefined if none.
 * For a report sent before the hello: the stream ends naming the field, as
 * it does for a report that breaks a limit.
 */
function badStringsOf(request: ConnectRequest): LeaseholdError | undefined {
  const m = request.message;
  const found =
    m.case === "batch"
      ? m.value.messages.flatMap((inner, i) =>
          (refusedReports.get(inner) ?? []).map((v) => ({ ...v, field: `batch.messages[${i}].${v.field}` })),
        )
      : (refusedReports.get(request) ?? []);
  return found.length > 0 ? LeaseholdError.invalidFields(found) : undefined;
}

/** The composition root gives these to the binding it registers. */
export const WORKER_FAST_DECODERS: FastDecoders = { connect: decodeConnectRequest };

/**
 * Runs the flushes of every stream that queued messages once per turn of the
 * event loop, from one `setImmediate` (after the I/O callbacks of the turn
 * that queued them), so each stream writes what it has in one go.
 */
function createFlusher(log: Logger) {
  // Two arrays used in turn: flushes scheduled while a run goes (a flush that frees room lets
  // the lease manager send grants) wait for the next turn.
  let due: (() => void)[] = [];
  let running: (() => void)[] = [];
  let scheduled = false;
  const run = () => {
    scheduled = false;
    const list = due;
    due = running;
    running = list;
    for (let i = 0; i < list.length; i++) {
      try {
        (list[i] as () => void)();
      } catch (error) {
        // One stream's failed write must not cost the others theirs (nor the process).
        log.error({ err: error }, "could not write to a worker stream");
      }
    }
    list.length = 0;
  };
  return {
    /** Runs `flush` at the end of this turn; a stream schedules itself once per turn. */
    schedule(flush: () => void): void {
      due.push(flush);
      if (!scheduled) {
        scheduled = true;
        setImmediate(run);
      }
    },
  };
}

/** The held leases of a heartbeat that lists none (most of them), shared. */
const NONE_HELD: readonly LeaseToken[] = Object.freeze([]);

/**
 * Most distinct leases a heartbeat may list: twice the larger of the
 * capacity and the leases the session held when the stream opened. The
 * session is granted nothing while it holds its capacity, so it never holds
 * more than the larger of the two; twice that, because a lease still
 * stopping after a revoke may overlap the grant that took its slot. A worker
 * back with a smaller capacity than its leases were granted under may list
 * them all. limits.ts bounds every list before this, at 20,000 entries: the
 * work one heartbeat or hello costs (a hello's leases are each looked up to
 * be resumed or revoked, so a hello may list that many whatever its
 * capacity: all the leases its worker holds).
 */
const maxHeldLeases = (capacity: number, heldAtOpen: number) => 2 * Math.max(capacity, heldAtOpen);

/** How many distinct (action_id, epoch) pairs `leases` holds: a lease listed twice counts once. */
function distinctLeases(leases: readonly { actionId: string; epoch: bigint }[]): number {
  return new Set(leases.map((l) => `${l.epoch}:${l.actionId}`)).size;
}

/** Validates a hello (every violation at once). */
export function toHelloInput(hello: Hello): HelloInput {
  const v = new Violations();
  checkWorkerNames(v, hello, {
    workerId: "hello.worker_id",
    cluster: "hello.cluster",
    labels: "hello.labels",
  });
  const capacity = hello.capacity;
  if (capacity < 1) v.add("hello.capacity", `must be at least 1 (got ${capacity})`);
  else if (capacity > MAX_CAPACITY)
    v.add("hello.capacity", `must be at most ${MAX_CAPACITY} (got ${capacity})`);
  // held_leases has no bound of its own here: limits.ts bounds it (see maxHeldLeases).
  hello.heldLeases.forEach((l, i) => {
    if (l.actionId === "") v.add(`hello.held_leases[${i}].action_id`, "is required");
    if (l.epoch === 0n) v.add(`hello.held_leases[${i}].epoch`, "must be the epoch of the grant (at least 1)");
  });
  if (charactersOver(hello.agentVersion, 256) !== undefined)
    v.add("hello.agent_version", "must be at most 256 characters");
  v.throwIfAny();
  return {
    workerId: hello.workerId,
    cluster: hello.cluster,
    capacity,
    labels: { ...hello.labels },
    agentVersion: hello.agentVersion,
    instanceId: hello.instanceId,
    heldLeases: uniqueLeases(hello.heldLeases),
    stopGrants: hello.stopGrants,
  };
}

/**
 * The hello's held leases, each (action, epoch) once: a lease listed twice is
 * still one lease, and the welcome names it once.
 */
function uniqueLeases(leases: readonly { actionId: string; epoch: bigint }[]): LeaseToken[] {
  const seen = new Set<string>();
  const unique: LeaseToken[] = [];
  for (const l of leases) {
    const key = `${l.epoch}:${l.actionId}`;
    if (seen.has(key)) continue;
    seen.add(key);
    unique.push({ actionId: l.actionId, epoch: Number(l.epoch) });
  }
  return unique;
}

/** A message answered with a ReportResult INVALID; `epoch` is the one the report carried (0 if none). */
type Invalid = { type: "invalid"; reportId: bigint; actionId: string; epoch: bigint; message: string };

/**
 * The messages of a batch, checked as a whole first: 1–1024 messages, none a
 * hello or a batch (INVALID_ARGUMENT, ending the stream), then each exactly
 * as if it came alone, its field paths under `batch.messages[i]`.
 */
function toWorkerMessages(batch: ConnectRequestBatch, maxHeld: number): (WorkerMessage | Invalid)[] {
  const v = new Violations();
  const count = batch.messages.length;
  if (count === 0) v.add("batch.messages", "must hold at least one message");
  else if (count > MAX_BATCH_MESSAGES)
    v.add("batch.messages", `must hold at most ${MAX_BATCH_MESSAGES} messages (got ${count})`);
  else {
    batch.messages.forEach((m, i) => {
      if (m.message.case === "hello")
        v.add(`batch.messages[${i}].hello`, "a hello is sent alone, as the first message of a stream");
      else if (m.message.case === "batch")
        v.add(`batch.messages[${i}].batch`, "batches do not nest: send its messages in the outer batch");
    });
  }
  v.throwIfAny();
  return batch.messages.map((m, i) => toWorkerMessage(m, maxHeld, `batch.messages[${i}].`));
}

/** A report must name its action and the epoch of its grant. */
function checkReport(
  field: string,
  report: { reportId: bigint; actionId: string; epoch: bigint },
): Invalid | undefined {
  if (report.actionId === "") {
    return {
      type: "invalid",
      reportId: report.reportId,
      actionId: "",
      epoch: report.epoch,
      message: `${field}.action_id: is required`,
    };
  }
  if (report.epoch === 0n) {
    return {
      type: "invalid",
      reportId: report.reportId,
      actionId: report.actionId,
      epoch: 0n,
      message: `${field}.epoch: must be the epoch of the grant (at least 1)`,
    };
  }
  return undefined;
}

/**
 * A worker message from a request; a heartbeat listing more than `maxHeld`
 * leases ends the stream. Field paths in errors start with `at` (the
 * message's place in a batch, or nothing).
 */
function toWorkerMessage(request: ConnectRequest, maxHeld: number, at: string): WorkerMessage | Invalid {
  const m = request.message;
  const refused = refusedReports.get(request);
  if (
    refused &&
    (m.case === "grantAck" || m.case === "progress" || m.case === "completion" || m.case === "release")
  ) {
    return {
      type: "invalid",
      reportId: m.value.reportId,
      actionId: m.value.actionId,
      epoch: m.value.epoch,
      message: refused.map((v) => `${at}${v.field}: ${v.description}`).join("; "),
    };
  }
  switch (m.case) {
    case "heartbeat":
      // Counted again without repeats only when the entries are too many (rare), not per heartbeat.
      if (m.value.heldLeases.length > maxHeld && distinctLeases(m.value.heldLeases) > maxHeld) {
        throw LeaseholdError.invalidArgument(
          `${at}heartbeat.held_leases`,
          `must list at most ${maxHeld} distinct leases (twice the larger of the capacity and the leases the session held when the stream opened; got ${distinctLeases(m.value.heldLeases)})`,
        );
      }
      return {
        type: "heartbeat",
        sequence: m.value.sequence,
        held:
          m.value.heldLeases.length === 0
            ? NONE_HELD
            : m.value.heldLeases.map((l) => ({ actionId: l.actionId, epoch: Number(l.epoch) })),
      };
    case "grantAck":
      return (
        checkReport(`${at}grant_ack`, m.value) ?? {
          type: "grant_ack",
          reportId: m.value.reportId,
          actionId: m.value.actionId,
          epoch: Number(m.value.epoch),
        }
      );
    case "progress":
      return (
        checkReport(`${at}progress`, m.value) ?? {
          type: "progress",
          reportId: m.value.reportId,
          actionId: m.value.actionId,
          epoch: Number(m.value.epoch),
          phase: m.value.phase,
          details: m.value.details as JsonObject | undefined,
          checkpoint: m.value.checkpoint as JsonObject | undefined,
        }
      );
    case "completion": {
      const invalid = checkReport(`${at}completion`, m.value);
      if (invalid) return invalid;
      const outcome = m.value.outcome;
      if (outcome.case === undefined) {
        return {
          type: "invalid",
          reportId: m.value.reportId,
          actionId: m.value.actionId,
          epoch: m.value.epoch,
          message: `${at}completion.outcome: set succeeded or failed`,
        };
      }
      return {
        type: "completion",
        reportId: m.value.reportId,
        actionId: m.value.actionId,
        epoch: Number(m.value.epoch),
        traceParent: m.value.traceParent || undefined,
        outcome:
          outcome.case === "succeeded"
            ? { kind: "succeeded", output: outcome.value.output as JsonObject | undefined }
            : {
                kind: "failed",
                message: outcome.value.message,
                retryable: outcome.value.retryable,
                details: outcome.value.details as JsonObject | undefined,
              },
      };
    }
    case "release":
      return (
        checkReport(`${at}release`, m.value) ?? {
          type: "release",
          reportId: m.value.reportId,
          actionId: m.value.actionId,
          epoch: Number(m.value.epoch),
          reason: m.value.reason,
          selfFenced: m.value.selfFenced,
        }
      );
    case "goodbye":
      return { type: "goodbye", reason: m.value.reason };
    case "stopGrants":
      return { type: "stop_grants", reason: m.value.reason };
    case "hello":
      return {
        type: "invalid",
        reportId: 0n,
        actionId: "",
        epoch: 0n,
        message: `${at}hello: send it only as the first message`,
      };
    default:
      return {
        type: "invalid",
        reportId: 0n,
        actionId: "",
        epoch: 0n,
        message: `${at}message: set one of the ConnectRequest fields`,
      };
  }
}

type Response = MessageInitShape<typeof ConnectResponseSchema>;

/**
 * Largest grant sent with its checkpoint (worker.proto, Grant.checkpoint): payloads and
 * checkpoints are bounded in characters, and of 3-byte characters the two together could pass a
 * client's default 4 MiB receive limit. Such a grant was refused by the agent's client on every
 * reconnect, for as long as the lease lasted.
 */
export const MAX_GRANT_BYTES = 3.5 * 1024 * 1024;

/** A server message in the binary format: a grant without its checkpoint if it is too large with it. */
function encodeResponse(m: ServerMessage): Uint8Array {
  const bytes = encodeMessage(m);
  if (m.type !== "grant" || !m.checkpoint || bytes.byteLength <= MAX_GRANT_BYTES) return bytes;
  return encodeMessage({ ...m, checkpoint: null });
}

/** A server message in the binary format; heartbeat acks, grants and report results take a fast path. */
function encodeMessage(m: ServerMessage): Uint8Array {
  const fast =
    m.type === "heartbeat_ack"
      ? m.databaseUnreachable
        ? undefined
        : encodeHeartbeatAck(m.sequence, m.remainingMs)
      : m.type === "grant"
        ? encodeGrant(m)
        : m.type === "report_result"
          ? encodeReportResult(m)
          : undefined;
  if (fast) return fast;
  return toBinary(ConnectResponseSchema, create(ConnectResponseSchema, toConnectResponse(m)));
}

/** A server message as a ConnectResponse, for protobuf-es (the path every message can take). */
export function toConnectResponse(m: ServerMessage): Response {
  switch (m.type) {
    case "welcome":
      return {
        message: {
          case: "welcome",
          value: {
            sessionId: m.sessionId,
            heartbeatInterval: durationFromMs(m.heartbeatIntervalMs),
            gracePeriod: durationFromMs(m.gracePeriodMs),
            resumed: m.resumed.map((l) => ({ actionId: l.actionId, epoch: BigInt(l.epoch) })),
            revoked: m.revoked.map((l) => ({ actionId: l.actionId, epoch: BigInt(l.epoch) })),
            sessionResumed: m.sessionResumed,
            serverId: m.serverId,
            // This layer takes ConnectRequest.batch and stop_grants on every stream.
            acceptsBatches: true,
            acceptsStopGrants: true,
          },
        },
      };
    case "grant":
      return {
        message: {
          case: "grant",
          value: {
            actionId: m.actionId,
            epoch: BigInt(m.epoch),
            attempt: m.attempt,
            // A null payload or checkpoint is left unset (create() skips null): no conditional
            // spreads, which cost V8 an object each on every grant.
            payload: m.payload as never,
            runId: m.runId,
            checkpoint: m.checkpoint as never,
            traceParent: m.traceParent ?? "",
          },
        },
      };
    case "heartbeat_ack":
      return {
        message: {
          case: "heartbeatAck",
          value: {
            sequence: m.sequence,
            remaining: durationFromMs(m.remainingMs),
            databaseUnreachable: m.databaseUnreachable,
          },
        },
      };
    case "revoke":
      return {
        message: {
          case: "revoke",
          value: {
            actionId: m.actionId,
            epoch: BigInt(m.epoch),
            reason: RevokeReason[m.reason],
            message: m.message,
          },
        },
      };
    case "report_result":
      return {
        message: {
          case: "reportResult",
          value: {
            reportId: m.reportId,
            actionId: m.actionId,
            epoch: BigInt(m.epoch),
            accepted: m.accepted,
            rejectReason: m.rejectReason ? RejectReason[m.rejectReason] : RejectReason.UNSPECIFIED,
            message: m.message,
          },
        },
      };
    case "drain":
      return { message: { case: "drain", value: { reason: m.reason } } };
  }
}
