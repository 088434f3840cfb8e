/** A counting semaphore: at most `slots` holders at once, the others waiting in arrival order. */
export interface Gate {
  /**
   * Resolves with the release function (callable once) when a slot is free.
   * Rejects with `options.full()` when the queue is at its limit, and with
   * `options.cancelled()` when `signal` aborts while waiting.
   */
  enter(signal?: AbortSignal): Promise<() => void>;
}

export function createGate(
  slots: number,
  options: { queueLimit?: number; full?: () => Error; cancelled?: () => Error } = {},
): Gate {
  const queueLimit = options.queueLimit ?? Number.POSITIVE_INFINITY;
  let busy = 0;
  const waiting: (() => void)[] = [];
  // The slot passes to the next waiter, or is given back.
  const release = () => {
    const next = waiting.shift();
    if (next) next();
    else busy -= 1;
  };
  return {
    enter(signal) {
      if (busy < slots) {
        busy += 1;
        return Promise.resolve(once(release));
      }
      if (waiting.length >= queueLimit) {
        return Promise.reject(options.full?.() ?? new Error("the gate's queue is full"));
      }
      return new Promise((resolve, reject) => {
        const go = () => {
          signal?.removeEventListener("abort", abort);
          resolve(once(release));
        };
        const abort = () => {
          const i = waiting.indexOf(go);
          if (i >= 0) waiting.splice(i, 1);
          reject(options.cancelled?.() ?? signal?.reason);
        };
        signal?.addEventListener("abort", abort, { once: true });
        waiting.push(go);
      });
    },
  };
}

/** `fn`, callable once: a release handed out may be called again harmlessly. */
export function once(fn: () => void): () => void {
  let called = false;
  return () => {
    if (called) return;
    called = true;
    fn();
  };
}
