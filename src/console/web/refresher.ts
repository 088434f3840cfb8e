/**
 * Coalesces refresh requests: at most one refresh runs at a time, requests
 * made while one runs fold into one more run after it, and runs start at
 * least `minIntervalMs` apart. Events can arrive by the hundred per second;
 * the view refetches a few times per second at most.
 */

export interface Refresher {
  /** Asks for a refresh soon. */
  request(): void;
  /** Aborts the running refresh and starts a new one now (the view or its filters changed). */
  restart(): void;
  /** Aborts the running refresh and drops the pending one. */
  stop(): void;
}

/**
 * `run` gets a signal that aborts when the refresh is superseded; it should
 * handle its own errors (a rejection is dropped).
 */
export function createRefresher(
  run: (signal: AbortSignal) => Promise<void>,
  minIntervalMs: number,
): Refresher {
  let controller = new AbortController();
  let running = false;
  let pending = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let lastStart = Number.NEGATIVE_INFINITY;

  function request(): void {
    if (running) {
      pending = true;
      return;
    }
    if (timer !== undefined) return; // a run is already scheduled
    const wait = Math.max(0, lastStart + minIntervalMs - performance.now());
    timer = setTimeout(start, wait);
  }

  async function start(): Promise<void> {
    timer = undefined;
    running = true;
    pending = false;
    lastStart = performance.now();
    const mine = controller;
    try {
      await run(mine.signal);
    } catch {
      // run reports its own errors
    } finally {
      // A restart during the run handed the refresher to a newer run.
      if (mine === controller) {
        running = false;
        if (pending) request();
      }
    }
  }

  function stop(): void {
    controller.abort();
    controller = new AbortController();
    clearTimeout(timer);
    timer = undefined;
    running = false;
    pending = false;
  }

  return {
    request,
    restart() {
      stop();
      lastStart = Number.NEGATIVE_INFINITY;
      request();
    },
    stop,
  };
}
