import { createServer } from "node:net";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import pg from "pg";
import { ActionService, ActionView } from "../../../src/gen/leasehold/v1/action_pb.ts";
import { createClient } from "../../../src/rpc/client.ts";
import { processCpuMicros, sleep, startProcess, startWorker } from "../lib/child.mjs";

/** A free TCP port on the loopback interface. */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Resolves once the server answers an RPC (it answers UNAVAILABLE until its database is ready). */
async function waitForServer(api, server, address) {
  const deadline = Date.now() + 120_000;
  for (;;) {
    if (server.child.exitCode !== null) throw new Error(`the Leasehold server on ${address} exited`);
    try {
      await api.listActions({ cluster: "bench-probe", pageSize: 1 });
      return;
    } catch (error) {
      if (Date.now() > deadline)
        throw new Error(`the Leasehold server on ${address} did not answer: ${error}`);
      await sleep(100);
    }
  }
}

/**
 * Leasehold: `leasehold serve` processes on one database, agents on the SDK in
 * processes of their own, bulk submit with SubmitActions (1,000 per call).
 */
export const leasehold = {
  key: "leasehold",
  label: "Leasehold",
  settings: "",
  usesPostgres: true,
  /**
   * `servers` serve processes share `databaseUrl`; `serveArgs` are added to
   * each (e.g. a 2 s grace period for the kill -9 runs); `logLevel` is the
   * servers' (the kill -9 runs pass `error`: every run expires a lease, a warning).
   */
  async open({ databaseUrl, root, servers = 1, serveArgs = [], logLevel = "warn" }) {
    const procs = [];
    const apis = [];
    const addresses = [];
    try {
      for (let i = 0; i < servers; i++) {
        const address = `127.0.0.1:${await freePort()}`;
        const server = startProcess(
          `serve ${i + 1}`,
          process.execPath,
          [
            join(root, "bin", "leasehold.js"),
            "serve",
            "--listen",
            address,
            "--metrics-listen",
            "off",
            "--database-url",
            databaseUrl,
            "--log-level",
            logLevel,
            ...serveArgs,
          ],
          { cwd: root },
        );
        procs.push(server);
        const api = createClient(ActionService, address, grpc.credentials.createInsecure());
        apis.push(api);
        addresses.push(address);
        // One after the other: the first applies the migrations.
        await waitForServer(api, server, address);
      }
    } catch (error) {
      for (const p of procs) p.child.kill("SIGKILL");
      throw error;
    }
    const pool = new pg.Pool({ connectionString: databaseUrl, max: 1 });
    pool.on("error", (error) => console.error(`Leasehold (runner): ${error.message}`));
    const api = apis[0];
    return {
      serverPids: procs.map((p) => p.pid),
      /** SubmitActions, 1,000 per call; on UNIMPLEMENTED, unary SubmitAction with 64 in flight. */
      async enqueue(queue, total, batch) {
        let from = 0;
        let why = "not in this checkout's client";
        // An older checkout's generated client has no submitActions: fall back the same way.
        if (typeof api.submitActions === "function") {
          try {
            for (; from < total; from += batch) {
              const count = Math.min(batch, total - from);
              // The basic view: each result names its action without echoing its payload back
              // (pg-boss's insert answers nothing; graphile-worker's addJobs the whole rows).
              await api.submitActions({
                actions: Array.from({ length: count }, (_, i) => ({
                  cluster: queue,
                  payload: { n: from + i },
                })),
                view: ActionView.BASIC,
              });
            }
            return "SubmitActions, view BASIC";
          } catch (error) {
            if (error?.code !== grpc.status.UNIMPLEMENTED || from > 0) throw error;
            why = "the server answered UNIMPLEMENTED";
          }
        }
        let next = 0;
        await Promise.all(
          Array.from({ length: 64 }, async () => {
            while (next < total) {
              const n = next++;
              await api.submitAction({ cluster: queue, payload: { n } });
            }
          }),
        );
        return `unary SubmitAction, 64 in flight (SubmitActions: ${why})`;
      },
      async remaining(queue) {
        const { rows } = await pool.query(
          "select count(*)::int as n from actions where cluster = $1 and state in ('QUEUED', 'LEASED')",
          [queue],
        );
        return rows[0].n;
      },
      serverCpuMicros: () => processCpuMicros(procs[0].pid),
      /** An agent process connected to server `server` (0-based), holding `prefetch` grants beyond its slots. */
      worker: (queue, mode, concurrency, server = 0, prefetch = 0) =>
        startWorker(
          new URL("../workers/leasehold-agent.mjs", import.meta.url),
          {
            address: addresses[server],
            queue,
            mode,
            concurrency,
            prefetch,
            workerId: `bench-${mode}-${Math.random().toString(36).slice(2, 8)}`,
          },
          { execArgv: ["--import", "tsx"], cwd: root },
        ),
      async close() {
        for (const a of apis) a.close();
        await pool.end();
        for (const p of procs) {
          p.child.kill("SIGTERM");
          const timer = setTimeout(() => p.child.kill("SIGKILL"), 10_000);
          await p.exit;
          clearTimeout(timer);
        }
      },
    };
  },
};
