import { createServer, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import { Code } from "../../src/errors.js";
import { deferred } from "../helpers/deferred.js";
import { scriptedWorkerServer } from "../helpers/scripted-worker.js";

/** Blocks this thread, timers and all, as a SIGSTOP or a frozen VM would stop the process. */
function freeze(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

describe("the agent SDK, paused past its local deadline", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("tells the handler its lease is lost, and gives the lease back instead of completing it", async () => {
    // Acks guarantee 3 s: the local deadline is 2.5 s after each heartbeat is sent.
    const server = await scriptedWorkerServer({ remainingMs: 3000 });
    cleanups.push(server.close);
    const events: AgentEvent[] = [];
    const seen = deferred<boolean>();
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: async (ctx) => {
        // The handler's own timer is due long before the fence's; then the process freezes
        // past the deadline. On waking, both are overdue and the handler's runs first.
        const shortWait = new Promise((resolve) => setTimeout(resolve, 20));
        freeze(4000);
        await shortWait;
        seen.resolve(ctx.signal.aborted);
        return { done: true };
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    await server.acked;
    server.send({ message: { case: "grant", value: { actionId: "a1", epoch: 1n, attempt: 1 } } });
    // The signal, read after the deadline, is aborted: the fence ran when it was read.
    expect(await seen.promise).toBe(true);
    await server.until(() => server.received.includes("release"));
    expect(server.received).not.toContain("completion");
    expect(events.some((e) => e.type === "self_fenced")).toBe(true);
  });
});

describe("the agent SDK, whose session the server reaped", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });
  const reaped = {
    code: Code.Aborted,
    reason: "SESSION_REAPED",
    message: "this session passed its deadline and was reaped",
  };
  const helloAfter = (server: Awaited<ReturnType<typeof scriptedWorkerServer>>, index: number) => {
    const hellos = server.requests.filter((r) => r.message.case === "hello");
    const hello = hellos[index]?.message;
    return hello?.case === "hello" ? hello.value : undefined;
  };

  it("after a pause past its deadline, neither lists the self-fenced leases in its next hello nor releases them", async () => {
    // Acks guarantee 3 s: the local deadline is 2.5 s after each heartbeat is sent.
    const server = await scriptedWorkerServer({ remainingMs: 3000 });
    cleanups.push(server.close);
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      capacity: 2,
      onEvent: (e) => events.push(e),
      handler: (ctx) => new Promise((resolve) => ctx.signal.addEventListener("abort", () => resolve({}))),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    await server.acked;
    server.send({ message: { case: "grant", value: { actionId: "a1", epoch: 1n, attempt: 1 } } });
    server.send({ message: { case: "grant", value: { actionId: "a2", epoch: 1n, attempt: 1 } } });
    await server.until(() => server.received.filter((k) => k === "grantAck").length === 2);
    // The server reaps the session while the process is stopped (SIGSTOP past the deadline):
    // on waking, the fence runs first and releases go out on a stream the server has closed.
    server.answerReports(false);
    freeze(4000);
    await server.until(() => server.received.filter((k) => k === "release").length === 2);
    expect(events.some((e) => e.type === "self_fenced")).toBe(true);
    server.answerReports(true);
    const releases = server.received.filter((k) => k === "release").length;
    server.endStream(reaped);
    await server.until(() => server.requests.filter((r) => r.message.case === "hello").length === 2);
    expect(helloAfter(server, 1)?.heldLeases).toEqual([]);
    // Its heartbeats list nothing either, and the releases are not sent again.
    await server.next("heartbeat");
    await server.next("heartbeat");
    expect(server.received.filter((k) => k === "release").length).toBe(releases);
    const beats = server.requests.filter((r) => r.message.case === "heartbeat");
    const last = beats.at(-1)?.message;
    expect(last?.case === "heartbeat" && last.value.heldLeases).toEqual([]);
  });

  it("stops the handlers still running and drops unanswered reports, reporting nothing more of them", async () => {
    const server = await scriptedWorkerServer();
    cleanups.push(server.close);
    const events: AgentEvent[] = [];
    const aborted: unknown[] = [];
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      capacity: 2,
      onEvent: (e) => events.push(e),
      handler: (ctx) =>
        ctx.actionId === "done"
          ? Promise.resolve({ ok: true })
          : new Promise((resolve) =>
              ctx.signal.addEventListener("abort", () => {
                aborted.push(ctx.signal.reason);
                resolve({});
              }),
            ),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    await server.acked;
    server.answerReports(false);
    server.send({ message: { case: "grant", value: { actionId: "running", epoch: 1n, attempt: 1 } } });
    server.send({ message: { case: "grant", value: { actionId: "done", epoch: 1n, attempt: 1 } } });
    // The completion is sent and not answered before the server reaps the session.
    await server.until(() => server.received.includes("completion"));
    server.answerReports(true);
    server.endStream(reaped);
    await server.until(() => server.requests.filter((r) => r.message.case === "hello").length === 2);
    expect(helloAfter(server, 1)?.heldLeases).toEqual([]);
    expect(aborted).toEqual([expect.objectContaining({ name: "LeaseLost", reason: "expired" })]);
    expect(events).toContainEqual({ type: "revoked", actionId: "running", epoch: 1, reason: "expired" });
    await server.next("heartbeat");
    await server.next("heartbeat");
    expect(server.received.filter((k) => k === "completion").length).toBe(1);
    expect(server.received).not.toContain("release");
    expect(server.received).not.toContain("progress");
  });
});

describe("the agent SDK, on a server that stops answering", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("leaves the stream after 1.5 heartbeat intervals without an ack, and says hello again", async () => {
    const server = await scriptedWorkerServer({ heartbeatMs: 3000 });
    cleanups.push(server.close);
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: async () => ({}),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    await server.acked;
    // Hung: the stream stays open, and no heartbeat is answered (the interval is 3 s).
    server.ackHeartbeats(false);
    const hellos = server.received.filter((k) => k === "hello").length;
    await server.until(() => server.received.filter((k) => k === "hello").length > hellos);
    const left = events.find((e) => e.type === "disconnected");
    expect(left).toMatchObject({
      error: expect.stringMatching(/^the server answered no heartbeat for \d+ms$/),
    });
    // Left 4.5 s after the heartbeat, not at the next beat after that (6 s).
    const silentMs = Number(/for (\d+)ms/.exec((left as { error: string }).error)?.[1]);
    expect(silentMs).toBeGreaterThan(4500);
    expect(silentMs).toBeLessThan(5600);
  });

  it("leaves a server that holds its hello without answering a health check, before its leases expire", async () => {
    // Acks guarantee 8 s; HTTP/2 keepalive would notice the hung server only after 15 s.
    const good = await scriptedWorkerServer({ heartbeatMs: 1000, remainingMs: 8000, graceMs: 8000 });
    cleanups.push(good.close);
    const hung = await silentListener();
    cleanups.push(hung.close);
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: [good.address, hung.address],
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: (ctx) => new Promise((resolve) => ctx.signal.addEventListener("abort", () => resolve({}))),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    // Wherever the agent went first, it ends up welcomed here (leaving the silent one).
    await good.acked;
    good.send({ message: { case: "grant", value: { actionId: "a1", epoch: 1n, attempt: 1 } } });
    await good.until(() => good.received.includes("grantAck"));
    // This server goes away: the only other address is the silent one.
    const hellos = good.received.filter((k) => k === "hello").length;
    good.endStream();
    await hung.connected;
    await good.until(() => good.received.filter((k) => k === "hello").length > hellos);
    const hello = good.requests.findLast((r) => r.message.case === "hello")?.message;
    expect(hello?.case === "hello" && hello.value.heldLeases.map((l) => l.actionId)).toEqual(["a1"]);
    expect(events).toContainEqual(
      expect.objectContaining({
        type: "disconnected",
        error: expect.stringMatching(
          /^the server answered no health check for \d+ms before welcoming the agent$/,
        ),
      }),
    );
    expect(events.filter((e) => e.type === "self_fenced")).toEqual([]);
  });
});

/** A TCP listener that takes connections and never writes a byte: a stopped server process. */
async function silentListener() {
  const sockets = new Set<Socket>();
  let connected: () => void = () => {};
  const first = new Promise<void>((resolve) => {
    connected = resolve;
  });
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on("error", () => {});
    socket.pause();
    connected();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  return {
    address: `127.0.0.1:${typeof address === "object" && address ? address.port : 0}`,
    connected: first,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}
