import pg from "pg";
import { PgBoss } from "pg-boss";
import { startWorker } from "../lib/child.mjs";

/** pg-boss: bulk enqueue with `insert`, workers on `work()`. */
export const pgBoss = {
  key: "pg-boss",
  label: "pg-boss",
  packageName: "pg-boss",
  usesPostgres: true,
  async open({ databaseUrl }) {
    // The runner's instance only inserts and reads; the workers' instances supervise (expiry, retries).
    const boss = new PgBoss({ connectionString: databaseUrl, supervise: false, schedule: false });
    boss.on("error", (error) => console.error(`pg-boss: ${error.message}`));
    await boss.start();
    const pool = new pg.Pool({ connectionString: databaseUrl, max: 1 });
    pool.on("error", (error) => console.error(`pg-boss (runner): ${error.message}`));
    const queues = new Set();
    const ensureQueue = async (queue) => {
      if (queues.has(queue)) return;
      await boss.createQueue(queue);
      queues.add(queue);
    };
    return {
      async enqueue(queue, total, batch) {
        await ensureQueue(queue);
        for (let from = 0; from < total; from += batch) {
          const count = Math.min(batch, total - from);
          await boss.insert(
            queue,
            Array.from({ length: count }, (_, i) => ({ data: { n: from + i } })),
          );
        }
        return "insert";
      },
      /** Jobs not yet completed (created, retry or active). */
      async remaining(queue) {
        const { rows } = await pool.query(
          "select count(*)::int as n from pgboss.job where name = $1 and state < 'completed'",
          [queue],
        );
        return rows[0].n;
      },
      prepare: ensureQueue,
      worker: (queue, mode, concurrency) =>
        startWorker(new URL("../workers/pg-boss-worker.mjs", import.meta.url), {
          databaseUrl,
          queue,
          mode,
          concurrency,
        }),
      async close() {
        await boss.stop({ graceful: false, close: true });
        await pool.end();
      },
    };
  },
};
