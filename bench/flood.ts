/**
 * A flood of bulk submits: `--clients` callers, each sending SubmitActions of
 * 1,000 actions back to back for `--seconds`, every action with a payload of
 * `--fields` numbers (about 21 bytes each: 100 fields make a call of about
 * 2 MiB, under the default receive limit of 4 MiB). The actions go to the
 * cluster `flood`, which no agent serves, so they stay queued.
 *
 *   node --import tsx bench/flood.ts --target 127.0.0.1:7070 [--clients 4] [--fields 100] [--seconds 20]
 *
 * Prints one JSON line: calls answered, calls per second, and the failures by
 * status and message. `heartbeats.ts --flood N` runs it beside the heartbeats,
 * to see whether heavy unary calls delay the acks.
 */

import * as grpc from "@grpc/grpc-js";
import { ActionService } from "../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../src/rpc/client.js";
import { benchArgs, refuse, wholeNumberFlag } from "./args.js";

const { values } = benchArgs(import.meta.url, {
  options: {
    target: { type: "string" },
    clients: { type: "string", default: "4" },
    fields: { type: "string", default: "100" },
    seconds: { type: "string", default: "20" },
  },
});
const target = values.target ?? refuse("--target is required (host:port of the server)");
const clients = wholeNumberFlag("--clients", values.clients);
const fields = wholeNumberFlag("--fields", values.fields, 0);
const seconds = wholeNumberFlag("--seconds", values.seconds);

const api = createClient(ActionService, target, grpc.credentials.createInsecure(), {
  "grpc.max_send_message_length": 64 * 1024 * 1024,
});
const payload: Record<string, number> = {};
for (let i = 0; i < fields; i++) payload[`key-${i}`] = i;

let answered = 0;
let next = 0;
const failures = new Map<string, number>();
const end = performance.now() + seconds * 1000;
const latencies: number[] = [];

async function caller(): Promise<void> {
  while (performance.now() < end) {
    const actions = Array.from({ length: 1000 }, () => ({
      cluster: "flood",
      requestId: `flood-${process.pid}-${next++}`,
      payload,
    }));
    const sent = performance.now();
    try {
      await api.submitActions({ actions });
      answered += 1;
      latencies.push(performance.now() - sent);
    } catch (error) {
      const e = error as { code?: number; details?: string; message?: string };
      const key = `${grpc.status[e.code ?? 2]}: ${(e.details ?? e.message ?? "").slice(0, 100)}`;
      failures.set(key, (failures.get(key) ?? 0) + 1);
    }
  }
}

await Promise.all(Array.from({ length: clients }, caller));
api.close();
latencies.sort((a, b) => a - b);
console.log(
  JSON.stringify({
    clients,
    fields,
    answered,
    callsPerSecond: Number((answered / seconds).toFixed(1)),
    callP50Ms: Math.round(latencies[Math.floor(latencies.length / 2)] ?? 0),
    callMaxMs: Math.round(latencies.at(-1) ?? 0),
    failures: Object.fromEntries(failures),
  }),
);
