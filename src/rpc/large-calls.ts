import { setImmediate as nextTurn } from "node:timers/promises";
import { Code, LeaseholdError } from "../errors.js";
import { once } from "../work/gate.js";
import { ANY_CALLER, type Caller, FairQueue } from "./fair-queue.js";

/**
 * A unary request of at least this many bytes is a large call: decoding,
 * checking and answering one (a bulk submit of 1,000 actions with payloads,
 * a file) takes tens of milliseconds of the event loop, where a heartbeat
 * takes microseconds.
 */
export const LARGE_REQUEST_BYTES = 256 * 1024;

/** Options of {@link createLargeCallLimit}. */
export interface LargeCallLimitOptions {
  /**
   * Large calls served at once; the others wait their turn, round-robin
   * across callers (fair-queue.ts). Default 1.
   */
  readonly running?: number | undefined;
  /**
   * Counts the bytes of a request waiting its turn against the memory budget
   * of requests still arriving (the same 256 MiB by default): the release
   * function, or undefined when the budget is spent. Without it, waiting
   * requests are not bounded here.
   */
  readonly hold?: ((bytes: number) => (() => void) | undefined) | undefined;
}

/** Admits large unary calls a few at a time. */
export interface LargeCallLimit {
  /**
   * Resolves with the function to call once the call of `bytes` has been
   * answered: at once for a small request, or for a large one while fewer
   * than `running` large calls are served; otherwise when its turn comes:
   * callers take turns, one call each, and each caller's calls go in the
   * order they came (`caller` by default: one caller for all).
   * Rejects with RESOURCE_EXHAUSTED (reason PARTIAL_REQUESTS_OVER_BUDGET)
   * when its bytes cannot be held while it waits, and with the signal's
   * reason when the call ends first.
   */
  admit(bytes: number, signal: AbortSignal, caller?: Pick<Caller, "key">): Promise<() => void> | (() => void);
  /** Large calls being served, and waiting. */
  readonly counts: { readonly running: number; readonly waiting: number };
}

const NOTHING = () => {};

/**
 * Why large calls take turns: several at once keep the event loop busy for
 * hundreds of milliseconds at a stretch, each one's steps queued behind the
 * others', and worker streams' heartbeats wait behind them all. A flood of
 * bulk submits from four clients made heartbeat acks late by a second
 * (`bench/heartbeats.ts --flood 4`). One at a time, a heartbeat waits for
 * at most one step of one call. A turn starts on a later turn of the event
 * loop, so that what arrived meanwhile goes first. Callers take turns: a team
 * uploading 3 MB files 40 at a time made another's single 300 KiB file wait
 * 6 to 8 s behind all of them, first come first served; now it waits for
 * at most one call of each other caller.
 */
export function createLargeCallLimit(options: LargeCallLimitOptions = {}): LargeCallLimit {
  const limit = options.running ?? 1;
  let running = 0;
  const waiting = new FairQueue<{ start(): void }>();

  const release = () => {
    running -= 1;
    const next = waiting.shift();
    if (next === undefined) return;
    running += 1;
    next.start();
  };
  const onceReleased = () => once(release);

  return {
    admit(bytes, signal, caller = ANY_CALLER) {
      if (bytes < LARGE_REQUEST_BYTES) return NOTHING;
      if (signal.aborted) return Promise.reject(signal.reason);
      if (running < limit && waiting.size === 0) {
        running += 1;
        return onceReleased();
      }
      const unhold = options.hold ? options.hold(bytes) : NOTHING;
      if (unhold === undefined) {
        return Promise.reject(
          new LeaseholdError(
            Code.ResourceExhausted,
            "the server holds as many request bytes as it allows for requests still arriving or waiting their turn; retry later",
            { reason: "PARTIAL_REQUESTS_OVER_BUDGET" },
          ),
        );
      }
      return new Promise<() => void>((resolve, reject) => {
        const onAbort = () => {
          waiting.remove(caller.key, entry);
          unhold();
          reject(signal.reason);
        };
        const entry = {
          start() {
            signal.removeEventListener("abort", onAbort);
            unhold();
            const done = onceReleased();
            // What arrived while the call before it ran (heartbeats) goes first.
            nextTurn().then(() => resolve(done));
          },
        };
        signal.addEventListener("abort", onAbort, { once: true });
        waiting.push(caller.key, entry);
      });
    },
    get counts() {
      return { running, waiting: waiting.size };
    },
  };
}

/** Splits a long loop into turns of the event loop (see {@link turns}). */
export interface Turns {
  /** True once the current turn has run its budget. */
  due(): boolean;
  /** Ends the turn: what waits on the event loop (heartbeats, reports) runs first. */
  next(): Promise<void>;
}

/**
 * For a loop over a large request's items: check `due()` now and then and
 * `await next()` when it says so, and no turn of the event loop runs much
 * over `budgetMs` for it.
 */
export function turns(budgetMs = 4): Turns {
  let since = performance.now();
  return {
    due: () => performance.now() - since >= budgetMs,
    async next() {
      await nextTurn();
      since = performance.now();
    },
  };
}
