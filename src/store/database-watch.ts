import { performance } from "node:perf_hooks";

/** How one check of the database ended. */
export type DatabaseCheck =
  | { readonly ok: true }
  /** `error`: the database or the network answered no. `timeout`: no answer at all (see {@link watchDatabase}). */
  | { readonly ok: false; readonly kind: "error" | "timeout"; readonly cause: Error };

/** Options of {@link watchDatabase}. */
export interface DatabaseWatchOptions {
  /** Time between checks, and how long a check waits for its answer, in ms. */
  readonly everyMs: number;
  /** The database became unreachable by the rule of {@link watchDatabase}; `cause` is the last failed check's. */
  lost(cause: Error): void;
  /** It answers again after `lost`. */
  back(): void;
  /** Called after every check, with performance.now() when it began (tests await checks instead of sleeping). */
  checked?(check: DatabaseCheck, startedAtMs: number): void;
}

/**
 * Failed checks in a row that make the database unreachable. One is never
 * enough: a dropped connection, a statement queued behind a slow one, one
 * bad second of a busy machine.
 */
const FAILURES_TO_LOSE = 2;

/** A check's waiting is counted in steps of at most this many ms (see {@link checkOnce}). */
const MAX_STEP_MS = 100;

/**
 * Watches that the database answers, to tell an outage from a busy process.
 * The rule (README, "When PostgreSQL is unreachable"):
 *
 * - A check is one round trip (`ping`) on a connection of its own, every
 *   `everyMs` after the previous check ended.
 * - A check **fails with an error** when the database or the network says no
 *   (connection refused or reset, the server shutting down, an SQL error), or
 *   when the database answers that it refuses writes (a standby, a demoted
 *   primary: `ping` reads it in the same round trip).
 *   That is a real answer, so it is acted on quickly: the check is repeated at
 *   once (a fresh connection), and a second error makes the database
 *   unreachable. Detection of a stopped PostgreSQL takes one interval plus a
 *   reconnect attempt.
 * - A check **gets no answer** only if the database itself kept it waiting for
 *   `everyMs`: the wait counts the time this process's event loop was free to
 *   hear the answer, not the time it spent busy elsewhere (a loop saturated by
 *   thousands of streams, a long synchronous task, a GC pause). See
 *   {@link checkOnce}. Two such checks in a row (so at least 2 × `everyMs` of
 *   a waiting the database alone is to blame for) make it unreachable.
 * - Any answer ends the outage: `back` is called on the first check that
 *   succeeds after `lost`.
 *
 * A busy process thus never reports its database as gone, which would stop
 * positive heartbeat acks and make agents self-fence and re-run work; and a
 * process too busy to notice an outage for a while loses no safety either,
 * because acks only ever count down from the deadline already persisted.
 */
export function watchDatabase(ping: () => Promise<void>, options: DatabaseWatchOptions): { stop(): void } {
  let stopped = false;
  let healthy = true;
  let failures = 0;
  let next: NodeJS.Timeout | undefined;
  let cancel: (() => void) | undefined;

  const schedule = (ms: number) => {
    next = setTimeout(run, ms);
    next.unref();
  };
  const run = () => {
    const startedAtMs = performance.now();
    const pending = checkOnce(ping, options.everyMs);
    cancel = pending.cancel;
    void pending.result.then((check) => {
      cancel = undefined;
      if (stopped) return;
      if (check.ok) {
        failures = 0;
        if (!healthy) {
          healthy = true;
          options.back();
        }
      } else {
        failures += 1;
        if (healthy && failures >= FAILURES_TO_LOSE) {
          healthy = false;
          options.lost(check.cause);
        }
      }
      options.checked?.(check, startedAtMs);
      // An error is confirmed at once; everything else waits for the next interval.
      schedule(healthy && !check.ok && check.kind === "error" ? 0 : options.everyMs);
    });
  };
  schedule(options.everyMs);
  return {
    stop() {
      stopped = true;
      clearTimeout(next);
      cancel?.();
    },
  };
}

/**
 * One round trip, judged so that the event loop's own lateness is not blamed
 * on the database:
 *
 * - the wait is counted in steps of `timeoutMs / 10` (at most 100 ms): each
 *   step's timer credits the time since the previous one, but never more than
 *   one step, so a timer that fires late because the loop was busy (blocked for
 *   1.5 s, say) adds one step, not the whole delay;
 * - once `timeoutMs` has been credited, the verdict waits for `setImmediate`,
 *   i.e. until after the poll phase of this loop iteration has read whatever
 *   the socket holds: an answer that arrived while the loop was busy counts as
 *   an answer, even though the timer ran before it was read.
 *
 * A truly silent database (a host gone, packets dropped) is detected after
 * `timeoutMs` on an idle loop, and later on a busy one, never sooner.
 */
export function checkOnce(
  ping: () => Promise<void>,
  timeoutMs: number,
): { result: Promise<DatabaseCheck>; cancel(): void } {
  let timer: NodeJS.Timeout | undefined;
  let immediate: NodeJS.Immediate | undefined;
  let finish: (check: DatabaseCheck) => void = () => {};
  const result = new Promise<DatabaseCheck>((resolve) => {
    let settled = false;
    finish = (check) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (immediate) clearImmediate(immediate);
      resolve(check);
    };
    ping().then(
      () => finish({ ok: true }),
      (error: unknown) =>
        finish({
          ok: false,
          kind: "error",
          cause: error instanceof Error ? error : new Error(String(error)),
        }),
    );
    const stepMs = Math.max(1, Math.min(MAX_STEP_MS, timeoutMs / 10));
    let credited = 0;
    let last = performance.now();
    const step = () => {
      const now = performance.now();
      credited += Math.min(now - last, stepMs);
      last = now;
      if (credited < timeoutMs - 1) {
        timer = setTimeout(step, stepMs);
        timer.unref();
        return;
      }
      // Not unref'd: an unref'd immediate does not stop the poll phase from sleeping until some other event.
      immediate = setImmediate(() =>
        finish({
          ok: false,
          kind: "timeout",
          cause: new Error(
            `no answer within ${timeoutMs}ms (time this process's event loop was busy not counted)`,
          ),
        }),
      );
    };
    timer = setTimeout(step, stepMs);
    timer.unref();
  });
  // A cancelled check's ping may still answer; nobody listens to it any more.
  return { result, cancel: () => finish({ ok: false, kind: "timeout", cause: new Error("stopped") }) };
}
