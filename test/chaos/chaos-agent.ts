/**
 * The chaos run's agent: an agent built on the SDK (src/agent), run as a real
 * process, that keeps an append-only execution log (one JSON line per event,
 * written with a synchronous write, so a SIGKILL loses nothing already
 * logged). Lines (see checker.ts, AgentLine): `process` when it starts,
 * `start` / `end` around every handler run (with how it ended and why),
 * `deadline` whenever its self-fence deadline moves, and every SDK event.
 *
 * The self-fence deadline is recomputed here from the wire, independently of
 * the SDK's own bookkeeping, exactly as worker.proto defines it: for every
 * HeartbeatAck, the local send time of the acknowledged heartbeat + remaining
 * − margin, the latest so far. To see the wire, the process wraps `write` and
 * `push` of grpc-js's bidirectional call class, which the SDK's Connect
 * stream is: a test-only tap, the SDK is used unchanged.
 *
 * The handler sleeps `payload.sleepMs`, stopping at once when its signal
 * aborts, reports a progress with a checkpoint halfway, then returns
 * `{ worker, epoch, pid }`, or fails non-retryably when `payload.fail`.
 *
 *   node --import tsx test/chaos/chaos-agent.ts <log-file> <address,...> <cluster> <worker-id> <slots> <margin-ms> [<prefetch>]
 *
 * Prints its `process` and `connected` lines on stdout too, for the
 * orchestrator to wait on. SIGTERM closes the agent (goodbye) and exits;
 * so does stdin closing (the orchestrator died).
 */
import { openSync, writeSync } from "node:fs";
import { durationMs } from "@bufbuild/protobuf/wkt";
import { ClientDuplexStreamImpl } from "@grpc/grpc-js/build/src/call.js";
import { ActionFailure, createAgent, LeaseLost } from "../../src/agent/index.js";
import type { ConnectRequest, ConnectResponse } from "../../src/gen/leasehold/v1/worker_pb.js";

const [
  logFile = "",
  addresses = "",
  cluster = "",
  worker = "",
  slots = "2",
  marginArg = "500",
  prefetch = "0",
] = process.argv.slice(2);
const margin = Number(marginArg);
const fd = openSync(logFile, "a");

function log(line: Record<string, unknown>, echo = false): void {
  const text = `${JSON.stringify({ ts: Date.now(), pid: process.pid, worker, ...line })}\n`;
  writeSync(fd, text);
  if (echo) process.stdout.write(text);
}

/** The self-fence deadline seen on the wire (ms since the epoch); −∞ until the first ack. */
let deadline = Number.NEGATIVE_INFINITY;

/** Heartbeats written and not yet acknowledged, per Connect stream: sequence → local send time. */
const sentOn = new WeakMap<object, Map<bigint, number>>();

/** A heartbeat written on `stream`. */
function wrote(stream: object, chunk: unknown): void {
  const m = (chunk as Partial<ConnectRequest> | undefined)?.message;
  if (m?.case !== "heartbeat") return;
  const sent = sentOn.get(stream) ?? new Map<bigint, number>();
  sentOn.set(stream, sent);
  sent.set(m.value.sequence, Date.now());
}

/** A message that arrived on `stream`: heartbeat acks move the deadline. */
function received(stream: object, response: ConnectResponse): void {
  const sent = sentOn.get(stream);
  if (!sent || !response?.message) return;
  const messages =
    response.message.case === "batch"
      ? response.message.value.messages.map((m) => m.message)
      : [response.message];
  for (const m of messages) {
    if (m.case !== "heartbeatAck") continue;
    const at = sent.get(m.value.sequence);
    if (at === undefined) continue;
    // The acknowledged one's send time is kept: a server whose renewal was late answers the same
    // heartbeat again with a fresh remaining (worker.proto), which the SDK applies from that time.
    for (const seq of sent.keys()) if (seq < m.value.sequence) sent.delete(seq);
    const candidate = at + (m.value.remaining ? durationMs(m.value.remaining) : 0) - margin;
    if (candidate > deadline) {
      deadline = candidate;
      log({ type: "deadline", deadline });
    }
  }
}

// grpc-js's bidirectional call object: what the agent writes goes through `write`, what arrives
// through `push` (before the SDK's `data` listener sees it). The agent has no other such calls.
const duplex = ClientDuplexStreamImpl.prototype as unknown as {
  write(this: object, ...args: unknown[]): boolean;
  push(this: object, ...args: unknown[]): boolean;
};
const write = duplex.write;
const push = duplex.push;
duplex.write = function (this: object, ...args: unknown[]) {
  wrote(this, args[0]);
  return write.apply(this, args);
};
duplex.push = function (this: object, ...args: unknown[]) {
  if (args[0]) received(this, args[0] as ConnectResponse);
  return push.apply(this, args);
};

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const onAbort = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

log({ type: "process", addresses }, true);
const agent = createAgent({
  address: addresses.split(","),
  cluster,
  workerId: worker,
  capacity: Number(slots),
  prefetch: Number(prefetch),
  selfFenceMarginMs: margin,
  agentVersion: "leasehold-chaos-agent",
  onEvent: (event) => log({ ...event }, event.type === "connected"),
  handler: async (ctx) => {
    const base = { actionId: ctx.actionId, epoch: ctx.epoch };
    log({ type: "start", ...base, attempt: ctx.attempt });
    let outcome = "aborted";
    try {
      const ms = typeof ctx.payload.sleepMs === "number" ? ctx.payload.sleepMs : 100;
      await sleep(ms / 2, ctx.signal);
      if (!ctx.signal.aborted) ctx.progress("halfway", { ms }, { halfway: true });
      await sleep(ms / 2, ctx.signal);
      if (ctx.signal.aborted) return undefined;
      if (ctx.payload.fail === true) {
        outcome = "failed";
        throw new ActionFailure("this action is planned to fail", { retryable: false });
      }
      outcome = "succeeded";
      return { worker, epoch: ctx.epoch, pid: process.pid };
    } finally {
      const reason = ctx.signal.reason instanceof LeaseLost ? ctx.signal.reason.reason : undefined;
      log({ type: "end", ...base, outcome, ...(outcome === "aborted" && reason ? { reason } : {}) });
    }
  },
});

let stopping = false;
const stop = () => {
  if (stopping) return;
  stopping = true;
  void agent.close({ timeoutMs: 2000 }).finally(() => process.exit(0));
};
process.once("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.resume();
