/**
 * A graphile-worker process: `run()` with its defaults (completion not
 * batched, LISTEN/NOTIFY plus a 2 s poll), only the pool at least as large as
 * the concurrency (as its own warning asks) and the log level lowered to
 * warnings so that 20,000 "completed" lines do not measure the terminal.
 */
import { Logger, run } from "graphile-worker";
import { childMain, nowMs } from "../lib/child.mjs";

const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker: ${message}`);
});

childMain(async (config, send) => {
  const task =
    config.mode === "hold"
      ? async (_payload, helpers) => {
          send({ type: "started", at: nowMs(), job: String(helpers.job.id) });
          await new Promise(() => {}); // blocks until the process is killed
        }
      : async () => {};
  const runner = await run({
    connectionString: config.databaseUrl,
    concurrency: config.concurrency,
    // graphile-worker warns when its pool is smaller than its concurrency; follow its advice.
    maxPoolSize: Math.max(10, config.concurrency),
    noHandleSignals: true,
    logger,
    taskList: { [config.queue]: task },
  });
  send({ type: "ready" });
  return { stop: () => runner.stop() };
});
