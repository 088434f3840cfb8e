import { Logger, makeWorkerUtils } from "graphile-worker";
import pg from "pg";
import { startWorker } from "../lib/child.mjs";

const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker: ${message}`);
});

/** graphile-worker: bulk enqueue with `addJobs`, workers on `run()` defaults. */
export const graphileWorker = {
  key: "graphile-worker",
  label: "graphile-worker",
  packageName: "graphile-worker",
  settings:
    "run() defaults: concurrency per run, completions not batched (completeJobBatchDelay unset), " +
    "LISTEN/NOTIFY plus a 2 s poll; a job's lock lasts 4 h",
  usesPostgres: true,
  async open({ databaseUrl }) {
    const pool = new pg.Pool({ connectionString: databaseUrl, max: 2 });
    const report = (error) => console.error(`graphile-worker (runner): ${error.message}`);
    pool.on("error", report);
    pool.on("connect", (client) => client.on("error", report));
    const utils = await makeWorkerUtils({ pgPool: pool, logger });
    await utils.migrate();
    return {
      async enqueue(queue, total, batch) {
        for (let from = 0; from < total; from += batch) {
          const count = Math.min(batch, total - from);
          await utils.addJobs(
            Array.from({ length: count }, (_, i) => ({ identifier: queue, payload: { n: from + i } })),
          );
        }
        return "addJobs";
      },
      /** Completed jobs are deleted: the number left in the table is what is not done. */
      async remaining() {
        const { rows } = await pool.query("select count(*)::int as n from graphile_worker._private_jobs");
        return rows[0].n;
      },
      worker: (queue, mode, concurrency) =>
        startWorker(new URL("../workers/graphile-worker.mjs", import.meta.url), {
          databaseUrl,
          queue,
          mode,
          concurrency,
        }),
      async close() {
        await utils.release();
        await pool.end();
      },
    };
  },
};
