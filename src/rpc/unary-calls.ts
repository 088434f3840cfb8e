import type { Logger } from "pino";
import { Code, LeaseholdError, quote } from "../errors.js";
import { once } from "../work/gate.js";
import { type Caller, FairQueue } from "./fair-queue.js";
import { perSecond } from "./per-second.js";

/**
 * Unary calls the process serves at once, whoever sends them. The other
 * limits bound what one address holds (CALLS_PER_ADDRESS: 4,096 calls by
 * default) and what one connection holds (256 streams); neither bounds the
 * database work that reads queue ahead of the lease renewals heartbeats
 * wait for. One client without credentials sending ListActions calls 1,500
 * at a time (a page of 2 KB actions each) queued thousands of queries: on
 * the embedded store, whose queries run on the process's own event loop, a
 * healthy agent on another address got no heartbeat ack for 3 s, self-fenced
 * and its action ran again; on PostgreSQL acks came 0.9 s late and the
 * process grew by 360 MiB.
 *
 * A unary call (every method but WorkerService.Connect and the server
 * streams) is served while fewer than `running` are; past that it waits for
 * a turn. Waiting calls are served round-robin across callers (fair-queue.ts:
 * the authenticated principal, else the peer's address), each caller's in the
 * order they came: one team keeping 300 ListActions calls in flight made
 * another team's single GetAction wait 8 to 16 s behind all of them, or be
 * refused. A call is answered RESOURCE_EXHAUSTED (reason
 * UNARY_CALLS_OVER_LIMIT) at once, before any work, only when `running` plus
 * `waiting` calls are served or wait (calls of a burst may wait for a later
 * turn of the event loop while fewer than `running` are served: they count
 * against the same total), and then it is the flooding caller that is
 * refused: a new call takes the place of the newest waiting call of the
 * caller with the most waiting (that call ends RESOURCE_EXHAUSTED, nothing
 * done) if that caller has at least two calls more waiting than the new
 * call's; otherwise the new call is refused itself. So one caller
 * alone may use the whole waiting room, and a caller is refused only while
 * no other caller has two calls more than it waiting: one sending a call at
 * a time is not refused while another floods. Refusals carry a
 * google.rpc.RetryInfo: about the time the calls served and waiting then take
 * to be served. Worker streams, their heartbeats and reports, never pass
 * here.
 */
export interface UnaryCallLimit {
  /**
   * Resolves with the function to call once the call of `caller` has been
   * answered: at once while fewer than `running` calls are served, else when
   * its turn comes (round-robin across callers). Returns the error to answer
   * it with when as many calls are served or wait as may (`running` plus
   * `waiting`) and its caller has the most waiting; rejects with that error
   * when a caller with fewer calls waiting takes its place, and with the
   * signal's reason when the call ends while it waits (it is then not
   * served).
   */
  admit(signal: AbortSignal, caller: Caller): (() => void) | Promise<() => void> | LeaseholdError;
  /** Unary calls being served, and waiting their turn. */
  readonly counts: { readonly running: number; readonly waiting: number };
  /** Calls answered UNARY_CALLS_OVER_LIMIT since the process started. */
  readonly refused: number;
}

/**
 * Default of `running`. Measured with the hostile tester's rapid-reset loop
 * (ListActions pages of 2 KB actions) against the embedded store, an agent
 * running `sleep 60` on the same server: see the commit that set it.
 */
export const DEFAULT_UNARY_CALLS = 32;

/**
 * Calls that may wait for a turn per call served at once (default of
 * `waiting`): 224 with the default 32. A client sending 64 calls at once
 * (bench/actions-e2e.ts) never sees a refusal while it is alone, nor a
 * client's 256 calls at once (one connection's streams).
 */
export const UNARY_WAITING_PER_RUNNING = 7;

/**
 * Calls start in one turn of the event loop while the calls started in it
 * took less than this; the others wait for later turns, one a turn, each
 * after the network was read (heartbeats). On the embedded store a call's
 * queries run on the event loop itself: a turn that started every call that
 * arrived in it (1,500 ListActions calls of a rapid-reset client, at tens of
 * milliseconds each) read nothing else for seconds.
 */
export const TURN_BUDGET_MS = 10;

/**
 * Bounds of the retry delay a refusal gives (RetryInfo): the time the calls
 * served and waiting then take to be served, from the mean time of a call,
 * at least 100 ms (a retry sooner finds the same queue) and at most 10 s.
 */
export const MIN_RETRY_DELAY_MS = 100;
export const MAX_RETRY_DELAY_MS = 10_000;

const REFUSALS_PER_SECOND = 5;
const NOTHING = () => {};
/** Weight of one call's time in the running mean (an exponential moving average over about 16 calls). */
const MEAN_WEIGHT = 1 / 16;

/** Options of {@link limitUnaryCalls}. */
export interface UnaryCallLimitOptions {
  /** Unary calls served at once; 0 for no limit. Default {@link DEFAULT_UNARY_CALLS}. */
  readonly running?: number | undefined;
  /** Unary calls waiting for a turn at most. Default `running` times {@link UNARY_WAITING_PER_RUNNING}. */
  readonly waiting?: number | undefined;
  readonly log: Logger;
}

export function limitUnaryCalls(options: UnaryCallLimitOptions): UnaryCallLimit {
  const limit = options.running ?? DEFAULT_UNARY_CALLS;
  const maxWaiting = options.waiting ?? limit * UNARY_WAITING_PER_RUNNING;
  const logRefusal = perSecond(REFUSALS_PER_SECOND);
  let running = 0;
  let refused = 0;
  /** Mean milliseconds from a call's turn to its answer, for the retry delay. */
  let meanCallMs = TURN_BUDGET_MS;
  const waiting = new FairQueue<Waiting>();
  /** When the first call of this turn of the event loop started (performance.now()); undefined: none yet. */
  let turnStartedAt: number | undefined;
  let pumping = false;

  /** Whether a call may start in this turn: the calls started in it have not had their budget. */
  const turnOpen = () => turnStartedAt === undefined || performance.now() - turnStartedAt < TURN_BUDGET_MS;
  const noteStart = () => {
    if (turnStartedAt !== undefined) return;
    turnStartedAt = performance.now();
    // Queued from a turn's immediates, this runs in the next turn, after the network was read.
    setImmediate(() => {
      turnStartedAt = undefined;
    });
  };
  /** Starts the waiting call whose turn it is, one a turn, while there is room. */
  const pump = () => {
    if (pumping) return;
    pumping = true;
    setImmediate(() => {
      pumping = false;
      if (running >= limit) return;
      const next = waiting.shift();
      if (next === undefined) return;
      noteStart();
      // Takes its slot (takeSlot) at once.
      next.start();
      if (waiting.size > 0) pump();
    });
  };
  /** Takes a slot; the function that gives it back once (idempotent). */
  const takeSlot = () => {
    running += 1;
    const startedAt = performance.now();
    return once(() => {
      meanCallMs += (performance.now() - startedAt - meanCallMs) * MEAN_WEIGHT;
      running -= 1;
      if (waiting.size > 0) pump();
    });
  };

  /** The refusal of a call of `caller`, which has `callerWaiting` calls waiting; logged (a few a second). */
  const refusal = (caller: Caller, callerWaiting: number) => {
    refused += 1;
    const served = running;
    const queued = waiting.size;
    // The time the calls served and waiting now take to be served, `limit` at a time.
    const retryDelayMs = Math.round(
      Math.min(
        MAX_RETRY_DELAY_MS,
        Math.max(MIN_RETRY_DELAY_MS, (meanCallMs * (served + queued)) / Math.max(limit, 1)),
      ),
    );
    const who =
      caller.principal === undefined
        ? `address ${caller.key.slice("address:".length)}`
        : `principal ${quote(caller.principal)}`;
    const floods = callerWaiting > 0;
    logRefusal((skipped) =>
      options.log.warn(
        {
          principal: caller.principal,
          method: caller.method,
          peer: caller.peer,
          callerWaiting,
          running: served,
          waiting: queued,
          callers: waiting.callers,
          limit,
          ...(skipped > 0 ? { alsoRefused: skipped } : {}),
        },
        floods
          ? "unary call refused: its caller has the most calls waiting, and the server serves and holds as many as it may"
          : "unary call refused: the server serves and holds as many calls as it may, each of their callers' first",
      ),
    );
    const message = floods
      ? `this caller (${who}) has ${callerWaiting} calls waiting their turn, among the most of any caller, ` +
        `and the server is serving ${served} calls and ${queued} wait, ${limit + maxWaiting} in all, as ` +
        "many as it takes (callers take turns, one call each): nothing was done; retry after the delay " +
        `its RetryInfo gives (${retryDelayMs} ms), and send fewer calls at once ` +
        "(bulk submits: SubmitActions, up to 1,000 actions a call)"
      : `the server is serving ${served} calls and ${queued} more wait their turn, from ${waiting.callers} ` +
        `callers with no more than one each, ${limit + maxWaiting} in all, as many as it takes: nothing was ` +
        `done; retry after the delay its RetryInfo gives (${retryDelayMs} ms)`;
    return new LeaseholdError(Code.ResourceExhausted, message, {
      reason: "UNARY_CALLS_OVER_LIMIT",
      metadata: {
        running_limit: String(limit),
        waiting_limit: String(maxWaiting),
        caller: who,
        caller_waiting: String(callerWaiting),
      },
      retryDelayMs,
    });
  };

  return {
    admit(signal, caller) {
      if (limit <= 0) return NOTHING;
      if (signal.aborted) return Promise.reject(signal.reason);
      if (running < limit && waiting.size === 0 && turnOpen()) {
        noteStart();
        return takeSlot();
      }
      // Running and waiting calls count together: a call that arrived after this turn's budget
      // waits for a later turn even while fewer than `limit` run, and takes a free slot then.
      // Counting only the queue refused calls of a burst at an idle server.
      if (running + waiting.size >= limit + maxWaiting) {
        const mine = waiting.waitingOf(caller.key);
        const most = waiting.largest();
        // The caller with the most calls waiting gives its newest up to one with fewer: after it,
        // this caller has no more waiting than that one. Otherwise this caller floods: refused.
        if (most === undefined || most.waiting <= mine + 1) return refusal(caller, mine);
        const pushedOut = waiting.popNewest(most.key) as Waiting;
        pushedOut.refuse(refusal(pushedOut.caller, most.waiting));
      }
      return new Promise<() => void>((resolve, reject) => {
        const onAbort = () => {
          waiting.remove(caller.key, entry);
          reject(signal.reason);
        };
        const entry: Waiting = {
          caller,
          start() {
            signal.removeEventListener("abort", onAbort);
            resolve(takeSlot());
          },
          refuse(error) {
            signal.removeEventListener("abort", onAbort);
            reject(error);
          },
        };
        signal.addEventListener("abort", onAbort, { once: true });
        waiting.push(caller.key, entry);
        pump();
      });
    },
    get counts() {
      return { running, waiting: waiting.size };
    },
    get refused() {
      return refused;
    },
  };
}

/** A call waiting its turn. */
interface Waiting {
  readonly caller: Caller;
  /** Its turn: it is served now. */
  start(): void;
  /** A caller with fewer calls waiting took its place: it ends with `error`, nothing done. */
  refuse(error: LeaseholdError): void;
}
