import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import { once } from "../work/gate.js";
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
 * streams) is served while fewer than `running` are; past that it waits,
 * first come first served; a call is answered RESOURCE_EXHAUSTED (reason
 * UNARY_CALLS_OVER_LIMIT) at once, before any work, only when `running`
 * plus `waiting` calls are served or wait (calls of a burst may wait for a
 * later turn of the event loop while fewer than `running` are served: they
 * count against the same total). Worker streams, their heartbeats and reports, never pass
 * here.
 */
export interface UnaryCallLimit {
  /**
   * Resolves with the function to call once the call has been answered: at
   * once while fewer than `running` calls are served, else after the calls
   * before it. Returns the error to answer it with when as many calls
   * are served or wait as may (`running` plus `waiting`); rejects with the signal's reason when the call ends while it
   * waits (it is then not served).
   */
  admit(signal: AbortSignal): (() => void) | Promise<() => void> | LeaseholdError;
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

const REFUSALS_PER_SECOND = 5;
const NOTHING = () => {};

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
  const waiting: { start(): void }[] = [];
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
  /** Starts the first waiting call, one a turn, while there is room. */
  const pump = () => {
    if (pumping) return;
    pumping = true;
    setImmediate(() => {
      pumping = false;
      if (running >= limit) return;
      const next = waiting.shift();
      if (next === undefined) return;
      running += 1;
      noteStart();
      next.start();
      if (waiting.length > 0) pump();
    });
  };
  const release = () => {
    running -= 1;
    if (waiting.length > 0) pump();
  };
  const onceReleased = () => once(release);

  return {
    admit(signal) {
      if (limit <= 0) return NOTHING;
      if (signal.aborted) return Promise.reject(signal.reason);
      if (running < limit && waiting.length === 0 && turnOpen()) {
        running += 1;
        noteStart();
        return onceReleased();
      }
      // Running and waiting calls count together: a call that arrived after this turn's budget
      // waits for a later turn even while fewer than `limit` run, and takes a free slot then.
      // Counting only the queue refused calls of a burst at an idle server.
      if (running + waiting.length >= limit + maxWaiting) {
        refused += 1;
        logRefusal((skipped) =>
          options.log.warn(
            {
              running,
              waiting: waiting.length,
              limit,
              ...(skipped > 0 ? { alsoRefused: skipped } : {}),
            },
            "unary call refused: the server serves as many calls as it may, and as many wait",
          ),
        );
        return new LeaseholdError(
          Code.ResourceExhausted,
          `the server is serving ${running} calls and ${waiting.length} more wait their turn, ` +
            `${limit + maxWaiting} in all, as many as it takes: nothing was done; retry after a backoff, ` +
            "and send fewer calls at once " +
            "(bulk submits: SubmitActions, up to 1,000 actions a call)",
          {
            reason: "UNARY_CALLS_OVER_LIMIT",
            metadata: { running_limit: String(limit), waiting_limit: String(maxWaiting) },
          },
        );
      }
      return new Promise<() => void>((resolve, reject) => {
        const onAbort = () => {
          const at = waiting.indexOf(entry);
          if (at >= 0) waiting.splice(at, 1);
          reject(signal.reason);
        };
        const entry = {
          start() {
            signal.removeEventListener("abort", onAbort);
            resolve(onceReleased());
          },
        };
        signal.addEventListener("abort", onAbort, { once: true });
        waiting.push(entry);
        pump();
      });
    },
    get counts() {
      return { running, waiting: waiting.length };
    },
    get refused() {
      return refused;
    },
  };
}
