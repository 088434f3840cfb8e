/**
 * End-to-end action throughput (SPEC §6): submit → grant on the stream →
 * completion committed, with agents built on the SDK and 16 slots in all.
 *
 *   node --import tsx bench/actions-e2e.ts [--actions 5000] [--agents 2] [--slots 8] [--database-url URL]
 *
 * Without --database-url it runs on PGlite in a temporary directory. The
 * server runs in this process (one JavaScript thread, as in production),
 * the agents in this process too; submits go through gRPC, 64 at a time.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { pino } from "pino";
import { createAgent } from "../src/agent/agent.js";
import { parseServerConfig } from "../src/config.js";
import { ActionService } from "../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../src/rpc/client.js";
import { startServer } from "../src/server.js";

const { values } = parseArgs({
  options: {
    actions: { type: "string", default: "5000" },
    agents: { type: "string", default: "2" },
    slots: { type: "string", default: "8" },
    "database-url": { type: "string" },
  },
});
const total = Number(values.actions);
const dir = mkdtempSync(join(tmpdir(), "leasehold-bench-"));
const config = parseServerConfig({
  listen: "127.0.0.1:0",
  metricsListen: "off",
  databaseUrl: values["database-url"],
  dataDir: join(dir, "data"),
  logLevel: "warn",
});
const server = await startServer(config, pino({ level: "warn" }));
const address = `127.0.0.1:${server.port}`;

let completed = 0;
let resolveAll: () => void = () => {};
const allDone = new Promise<void>((r) => {
  resolveAll = r;
});
const agents = Array.from({ length: Number(values.agents) }, (_, i) =>
  createAgent({
    address,
    cluster: "bench",
    workerId: `bench-${i}`,
    capacity: Number(values.slots),
    handler: async () => ({ ok: true }),
    onEvent: (e) => {
      if (e.type === "finished" && e.accepted && ++completed === total) resolveAll();
    },
  }),
);
const api = createClient(ActionService, address);
await new Promise((r) => setTimeout(r, 500)); // let the agents connect

const started = performance.now();
let next = 0;
await Promise.all(
  Array.from({ length: 64 }, async () => {
    while (next < total) {
      next++;
      await api.submitAction({ cluster: "bench", payload: { n: next } as never });
    }
  }),
);
const submittedMs = performance.now() - started;
await allDone;
const elapsedMs = performance.now() - started;

const rss = process.memoryUsage().rss / 1024 / 1024;
console.log(
  JSON.stringify({
    driver: values["database-url"] ? "postgres" : "pglite",
    actions: total,
    agents: agents.length,
    slotsTotal: agents.length * Number(values.slots),
    submitSeconds: +(submittedMs / 1000).toFixed(2),
    totalSeconds: +(elapsedMs / 1000).toFixed(2),
    actionsPerSecond: Math.round(total / (elapsedMs / 1000)),
    rssMiB: Math.round(rss),
  }),
);
for (const a of agents) await a.close({ timeoutMs: 1000 });
api.close();
await server.close();
rmSync(dir, { recursive: true, force: true });
process.exit(0);
