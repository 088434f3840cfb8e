/**
 * Worker streams per process and heartbeat ack latency (goal, listed
 * in bench/README.md: 10,000 streams, 1 s heartbeats, p99 ack < 20 ms, RSS < 1 GiB).
 *
 *   node --import tsx bench/heartbeats.ts [--streams 10000] [--connections 100]
 *     [--interval 1000] [--seconds 20] [--database-url URL] [--profile-dir DIR]
 *     [--no-batches] [--server-node-args="--trace-gc ..."] [--client raw|grpc] [--flood 0]
 *
 * The server is a real `leasehold serve` child process (one JavaScript
 * thread, as in production); this process plays the workers: raw
 * WorkerService.Connect streams spread over `--connections` HTTP/2
 * connections, each heartbeating every `--interval` ms at a random phase.
 * `--client raw` (the default) speaks gRPC's framing over node:http2 with
 * one timer per connection; `--client grpc` uses a grpc-js client per
 * connection and a timer per stream, as before 2026-12-04 (heavier: this
 * process then shows in the acks' tail more than the server does).
 * Ack latency is measured here, from the write of a heartbeat to its ack,
 * so it includes this process's own event loop: on a 2-core machine the
 * workers and the server share the cores. Prints one JSON line.
 * `--profile-dir` writes a CPU profile of the server there (node --cpu-prof).
 * The hellos set accepts_batches, as the agent SDK does (the server may then
 * answer in ConnectResponse batches); `--no-batches` leaves it unset.
 * `--flood N` runs `flood.ts` with N callers of SubmitActions (1,000 actions
 * of about 2 KiB a call, back to back) against the server for the measured
 * window, in a process of its own: heavy unary calls beside the heartbeats.
 * Its summary is the output's `flood`.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { connect as http2Connect } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  type ConnectRequest,
  ConnectRequestSchema,
  type ConnectResponse,
  ConnectResponseSchema,
  WorkerService,
} from "../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../src/rpc/client.js";
import { decodeServerMessage } from "../src/rpc/worker-wire.js";
import { freePort } from "../test/helpers/ports.js";
import { benchArgs, choiceFlag, wholeNumberFlag } from "./args.js";

const { values } = benchArgs(import.meta.url, {
  options: {
    streams: { type: "string", default: "10000" },
    connections: { type: "string", default: "100" },
    interval: { type: "string", default: "1000" },
    seconds: { type: "string", default: "20" },
    "database-url": { type: "string" },
    "profile-dir": { type: "string" },
    "no-batches": { type: "boolean", default: false },
    "server-node-args": { type: "string", default: "" },
    client: { type: "string", default: "raw" },
    flood: { type: "string", default: "0" },
  },
});
const floodClients = wholeNumberFlag("--flood", values.flood, 0);
const rawClient = choiceFlag("--client", values.client, ["raw", "grpc"]) === "raw";
const acceptsBatches = !values["no-batches"];
const streams = wholeNumberFlag("--streams", values.streams);
const connections = Math.min(wholeNumberFlag("--connections", values.connections), streams);
const intervalMs = wholeNumberFlag("--interval", values.interval);
const measureMs = wholeNumberFlag("--seconds", values.seconds) * 1000;

const dir = mkdtempSync(join(tmpdir(), "leasehold-bench-"));
const port = await freePort();
const address = `127.0.0.1:${port}`;
const metricsPort = await freePort();
const server = startServer();

/** How late a loop ran, from a `monitorEventLoopDelay` sample (ns) of a timer every `resolutionMs`. */
function lateMs(sampleNs: number, resolutionMs: number): number {
  return Number(Math.max(0, sampleNs / 1e6 - resolutionMs).toFixed(2));
}

/**
 * How late the server's event loop ran since the last call (its
 * `nodejs_eventloop_delay_seconds` metric, which each scrape restarts).
 */
async function serverLoopLateness(): Promise<{ p99Ms: number; maxMs: number }> {
  const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
  const ms = (quantile: string) => {
    const m = text.match(
      new RegExp(`^nodejs_eventloop_delay_seconds\\{quantile="${quantile}"\\} (\\S+)$`, "m"),
    );
    return Number((Number(m?.[1]) * 1000).toFixed(2));
  };
  return { p99Ms: ms("0.99"), maxMs: ms("1") };
}

/**
 * `flood.ts` against the server for the measured window, in a process of its
 * own (`--flood N` callers of SubmitActions); `stop` waits for its summary.
 */
function startFlood(): { stop(): Promise<unknown> } {
  const child = spawn(
    process.execPath,
    [
      "--import",
      "tsx",
      join(import.meta.dirname, "flood.ts"),
      "--target",
      address,
      "--clients",
      String(floodClients),
      "--seconds",
      String(measureMs / 1000),
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  let out = "";
  child.stdout?.on("data", (chunk: Buffer) => {
    out += chunk.toString();
  });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  return {
    async stop() {
      await exited;
      return JSON.parse(out.trim().split("\n").at(-1) ?? "null");
    },
  };
}

/** `leasehold serve` on `port`, resolved once it accepts connections. */
function startServer(): ChildProcess {
  const profile = values["profile-dir"];
  const args = [
    ...(profile ? ["--cpu-prof", `--cpu-prof-dir=${profile}`] : []),
    ...(values["server-node-args"] ?? "").split(" ").filter(Boolean),
    join(import.meta.dirname, "..", "bin", "leasehold.js"),
    "serve",
    "--listen",
    address,
    "--metrics-listen",
    `127.0.0.1:${metricsPort}`,
    "--heartbeat-interval",
    `${intervalMs}ms`,
    "--grace-period",
    `${Math.max(10_000, intervalMs * 3)}ms`,
    "--log-level",
    "warn",
    // Every stream comes from this one address, as from behind a NAT: no per-address bounds.
    "--max-connections-per-address",
    "0",
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
let stopping = false;

/** The server's resident memory and CPU seconds so far, from /proc (Linux). */
function serverUsage(): { rssMiB: number; cpuSeconds: number } {
  const status = readFileSync(`/proc/${server.pid}/status`, "utf8");
  const rssKiB = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  const stat = readFileSync(`/proc/${server.pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime, in clock ticks (100 Hz)
  return { rssMiB: Math.round(rssKiB / 1024), cpuSeconds: ticks / 100 };
}

type Call = grpc.ClientDuplexStream<unknown, ConnectResponse>;

// Separate subchannel pools: each client is its own TCP connection, as separate agents would be.
const clients = rawClient
  ? []
  : Array.from({ length: connections }, () =>
      createClient(WorkerService, address, grpc.credentials.createInsecure(), {
        "grpc.use_local_subchannel_pool": 1,
      }),
    );
await waitForServer();

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

const latencies: number[] = [];
let measuring = false;
/** performance.now() when the window opened. */
let measuredFrom = Number.POSITIVE_INFINITY;
let failures = 0;
const calls: Call[] = [];

/** Opens stream `i`: hello, welcome, then heartbeats at a random phase of the interval. */
function open(i: number): Promise<void> {
  return rawClient ? openRaw(i) : openGrpc(i);
}

/** Stream `i`'s hello. */
const hello = (i: number): ConnectRequest =>
  create(ConnectRequestSchema, {
    message: {
      case: "hello",
      value: { workerId: `hb-${i}`, cluster: "bench", capacity: 1, acceptsBatches },
    },
  });

/**
 * What both clients do with the server's messages on one stream: once
 * welcomed, `start` schedules its heartbeats (each written by `send`); each
 * ack is timed from its heartbeat's write. Batches are unwrapped.
 */
function heartbeating(
  send: (sequence: number) => void,
  start: (beat: () => void) => void,
  welcomed: () => void,
): (response: ConnectResponse) => void {
  const sent = new Map<number, number>();
  let sequence = 0;
  const beat = () => {
    sequence += 1;
    sent.set(sequence, performance.now());
    send(sequence);
  };
  const handle = (m: ConnectResponse["message"]) => {
    if (m.case === "welcome") {
      welcomed();
      start(beat);
    } else if (m.case === "heartbeatAck") {
      const sequence = Number(m.value.sequence);
      const at = sent.get(sequence);
      sent.delete(sequence);
      // Only heartbeats written inside the window: one written before it may have waited
      // behind this process's own work between runs (its first fetch loads a module).
      if (at !== undefined && measuring && at >= measuredFrom) latencies.push(performance.now() - at);
    }
  };
  return (response) => {
    const m = response.message;
    if (m.case === "batch") for (const inner of m.value.messages) handle(inner.message);
    else handle(m);
  };
}

function openGrpc(i: number): Promise<void> {
  const client = clients[i % connections] as (typeof clients)[number];
  const call = client.connect() as unknown as Call;
  calls.push(call);
  return new Promise((welcomed, failed) => {
    call.on("error", (error) => {
      if (!stopping) failures += 1;
      failed(error);
    });
    const receive = heartbeating(
      (sequence) =>
        call.write(
          create(ConnectRequestSchema, {
            message: { case: "heartbeat", value: { sequence: BigInt(sequence) } },
          }),
        ),
      (beat) =>
        setTimeout(() => {
          beat();
          const timer = setInterval(beat, intervalMs);
          call.on("close", () => clearInterval(timer));
        }, Math.random() * intervalMs),
      welcomed,
    );
    call.on("data", receive);
    call.write(hello(i));
  });
}

/**
 * The raw client (the default): plain node:http2 sessions speaking gRPC's framing, one timer per
 * connection ticking every 10 ms for the streams due in that slot of the interval. grpc-js's
 * client costs about as much CPU per message as the server; with 10,000 streams on a 2-core
 * machine it made this process, not the server, the larger part of the acks' tail.
 */
const sessions = rawClient
  ? Array.from({ length: connections }, () => {
      const session = http2Connect(`http://${address}`);
      session.on("error", () => {
        if (!stopping) failures += 1;
      });
      return session;
    })
  : [];
const SLOT_MS = 10;
/** Per connection: streams by slot of the interval (each beats when its slot comes round). */
const due = sessions.map(() =>
  Array.from({ length: Math.max(1, Math.round(intervalMs / SLOT_MS)) }, () => [] as (() => void)[]),
);
const tickers: NodeJS.Timeout[] = [];
if (rawClient) {
  for (const slots of due) {
    let slot = 0;
    const started = performance.now();
    // Set by elapsed time, not counted ticks: a late tick catches up on the slots it missed.
    tickers.push(
      setInterval(() => {
        const target = Math.floor((performance.now() - started) / SLOT_MS);
        for (; slot <= target; slot++) for (const beat of slots[slot % slots.length] ?? []) beat();
      }, SLOT_MS),
    );
  }
}

/**
 * `ConnectRequest{heartbeat: {sequence}}` in a gRPC frame, written by hand:
 * encoding through protobuf-es made this process, not the server, the
 * source of most of the acks' tail (its collections paused it 8-13 ms).
 */
function heartbeatFrame(sequence: number): Buffer {
  let size = 1;
  for (let n = sequence; n >= 128; n = Math.floor(n / 128)) size++;
  const out = Buffer.allocUnsafe(5 + 3 + size);
  out[0] = 0;
  out.writeUInt32BE(3 + size, 1);
  out[5] = 0x12; // field 2 (heartbeat), length-delimited
  out[6] = 1 + size;
  out[7] = 0x08; // field 1 (sequence), varint
  let n = sequence;
  for (let i = 8; i < out.length; i++, n = Math.floor(n / 128))
    out[i] = (n % 128) | (i < out.length - 1 ? 0x80 : 0);
  return out;
}

/** A gRPC message frame: no compression, big-endian length, the message. */
function frame(message: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(5 + message.length);
  out[0] = 0;
  out.writeUInt32BE(message.length, 1);
  out.set(message, 5);
  return out;
}

function openRaw(i: number): Promise<void> {
  const c = i % connections;
  const session = sessions[c] as (typeof sessions)[number];
  const stream = session.request({
    ":method": "POST",
    ":path": `/${WorkerService.typeName}/Connect`,
    "content-type": "application/grpc",
    te: "trailers",
  });
  rawStreams.push(stream);
  const write = (request: ConnectRequest) => stream.write(frame(toBinary(ConnectRequestSchema, request)));
  let pending: Buffer = Buffer.alloc(0);
  return new Promise((welcomed, failed) => {
    stream.on("error", (error) => {
      if (!stopping) failures += 1;
      failed(error);
    });
    stream.on("trailers", (trailers) => {
      if (!stopping && trailers["grpc-status"] !== "0") {
        failures += 1;
        failed(new Error(`stream ${i} ended: ${trailers["grpc-status"]} ${trailers["grpc-message"]}`));
      }
    });
    const receive = heartbeating(
      (sequence) => stream.write(heartbeatFrame(sequence)),
      (beat) => {
        const slots = due[c] as (() => void)[][];
        (slots[Math.floor(Math.random() * slots.length)] as (() => void)[]).push(beat);
      },
      welcomed,
    );
    stream.on("data", (chunk: Buffer) => {
      pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
      while (pending.length >= 5) {
        const length = pending.readUInt32BE(1);
        if (pending.length < 5 + length) break;
        const bytes = pending.subarray(5, 5 + length);
        // The agent's own reader (acks and batches of them); anything else the ordinary way.
        receive(decodeServerMessage(bytes) ?? fromBinary(ConnectResponseSchema, bytes));
        pending = pending.subarray(5 + length);
      }
    });
    write(hello(i));
  });
}
const rawStreams: ReturnType<(typeof sessions)[number]["request"]>[] = [];

const openStarted = performance.now();
const OPEN_CONCURRENCY = 200;
let nextStream = 0;
await Promise.all(
  Array.from({ length: OPEN_CONCURRENCY }, async () => {
    while (nextStream < streams) await open(nextStream++);
  }),
);
const openSeconds = (performance.now() - openStarted) / 1000;

// A first scrape loads this process's fetch (tens of milliseconds of compiling): not in the window.
await serverLoopLateness();
// Two intervals to settle, then measure.
await new Promise((r) => setTimeout(r, 2 * intervalMs));
let maxRss = 0;
const sampler = setInterval(() => {
  maxRss = Math.max(maxRss, serverUsage().rssMiB);
}, 500);
const before = serverUsage();
const ownBefore = process.cpuUsage();
// This process's own event loop delay: a late ack may be this process's lateness, not the server's.
const ownDelay = monitorEventLoopDelay({ resolution: 5 });
ownDelay.enable();
await serverLoopLateness(); // restarts the server's sampling: what follows is the measured window's
measuring = true;
measuredFrom = performance.now();
const flood = floodClients > 0 ? startFlood() : undefined;
await new Promise((r) => setTimeout(r, measureMs));
measuring = false;
const flooded = await flood?.stop();
ownDelay.disable();
const serverLate = await serverLoopLateness();
const after = serverUsage();
const own = process.cpuUsage(ownBefore);
clearInterval(sampler);

latencies.sort((a, b) => a - b);
const at = (q: number) =>
  Number((latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? 0).toFixed(2));
console.log(
  JSON.stringify({
    driver: values["database-url"] ? "postgres" : "pglite",
    streams,
    connections,
    acceptsBatches,
    intervalMs,
    openSeconds: Number(openSeconds.toFixed(2)),
    acks: latencies.length,
    acksPerSecond: Math.round(latencies.length / (measureMs / 1000)),
    p50Ms: at(0.5),
    p99Ms: at(0.99),
    maxMs: Number((latencies.at(-1) ?? 0).toFixed(2)),
    serverRssMiB: Math.max(maxRss, after.rssMiB),
    serverCpuPercent: Math.round(((after.cpuSeconds - before.cpuSeconds) / (measureMs / 1000)) * 100),
    streamErrors: failures,
    workersCpuPercent: Math.round(((own.user + own.system) / 1e6 / (measureMs / 1000)) * 100),
    // Both less their sampling interval (5 ms here, 10 ms in the server): how late each loop ran.
    workersLoopDelayP99Ms: lateMs(ownDelay.percentile(99), 5),
    workersLoopDelayMaxMs: lateMs(ownDelay.max, 5),
    serverLoopDelayP99Ms: serverLate.p99Ms,
    serverLoopDelayMaxMs: serverLate.maxMs,
    ...(flooded ? { flood: flooded } : {}),
  }),
);

stopping = true;
for (const call of calls) call.cancel();
for (const c of clients) c.close();
for (const t of tickers) clearInterval(t);
for (const stream of rawStreams) stream.close();
for (const session of sessions) session.destroy();
server.kill("SIGTERM");
await new Promise((r) => server.once("exit", r));
rmSync(dir, { recursive: true, force: true });
// Closed channels can keep the process alive for minutes (reconnect timers): the run is over.
process.exit(0);
