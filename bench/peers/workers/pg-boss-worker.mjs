/**
 * A pg-boss process. Hold mode (kill -9 runs) uses `work()` with its defaults.
 *
 * Burn mode loops on pg-boss's public `fetch()` / `complete()`: `concurrency`
 * loops, each fetching one job, running the handler, completing that job (one
 * durable completion per job) and fetching again at once; a loop that finds
 * nothing waits pg-boss's default polling interval (2 s). `work()` itself, at
 * batchSize 1, waits that interval after every fetch (its burst mode needs
 * batchSize > 1 or 60 s-old queue statistics), so it would measure the
 * interval (16 workers: 8 jobs/s), not pg-boss's database work.
 */
import { PgBoss } from "pg-boss";
import { childMain, nowMs, sleep } from "../lib/child.mjs";

const POLLING_INTERVAL_MS = 2000;

childMain(async (config, send) => {
  const boss = new PgBoss({ connectionString: config.databaseUrl });
  boss.on("error", (error) => console.error(`pg-boss: ${error.message}`));
  await boss.start();
  if (config.mode === "hold") {
    await boss.work(config.queue, async ([job]) => {
      send({ type: "started", at: nowMs(), job: job.id });
      await new Promise(() => {}); // blocks until the process is killed
    });
    send({ type: "ready" });
    return { stop: () => boss.stop({ graceful: false, close: true }) };
  }
  let stopping = false;
  const handler = async () => {};
  const loops = Array.from({ length: config.concurrency }, async () => {
    while (!stopping) {
      const [job] = await boss.fetch(config.queue);
      if (!job) {
        await sleep(POLLING_INTERVAL_MS);
        continue;
      }
      await handler(job);
      await boss.complete(config.queue, job.id);
    }
  });
  send({ type: "ready" });
  return {
    stop: async () => {
      stopping = true;
      await Promise.allSettled(loops);
      await boss.stop({ graceful: false, close: true });
    },
  };
});
