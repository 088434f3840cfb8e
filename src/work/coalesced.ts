/**
 * A task run on demand, one run at a time: a request while it runs schedules
 * exactly one more run, so a burst of requests costs at most two runs. Each
 * run starts after a `setImmediate`, so requests made in the same turn of the
 * event loop share it. `run` must not throw.
 */
export interface Coalesced {
  /** Asks for a run. Ignored once `stopped()` is true. */
  request(): void;
  /** Resolves when no run is under way or scheduled. */
  idle(): Promise<void>;
}

export function coalesced(run: () => Promise<void>, stopped: () => boolean): Coalesced {
  let running: Promise<void> | undefined;
  let again = false;
  return {
    request() {
      if (stopped()) return;
      if (running) {
        again = true;
        return;
      }
      running = (async () => {
        do {
          again = false;
          await new Promise<void>((resolve) => setImmediate(resolve));
          await run();
        } while (again && !stopped());
        running = undefined;
      })();
    },
    async idle() {
      while (running) await running;
    },
  };
}
