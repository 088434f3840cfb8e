/**
 * A BullMQ process: one `Worker` with `concurrency` and its defaults (30 s
 * lock, stalled check every 30 s); Redis is the runner's, with AOF on.
 */
import { Worker } from "bullmq";
import { childMain, nowMs } from "../lib/child.mjs";

childMain(async (config, send) => {
  const handler =
    config.mode === "hold"
      ? async (job) => {
          send({ type: "started", at: nowMs(), job: job.id });
          await new Promise(() => {}); // blocks until the process is killed
        }
      : async () => {};
  const worker = new Worker(config.queue, handler, {
    connection: { ...config.redis, maxRetriesPerRequest: null },
    prefix: config.prefix,
    concurrency: config.concurrency,
    autorun: false,
  });
  worker.on("error", (error) => console.error(`bullmq: ${error.message}`));
  await worker.waitUntilReady();
  worker.run();
  send({ type: "ready" });
  return { stop: () => worker.close(true) };
});
