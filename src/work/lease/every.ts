import type { Logger } from "pino";
import { failureLog } from "../failure-log.js";

/** The loops of a process, stopped together. */
export interface Loops {
  /**
   * Runs `fn` every `ms`, never overlapping itself, the first time `ms` after
   * `phaseMs`. A failure is logged once (not on every tick of a database
   * outage), and so is the recovery; one after {@link stop} is not warned of.
   * With `retryMs`, a run that failed runs again that much later, not only
   * at the next tick. With `soonMs`, it also runs once that long after the
   * call: housekeeping on an hourly tick still runs in a process restarted
   * more often than that.
   *
   * `fn` resolves `false` when it had nothing to do and so tried nothing
   * (a renewal with no stream to renew, say, in a process draining for its
   * shutdown): such a run says nothing of whether the task works again, so
   * it neither ends a run of failures nor logs the recovery.
   */
  every(
    ms: number,
    name: string,
    fn: () => Promise<unknown>,
    options?: { phaseMs?: number; retryMs?: number; soonMs?: number },
  ): void;
  /** Stops every loop: no run starts after it (one under way finishes). */
  stop(): void;
}

export function createLoops(log: Logger): Loops {
  const timers: NodeJS.Timeout[] = [];
  let stopped = false;
  return {
    every(ms, name, fn, { phaseMs = 0, retryMs, soonMs } = {}) {
      let running = false;
      const runs = failureLog(log, {
        failed: `${name} failed; retrying on every tick`,
        still: `${name} still failing`,
        again: `${name} works again`,
      });
      const tick = () => {
        if (running || stopped) return;
        running = true;
        fn()
          .then(
            (tried) => {
              if (tried !== false) runs.worked();
            },
            (error: unknown) => {
              // Stopping: the database may close under a run still in progress (a renewal of
              // many sessions takes several statements); whoever stops stands for it.
              if (stopped) {
                log.debug({ err: error }, `${name} stopped`);
                return;
              }
              runs.failed(error);
              if (retryMs !== undefined) setTimeout(tick, retryMs).unref();
            },
          )
          .finally(() => {
            running = false;
          });
      };
      if (soonMs !== undefined) {
        const soon = setTimeout(tick, soonMs);
        soon.unref();
        timers.push(soon);
      }
      const repeat = () => {
        const timer = setInterval(tick, ms);
        timer.unref();
        timers.push(timer);
      };
      if (phaseMs === 0) {
        repeat();
        return;
      }
      const first = setTimeout(repeat, phaseMs);
      first.unref();
      timers.push(first);
    },
    stop() {
      stopped = true;
      for (const t of timers) clearInterval(t);
      timers.length = 0;
    },
  };
}
