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

type ScriptedServer = Awaited<ReturnType<typeof scriptedWorkerServer>>;

/** How many hellos `server` got. */
const hellos = (server: ScriptedServer) => server.requests.filter((r) => r.message.case === "hello").length;

/** The last heartbeat `server` got. */
const lastBeat = (server: ScriptedServer) => {
  const beat = server.requests.filter((r) => r.message.case === "heartbeat").at(-1)?.message;
  return beat?.case === "heartbeat" ? beat.value : undefined;
};

/** The `index`th hello `server` got. */
const helloAt = (server: ScriptedServer, index: number) => {
  const hello = server.requests.filter((r) => r.message.case === "hello")[index]?.message;
  return hello?.case === "hello" ? hello.value : undefined;
};

/**
 * An agent of capacity 2 on `server` whose action "done" succeeds at once,
 * and whose other actions wait for their abort (its reason goes to
 * `aborted`), then return once `stopped` resolves: a handler that takes a
 * while to stop, as a command waiting for its process group does.
 */
function agentWithADoneAction(server: ScriptedServer, workerId: string, stopped: Promise<void>) {
  const events: AgentEvent[] = [];
  const aborted: unknown[] = [];
  const agent = createAgent({
    address: server.address,
    workerId,
    cluster: "east",
    capacity: 2,
    onEvent: (e) => events.push(e),
    handler: (ctx) =>
      ctx.actionId === "done"
        ? Promise.resolve({ ok: true })
        : new Promise((resolve) =>
            ctx.signal.addEventListener("abort", () => {
              aborted.push(ctx.signal.reason);
              void stopped.then(() => resolve({ stopped: true }));
            }),
          ),
  });
  return { agent, events, aborted };
}

/**
 * Grants "running" and "done" once the agent has a guarantee, and resolves
 * once the completion of "done" was sent, unanswered: the server answers
 * reports again from then on.
 */
async function runningAndAnUnansweredCompletion(server: ScriptedServer): Promise<void> {
  await server.acked;
  server.answerReports(false);
  server.send({ message: { case: "grant", value: { actionId: "running", epoch: 1n, attempt: 1 } } });
  server.send({ message: { case: "grant", value: { actionId: "done", epoch: 1n, attempt: 1 } } });
  await server.until(() => server.received.includes("completion"));
  server.answerReports(true);
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
    await server.until(() => hellos(server) === 2);
    expect(helloAt(server, 1)?.heldLeases).toEqual([]);
    // Its heartbeats list nothing either, and the releases are not sent again.
    await server.next("heartbeat");
    await server.next("heartbeat");
    expect(server.received.filter((k) => k === "release").length).toBe(releases);
    expect(lastBeat(server)?.heldLeases).toEqual([]);
  });

  it("stops the handlers still running and drops unanswered reports, reporting nothing more of them", async () => {
    const server = await scriptedWorkerServer();
    cleanups.push(server.close);
    const { agent, events, aborted } = agentWithADoneAction(server, "w1", Promise.resolve());
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    // The completion is sent and not answered before the server reaps the session.
    await runningAndAnUnansweredCompletion(server);
    server.endStream(reaped);
    await server.until(() => hellos(server) === 2);
    expect(helloAt(server, 1)?.heldLeases).toEqual([]);
    expect(aborted).toEqual([expect.objectContaining({ name: "LeaseLost", reason: "expired" })]);
    expect(events).toContainEqual({ type: "revoked", actionId: "running", epoch: 1, reason: "expired" });
    await server.next("heartbeat");
    await server.next("heartbeat");
    expect(server.received.filter((k) => k === "completion").length).toBe(1);
    expect(server.received).not.toContain("release");
    expect(server.received).not.toContain("progress");
  });
});

describe("the agent SDK, whose worker id another process uses", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });
  const endings = [
    {
      code: Code.Aborted,
      reason: "SESSION_TAKEN_OVER",
      message: "a newer stream of this worker took the session over",
    },
    { code: Code.AlreadyExists, reason: "WORKER_ID_IN_USE", message: "connected from another process" },
  ];
  it.each(endings)(
    "($reason) drops every lease: unanswered reports are not sent again, and a handler still stopping is neither listed nor reported on",
    async (ending) => {
      // A grace period of 1 s: the agent comes back 1 to 2 s after a takeover.
      const server = await scriptedWorkerServer({ heartbeatMs: 200, graceMs: 1000 });
      cleanups.push(server.close);
      const stopping = deferred();
      const { agent, events, aborted } = agentWithADoneAction(server, "twin", stopping.promise);
      cleanups.push(() => agent.close({ timeoutMs: 100 }));
      // The completion is sent and not answered before the other process takes the session.
      await runningAndAnUnansweredCompletion(server);
      server.endStream(ending);
      await server.until(() => hellos(server) === 2);
      expect(aborted).toEqual([expect.objectContaining({ name: "LeaseLost", reason: "superseded" })]);
      expect(events).toContainEqual(expect.objectContaining({ type: "taken_over" }));
      // The handler of "running" is still stopping: its lease is the other process's all the same.
      expect(helloAt(server, 1)?.heldLeases).toEqual([]);
      await server.next("heartbeat");
      expect(lastBeat(server)?.heldLeases).toEqual([]);
      stopping.resolve();
      await server.next("heartbeat");
      await server.next("heartbeat");
      expect(server.received.filter((k) => k === "completion").length).toBe(1);
      expect(server.received).not.toContain("release");
      expect(lastBeat(server)?.heldLeases).toEqual([]);
      expect(events.filter((e) => e.type === "finished")).toEqual([]);
    },
  );

  it("does not release, on close, the lease of a handler that ignored its abort after a takeover", async () => {
    const server = await scriptedWorkerServer({ heartbeatMs: 200, graceMs: 1000 });
    cleanups.push(server.close);
    const started = deferred();
    const agent = createAgent({
      address: server.address,
      workerId: "twin",
      cluster: "east",
      handler: () => {
        started.resolve();
        return new Promise(() => {});
      },
    });
    await server.acked;
    server.send({ message: { case: "grant", value: { actionId: "stubborn", epoch: 1n, attempt: 1 } } });
    await started.promise;
    server.endStream(endings[0]);
    await server.until(() => hellos(server) === 2);
    await server.next("heartbeat");
    // Close waits 5 s for the handler, which never returns.
    const result = await agent.close({ timeoutMs: 100 });
    expect(result.stillRunning).toEqual(["stubborn"]);
    expect(server.received).not.toContain("release");
    expect(server.received).toContain("goodbye");
  }, 15_000);
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

  it("leaves a peer that never starts HTTP/2 with one address too, closing each connection it opened", {
    timeout: 90_000,
  }, async () => {
    // A middlebox that accepts TCP and whose backend hangs: grpc-js waits for its HTTP/2
    // SETTINGS without a bound, and keepalive starts only after them. Before, an agent with one
    // address sat on the first connection forever, saying nothing.
    const hung = await silentListener();
    cleanups.push(hung.close);
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: hung.address,
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: async () => ({}),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    // A second attempt: the first was left after the setup bound (10 s), and its connection closed.
    await hung.until((c) => c.accepted >= 2 && c.closed >= 1);
    expect(events.filter((e) => e.type === "disconnected").slice(0, 1)).toEqual([
      expect.objectContaining({
        error: expect.stringMatching(/^the server did not set up the connection \(HTTP\/2\) within \d+ms$/),
      }),
    ]);
  });
});

/**
 * A TCP listener that takes connections, reads what comes and never writes
 * a byte: a stopped server process, or a middlebox whose backend hangs.
 * `until` waits for a condition on how many connections it took and saw closed.
 */
async function silentListener() {
  const sockets = new Set<Socket>();
  let connected: () => void = () => {};
  const first = new Promise<void>((resolve) => {
    connected = resolve;
  });
  const counts = { accepted: 0, closed: 0 };
  const waiters = new Set<() => void>();
  const changed = () => {
    for (const w of waiters) w();
  };
  const server = createServer((socket) => {
    sockets.add(socket);
    counts.accepted += 1;
    socket.on("error", () => {});
    socket.on("close", () => {
      counts.closed += 1;
      changed();
    });
    socket.resume();
    connected();
    changed();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  return {
    address: `127.0.0.1:${typeof address === "object" && address ? address.port : 0}`,
    connected: first,
    counts,
    until(test: (c: typeof counts) => boolean): Promise<void> {
      return new Promise((resolve) => {
        const check = () => {
          if (!test(counts)) return;
          waiters.delete(check);
          resolve();
        };
        waiters.add(check);
        check();
      });
    },
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}
