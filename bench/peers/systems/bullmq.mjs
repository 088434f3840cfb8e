import { Queue } from "bullmq";
import { startWorker } from "../lib/child.mjs";

/** BullMQ on Redis: bulk enqueue with `addBulk`, workers with `concurrency`. */
export const bullmq = {
  key: "bullmq",
  label: "BullMQ",
  packageName: "bullmq",
  settings:
    "Worker defaults (lockDuration 30 s, stalledInterval 30 s, maxStalledCount 1); jobs kept on completion",
  usesPostgres: false,
  async open({ redis, prefix }) {
    const queues = new Map();
    const queueOf = (name) => {
      let q = queues.get(name);
      if (!q) {
        q = new Queue(name, { connection: { ...redis }, prefix });
        queues.set(name, q);
      }
      return q;
    };
    return {
      async enqueue(queue, total, batch) {
        const q = queueOf(queue);
        for (let from = 0; from < total; from += batch) {
          const count = Math.min(batch, total - from);
          await q.addBulk(Array.from({ length: count }, (_, i) => ({ name: "noop", data: { n: from + i } })));
        }
        return "addBulk";
      },
      async remaining(queue) {
        const counts = await queueOf(queue).getJobCounts(
          "wait",
          "active",
          "delayed",
          "prioritized",
          "paused",
        );
        return Object.values(counts).reduce((a, b) => a + b, 0);
      },
      worker: (name, mode, concurrency) =>
        startWorker(new URL("../workers/bullmq-worker.mjs", import.meta.url), {
          redis,
          prefix,
          queue: name,
          mode,
          concurrency,
        }),
      async close() {
        for (const q of queues.values()) await q.close();
      },
    };
  },
};
