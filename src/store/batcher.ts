/**
 * Group commit: calls that arrive while a flush is in flight are applied
 * together in the next flush, as one statement. At low load a call is flushed
 * on its own right away (no added latency); under load batches grow by
 * themselves up to `maxBatch`.
 */
export interface Batcher<T, R> extends AsyncDisposable {
  /** Queues one item; resolves with its result once its batch has committed. */
  add(item: T): Promise<R>;
  /** Waits for queued items to be flushed. */
  close(): Promise<void>;
}

/** Options of {@link createBatcher}. */
export interface BatcherOptions {
  /** Largest batch handed to `flush`. Default 256 (past ~64 rows the gain flattens). */
  readonly maxBatch?: number;
}

/**
 * `flush` receives a batch and returns one result per item, in order, or
 * throws; a throw rejects every item of that batch.
 */
export function createBatcher<T, R>(
  flush: (items: readonly T[]) => Promise<readonly R[]>,
  options: BatcherOptions = {},
): Batcher<T, R> {
  const maxBatch = options.maxBatch ?? 256;
  let queue: { item: T; resolve: (r: R) => void; reject: (e: unknown) => void }[] = [];
  let running: Promise<void> | undefined;

  const run = async () => {
    while (queue.length > 0) {
      const batch = queue.slice(0, maxBatch);
      queue = queue.slice(batch.length);
      try {
        const results = await flush(batch.map((b) => b.item));
        batch.forEach((b, i) => {
          b.resolve(results[i] as R);
        });
      } catch (error) {
        for (const b of batch) b.reject(error);
      }
      // The next flush on the next turn: with PGlite a statement runs on this thread, and
      // flushes chained here would keep timers and sockets (renewals, heartbeats) waiting
      // until a backlog (a stream flooding reports) was written.
      if (queue.length > 0) await new Promise<void>((r) => setImmediate(r));
    }
    running = undefined;
  };

  const close = async () => {
    while (running) await running;
  };
  return {
    add(item) {
      return new Promise<R>((resolve, reject) => {
        queue.push({ item, resolve, reject });
        // Start on the next tick so calls arriving in the same tick share a batch.
        running ??= new Promise<void>((r) => setImmediate(r)).then(run);
      });
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}
