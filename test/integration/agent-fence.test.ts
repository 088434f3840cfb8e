import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
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

describe("the agent SDK, on a server that stops answering", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("leaves the stream after 1.5 heartbeat intervals without an ack, and says hello again", async () => {
    const server = await scriptedWorkerServer();
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
    // Hung: the stream stays open, and no heartbeat is answered (the interval is 1 s).
    server.ackHeartbeats(false);
    const hellos = server.received.filter((k) => k === "hello").length;
    await server.until(() => server.received.filter((k) => k === "hello").length > hellos);
    const left = events.find((e) => e.type === "disconnected");
    expect(left).toMatchObject({
      error: expect.stringMatching(/^the server answered no heartbeat for \d+ms$/),
    });
  });

  it("leaves a server whose acks stop extending the guarantee for the next address, but stays with a single one", async () => {
    const servers = [await scriptedWorkerServer(), await scriptedWorkerServer()] as const;
    cleanups.push(servers[0].close, servers[1].close);
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: servers.map((x) => x.address),
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: async () => ({}),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    // It starts at a random one of the two.
    await Promise.race(servers.map((x) => x.acked));
    const [from, to] = servers[0].received.includes("hello") ? servers : [servers[1], servers[0]];
    // It answers every heartbeat, but its guarantee only counts down (the interval is 1 s).
    from.stopExtending();
    await to.next("hello");
    expect(events.find((e) => e.type === "disconnected")).toMatchObject({
      error: expect.stringMatching(/^the server has not extended the lease guarantee for \d+ms/),
    });

    // With no other address, the agent stays: leaving would gain nothing.
    const alone = await scriptedWorkerServer();
    cleanups.push(alone.close);
    const single: AgentEvent[] = [];
    const one = createAgent({
      address: alone.address,
      workerId: "w2",
      cluster: "east",
      onEvent: (e) => single.push(e),
      handler: async () => ({}),
    });
    cleanups.push(() => one.close({ timeoutMs: 100 }));
    await alone.acked;
    alone.stopExtending();
    // Six heartbeats later (four intervals is the bound), the same stream is still open.
    for (let i = 0; i < 6; i++) await alone.next("heartbeat");
    expect(alone.received.filter((k) => k === "hello")).toHaveLength(1);
    expect(single.some((e) => e.type === "disconnected")).toBe(false);
  });
});
