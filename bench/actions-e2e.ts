/**
 * End-to-end action throughput: submit → grant on the stream → completion
 * committed, with agents built on the SDK and 16 slots in all (goal: 9,000
 * actions/s; the goals are listed in bench/README.md).
 *
 *   node --import tsx bench/actions-e2e.ts [--actions 5000] [--agents 2] [--slots 8] [--database-url URL]
 *     [--auth none|tls|mtls|token] [--bulk] [--watchers 0]
 *
 * --auth (default none): `tls` puts TLS on the port and nothing else; `mtls`
 * also requires client certificates (agents and the submitter authenticate
 * with them, under a policy); `token` is TLS plus static bearer tokens (no
 * client certificates). Certificates are made with openssl in a temporary
 * directory.
 *
 * Without --database-url it runs on PGlite in a temporary directory. The
 * server runs in this process (one JavaScript thread, as in production),
 * the agents in this process too; submits go through gRPC, 64 at a time.
 *
 * --bulk submits with SubmitActions instead: calls of 1,000 actions, one
 * after the other (`submitPerSecond` is then the bulk submit rate, with the
 * agents already draining the queue).
 *
 * --watchers N (default 0, only with --auth none) starts N followers of the
 * whole event log (`leasehold events --follow --json`, each in a process of
 * its own), as N open console tabs each follow every event.
 */

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { createAgent } from "../src/agent/agent.js";
import { addStaticToken } from "../src/auth/static-tokens.js";
import { parseServerConfig, type RawServerOptions } from "../src/config.js";
import { ActionService } from "../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../src/rpc/client.js";
import type { ClientSecurity } from "../src/rpc/client-security.js";
import { clientChannel } from "../src/rpc/client-security.js";
import { startServer } from "../src/server.js";
import { createCa, issueCertificate } from "../test/helpers/pki.js";
import { BIN } from "../test/helpers/process.js";
import { benchArgs, choiceFlag, refuse, wholeNumberFlag } from "./args.js";

const { values } = benchArgs(import.meta.url, {
  options: {
    actions: { type: "string", default: "5000" },
    agents: { type: "string", default: "2" },
    slots: { type: "string", default: "8" },
    "database-url": { type: "string" },
    auth: { type: "string", default: "none" },
    bulk: { type: "boolean", default: false },
    watchers: { type: "string", default: "0" },
  },
});
const total = wholeNumberFlag("--actions", values.actions);
const agentCount = wholeNumberFlag("--agents", values.agents);
const slots = wholeNumberFlag("--slots", values.slots);
const watcherCount = wholeNumberFlag("--watchers", values.watchers, 0);
const auth = choiceFlag("--auth", values.auth, ["none", "tls", "mtls", "token"]);
// The followers are CLI processes without the bench's certificates or tokens.
if (watcherCount > 0 && auth !== "none") refuse("--watchers: only with --auth none");
const dir = mkdtempSync(join(tmpdir(), "leasehold-bench-"));

/** Server options, and the security of the agents and of the submitter, for --auth. */
function security(): { server: RawServerOptions; agent?: ClientSecurity; submitter?: ClientSecurity } {
  if (auth === "none") return { server: {} };
  const ca = createCa(dir, "ca");
  const serverCert = issueCertificate(ca, { dir, name: "server", ips: ["127.0.0.1"] });
  const tls = { tlsCert: serverCert.certFile, tlsKey: serverCert.keyFile };
  const policy = join(dir, "policy.yaml");
  writeFileSync(
    policy,
    "bindings:\n  - principals: [bench-agent]\n    role: agent\n    clusters: [bench]\n" +
      "  - principals: [bench-submitter]\n    role: submitter\n    clusters: [bench]\n",
  );
  if (auth === "tls")
    return { server: tls, agent: { tlsCa: ca.certFile }, submitter: { tlsCa: ca.certFile } };
  if (auth === "mtls") {
    const pair = (name: string) => {
      const c = issueCertificate(ca, { dir, name, dns: [name], client: true });
      return { tlsCa: ca.certFile, tlsCert: c.certFile, tlsKey: c.keyFile };
    };
    return {
      server: { ...tls, tlsClientCa: ca.certFile, authPolicy: policy },
      agent: pair("bench-agent"),
      submitter: pair("bench-submitter"),
    };
  }
  const tokens = join(dir, "tokens.yaml");
  const agentToken = addStaticToken(tokens, { principal: "bench-agent", bindings: [] });
  const submitterToken = addStaticToken(tokens, { principal: "bench-submitter", bindings: [] });
  return {
    server: { ...tls, authTokens: tokens, authPolicy: policy },
    agent: { tlsCa: ca.certFile, token: agentToken },
    submitter: { tlsCa: ca.certFile, token: submitterToken },
  };
}
const secured = security();
const config = parseServerConfig({
  listen: "127.0.0.1:0",
  metricsListen: "off",
  databaseUrl: values["database-url"],
  dataDir: join(dir, "data"),
  logLevel: "warn",
  ...secured.server,
});
const server = await startServer(config, pino({ level: "warn" }));
const address = `127.0.0.1:${server.port}`;

let completed = 0;
let resolveAll: () => void = () => {};
const allDone = new Promise<void>((r) => {
  resolveAll = r;
});
const agents = Array.from({ length: agentCount }, (_, i) =>
  createAgent({
    address,
    cluster: "bench",
    workerId: `bench-${i}`,
    capacity: slots,
    ...(secured.agent ? { security: secured.agent } : {}),
    handler: async () => ({ ok: true }),
    onEvent: (e) => {
      if (e.type === "finished" && e.accepted && ++completed === total) resolveAll();
    },
  }),
);
const submitChannel = secured.submitter
  ? clientChannel(secured.submitter, [address])
  : { credentials: grpc.credentials.createInsecure(), options: {}, interceptors: [] };
const api = createClient(
  ActionService,
  address,
  submitChannel.credentials,
  submitChannel.options,
  submitChannel.interceptors,
);
// Followers of the whole event log in processes of their own, as console tabs are (each follows
// every event with WatchEvents): what they cost the server shows in actionsPerSecond.
const watchers = Array.from({ length: watcherCount }, () =>
  spawn(process.execPath, [BIN, "--server", address, "--json", "events", "--follow"], {
    stdio: ["ignore", "ignore", "inherit"],
  }),
);
await new Promise((r) => setTimeout(r, 500)); // let the agents connect

const started = performance.now();
let next = 0;
if (values.bulk) {
  while (next < total) {
    const size = Math.min(1000, total - next);
    const actions = Array.from({ length: size }, (_, i) => ({
      cluster: "bench",
      payload: { n: next + i + 1 } as never,
    }));
    await api.submitActions({ actions });
    next += size;
  }
} else {
  await Promise.all(
    Array.from({ length: 64 }, async () => {
      while (next < total) {
        next++;
        await api.submitAction({ cluster: "bench", payload: { n: next } as never });
      }
    }),
  );
}
const submittedMs = performance.now() - started;
await allDone;
const elapsedMs = performance.now() - started;

const rss = process.memoryUsage().rss / 1024 / 1024;
console.log(
  JSON.stringify({
    driver: values["database-url"] ? "postgres" : "pglite",
    auth,
    submit: values.bulk ? "SubmitActions x1000" : "SubmitAction x64 concurrent",
    actions: total,
    agents: agents.length,
    slotsTotal: agents.length * slots,
    watchers: watcherCount,
    submitSeconds: +(submittedMs / 1000).toFixed(2),
    submitPerSecond: Math.round(total / (submittedMs / 1000)),
    totalSeconds: +(elapsedMs / 1000).toFixed(2),
    actionsPerSecond: Math.round(total / (elapsedMs / 1000)),
    rssMiB: Math.round(rss),
  }),
);
for (const w of watchers) w.kill();
for (const a of agents) await a.close({ timeoutMs: 1000 });
api.close();
await server.close();
rmSync(dir, { recursive: true, force: true });
process.exit(0);
