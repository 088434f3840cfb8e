/**
 * Server memory with a worker that stops reading its stream (issue 11): it
 * says hello with a large capacity, reads nothing after the welcome (HTTP/2
 * flow control then stops the server's sends), and keeps heartbeating, while
 * `--actions` actions with `--payload-kib` KiB payloads wait in the queue.
 *
 *   node --import tsx bench/non-reading-worker.ts [--actions 200] [--payload-kib 256]
 *     [--seconds 15] [--grace-period 10s] [--database-url URL]
 *
 * The server is a real `leasehold serve` child process; its RSS is sampled
 * from /proc every 100 ms. Prints one JSON line: RSS before the worker
 * connects and its peak after, how many actions were granted to the worker,
 * and how its stream ended (the status it got once it read again).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { ActionService, ActionState } from "../src/gen/leasehold/v1/action_pb.js";
import { type ConnectResponse, WorkerService } from "../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../src/rpc/client.js";
import { freePort } from "../test/helpers/ports.js";
import { benchArgs, durationFlag, wholeNumberFlag } from "./args.js";

const { values } = benchArgs(import.meta.url, {
  options: {
    actions: { type: "string", default: "200" },
    "payload-kib": { type: "string", default: "256" },
    seconds: { type: "string", default: "15" },
    "grace-period": { type: "string", default: "10s" },
    "database-url": { type: "string" },
  },
});
const actions = wholeNumberFlag("--actions", values.actions);
const payloadKiB = wholeNumberFlag("--payload-kib", values["payload-kib"], 0);
const measureMs = wholeNumberFlag("--seconds", values.seconds) * 1000;
durationFlag("--grace-period", values["grace-period"]); // checked here; the server takes it as given

const dir = mkdtempSync(join(tmpdir(), "leasehold-bench-"));
const address = `127.0.0.1:${await freePort()}`;
let stopping = false;
const server = startServer();

function startServer(): ChildProcess {
  const args = [
    join(import.meta.dirname, "..", "bin", "leasehold.js"),
    "serve",
    "--listen",
    address,
    "--metrics-listen",
    "off",
    "--grace-period",
    values["grace-period"],
    "--log-level",
    "warn",
    ...(values["database-url"]
      ? ["--database-url", values["database-url"]]
      : ["--data-dir", join(dir, "data")]),
  ];
  const child = spawn(process.execPath, args, { stdio: ["ignore", "inherit", "inherit"] });
  child.on("exit", (code) => {
    if (!stopping) {
      console.error(`the server exited early (${code})`);
      process.exit(1);
    }
  });
  return child;
}

/** The server's resident memory in MiB, from /proc (Linux). */
function serverRssMiB(): number {
  const status = readFileSync(`/proc/${server.pid}/status`, "utf8");
  return Math.round(Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024);
}

async function waitForServer(): Promise<void> {
  for (let i = 0; i < 300; i++) {
    const ready = await new Promise<boolean>((resolve) => {
      const probe = new grpc.Client(address, grpc.credentials.createInsecure());
      probe.waitForReady(Date.now() + 200, (error) => {
        probe.close();
        resolve(!error);
      });
    });
    if (ready) return;
  }
  throw new Error(`the server did not listen on ${address}`);
}

await waitForServer();
// Listing the actions carries their payloads: no 4 MiB cap on answers.
const api = createClient(ActionService, address, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": -1,
});
const blob = "x".repeat(payloadKiB * 1024);
for (let i = 0; i < actions; i++) {
  await api.submitAction({ cluster: "bench", payload: { blob, i } as never });
}
const rssBeforeMiB = serverRssMiB();
console.error("submitted");

// The worker: its own connection; reads the welcome, then nothing.
const workers = createClient(WorkerService, address, grpc.credentials.createInsecure(), {
  "grpc.use_local_subchannel_pool": 1,
});
const call = workers.connect() as unknown as grpc.ClientDuplexStream<unknown, ConnectResponse>;
call.on("error", () => {});
const status = new Promise<grpc.StatusObject>((resolve) => call.on("status", resolve));
let sequence = 0n;
const heartbeats = setInterval(() => {
  sequence += 1n;
  call.write(
    create(WorkerService.method.connect.input, { message: { case: "heartbeat", value: { sequence } } }),
  );
}, 2000);
await new Promise<void>((resolve) => {
  call.once("data", () => {
    call.pause();
    resolve();
  });
  call.write(
    create(WorkerService.method.connect.input, {
      message: { case: "hello", value: { workerId: "deaf", cluster: "bench", capacity: 10_000 } },
    }),
  );
});

console.error("welcomed");
let rssPeakMiB = rssBeforeMiB;
const started = performance.now();
while (performance.now() - started < measureMs) {
  rssPeakMiB = Math.max(rssPeakMiB, serverRssMiB());
  await new Promise((resolve) => setTimeout(resolve, 100));
}
const rssEndMiB = serverRssMiB();
console.error("measured");

const listed = await api.listActions({ cluster: "bench", pageSize: 1000 });
const granted = listed.actions.filter((a) => a.lease?.workerId === "deaf").length;
const queued = listed.actions.filter((a) => a.state === ActionState.QUEUED).length;

// Read again to learn how the stream ended (if it did).
clearInterval(heartbeats);
call.resume();
call.on("data", () => {});
const ended = await Promise.race([
  status.then((s) => `${grpc.status[s.code]}: ${s.details}`),
  new Promise<string>((resolve) => setTimeout(() => resolve("still open"), 2000)),
]);

console.log(
  JSON.stringify({
    bench: "non-reading-worker",
    driver: values["database-url"] ? "postgres" : "pglite",
    actions,
    payloadKiB,
    seconds: measureMs / 1000,
    rssBeforeMiB,
    rssPeakMiB,
    rssEndMiB,
    grantedToWorker: granted,
    queued,
    stream: ended,
  }),
);
stopping = true;
call.cancel();
workers.close();
api.close();
server.kill("SIGTERM");
await new Promise((resolve) => server.once("exit", resolve));
rmSync(dir, { recursive: true, force: true });
