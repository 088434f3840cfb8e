import { createServer } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent, LeaseLost } from "../../src/agent/index.js";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService, WorkerState } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { agentEvents as eventsOf } from "../helpers/agent-events.js";
import { freshStore } from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";
import { freePort } from "../helpers/ports.js";
import { runLeasehold } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

describe("the agent SDK against a real server", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  async function server(port?: number, store?: TestServer["store"], grace = "3s") {
    const t = await startTestServer({
      ...(store ? { store } : {}),
      config: { listen: `127.0.0.1:${port ?? 0}`, gracePeriod: grace, heartbeatInterval: "500ms" },
    });
    return t;
  }

  it("resumes its lease after the server restarts within grace, without calling the handler again", async () => {
    const port = await freePort();
    // A grace far longer than an in-process restart takes on a busy machine: the agent's own
    // guarantee is shorter than the grace by up to two heartbeats and its margin.
    let t = await server(port, undefined, "15s");
    cleanups.push(() => t.stop().then(() => t.store.drop()));
    const calls: number[] = [];
    const finish = deferred<Record<string, unknown>>();
    const events = eventsOf();
    const agent = createAgent({
      address: `127.0.0.1:${port}`,
      cluster: "east",
      workerId: "sdk-1",
      onEvent: events.onEvent,
      initialBackoffMs: 50,
      handler: async (ctx) => {
        calls.push(ctx.epoch);
        return finish.promise;
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    await events.until((e): e is AgentEvent => e.type === "grant");

    t = await t.restart();
    const resumed = await events.until(
      (e): e is Extract<AgentEvent, { type: "connected" }> => e.type === "connected" && e.resumed.length > 0,
    );
    expect(resumed.resumed).toEqual([action?.id]);
    finish.resolve({ done: true });
    await events.until((e): e is AgentEvent => e.type === "finished");
    const got = await t.client(ActionService).getAction({ actionId: action?.id ?? "" });
    expect(got.action).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n, output: { done: true } });
    expect(calls).toEqual([1]);
  });

  it("self-fences: aborts the handler when the server stops answering, before the grace period ends, whatever the wall clock does", async () => {
    await using store = await freshStore();
    const graceMs = 3000;
    const serve = runLeasehold(
      [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--data-dir",
        store.dataDir,
        "--grace-period",
        "3s",
        "--heartbeat-interval",
        "500ms",
      ],
      store.url,
    );
    cleanups.push(() => {
      serve.child.kill("SIGCONT");
      serve.child.kill("SIGKILL");
    });
    const ready = await serve.waitForLog((l) => l.msg === "leasehold serving");
    const address = `127.0.0.1:${ready.port}`;
    const aborted = deferred<{ at: number; reason: unknown }>();
    const started = deferred();
    const events = eventsOf();
    const agent = createAgent({
      address,
      cluster: "east",
      workerId: "fencer",
      onEvent: events.onEvent,
      handler: (ctx) =>
        new Promise((_, reject) => {
          started.resolve();
          ctx.signal.addEventListener("abort", () => {
            aborted.resolve({ at: performance.now(), reason: ctx.signal.reason });
            reject(ctx.signal.reason);
          });
        }),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const api = createClient(ActionService, address);
    cleanups.push(() => api.close());
    await api.submitAction({ cluster: "east" });
    // The handler, not just the grant: a grant waits for a guarantee from an ack before it starts.
    await started.promise;
    // Let a few heartbeats be acknowledged, then freeze the server.
    await new Promise((r) => setTimeout(r, 1200));
    const stoppedAt = performance.now();
    serve.child.kill("SIGSTOP");
    // And the agent's wall clock steps back 6 s (NTP, a VM resumed): the fence counts on a steady
    // clock, or it would keep the work running 6 s past the server's deadline.
    const wallClock = Date.now;
    Date.now = () => wallClock() - 6000;
    cleanups.push(() => {
      Date.now = wallClock;
    });
    const { at, reason } = await aborted.promise;
    Date.now = wallClock;
    expect(reason).toBeInstanceOf(LeaseLost);
    expect((reason as LeaseLost).reason).toBe("self_fenced");
    // The server heard from the agent at most one heartbeat before it froze, so
    // it cannot reap before stoppedAt - heartbeat + grace; the agent stopped first.
    expect(at).toBeLessThan(stoppedAt - 500 + graceMs);
    expect(events.seen.some((e) => e.type === "self_fenced")).toBe(true);
  }, 60_000);

  it("keeps every reconnect delay within an eighth of the welcome's grace period, jittered", async () => {
    // A 2 s grace (the least the server allows): no delay may exceed 250 ms, even with an
    // explicit maxBackoffMs far above it and the server gone for good.
    const t = await server(undefined, undefined, "2s");
    const events = eventsOf();
    const agent = createAgent({
      address: t.address,
      // A cluster of its own: were it to reach another test's server, it would take none of its work.
      cluster: "backoff-only",
      workerId: "backoff",
      onEvent: events.onEvent,
      maxBackoffMs: 60_000,
      handler: async () => undefined,
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const welcomed = await events.until((e): e is AgentEvent => e.type === "connected");
    const port = Number(t.address.split(":").at(-1));
    await t[Symbol.asyncDispose]();
    // The port stays taken, every connection cut at once: a test file running beside this one
    // once started its server on it, and the agent dialling it was welcomed there, ran that
    // test's deployments as no-ops, and never failed the eight tries this test waits for.
    const holder = createServer((socket) => socket.destroy());
    await new Promise<void>((resolve, reject) => {
      holder.once("error", reject);
      holder.listen(port, "127.0.0.1", () => resolve());
    });
    // Let go after the agent has closed (cleanups run last first).
    cleanups.unshift(() => new Promise<void>((resolve) => holder.close(() => resolve())));
    // After the welcome that gave the grace: a try before it (a server still starting, on a busy
    // machine) is paced by the 1 s ceiling of an agent that knows no grace yet.
    const retries = () =>
      events.seen
        .slice(events.seen.indexOf(welcomed))
        .filter((e): e is Extract<AgentEvent, { type: "disconnected" }> => e.type === "disconnected");
    // Enough failed attempts for an unbounded doubling from 200 ms to pass 250 ms several times over.
    await events.until((e): e is AgentEvent => e.type === "disconnected" && retries().length >= 8);
    const delays = retries().map((e) => e.retryInMs);
    for (const delay of delays) expect(delay).toBeLessThanOrEqual(250);
    expect(new Set(delays).size).toBeGreaterThan(1);
  });

  it("aborts the handler on a revoke and reports the cancel", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = eventsOf();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "revokee",
      onEvent: events.onEvent,
      handler: (ctx) =>
        new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason))),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    await events.until((e): e is AgentEvent => e.type === "grant");
    await api.cancelAction({ actionId: action?.id ?? "", reason: "no longer needed" });
    const revoked = await events.until(
      (e): e is Extract<AgentEvent, { type: "revoked" }> => e.type === "revoked",
    );
    expect(revoked.reason).toBe("cancelled");
    await events.until((e): e is AgentEvent => e.type === "finished");
    expect((await api.getAction({ actionId: action?.id ?? "" })).action?.state).toBe(ActionState.CANCELLED);
  });

  it("stops every handler and stays away a grace period when another process takes its worker id's session, then runs the lease anew", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = eventsOf();
    const aborted = deferred<unknown>();
    const letFirstReturn = deferred();
    const firstStarted = deferred();
    const runs: string[] = [];
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "twin",
      onEvent: events.onEvent,
      handler: async (ctx) => {
        runs.push("start");
        if (runs.length > 1) return { again: true };
        firstStarted.resolve();
        // It honours the abort, but takes a while to stop.
        await new Promise<void>((resolve) =>
          ctx.signal.addEventListener("abort", () => {
            aborted.resolve(ctx.signal.reason);
            resolve();
          }),
        );
        await letFirstReturn.promise;
        runs.push("end");
        throw ctx.signal.reason;
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    const granted = await events.until(
      (e): e is Extract<AgentEvent, { type: "grant" }> => e.type === "grant",
    );
    // Started, not only granted: a grant that came before the first ack waits for one, and the
    // takeover would then take it back unrun.
    await firstStarted.promise;
    // A second process, misconfigured with the same worker id, connects: it takes the session
    // over and is sent the lease it did not list, same epoch.
    const twin = await connectWorker(t.address, { workerId: "twin", cluster: "east", capacity: 1 });
    cleanups.push(() => twin.drop());
    expect(await twin.next("grant")).toMatchObject({ actionId: action?.id, epoch: BigInt(granted.epoch) });
    const reason = await aborted.promise;
    expect(reason).toBeInstanceOf(LeaseLost);
    expect((reason as LeaseLost).reason).toBe("superseded");
    const takenOver = await events.until(
      (e): e is Extract<AgentEvent, { type: "taken_over" }> => e.type === "taken_over",
    );
    // The server's grace period is 3 s: the agent leaves the session to the other for that long.
    expect(takenOver.retryInMs).toBeGreaterThanOrEqual(3000);

    // The other process stays (heartbeating) until the agent comes back and takes the session
    // again. Its hello leaves out the lease it stopped, so the server sends it again, same epoch,
    // and it runs anew once the old handler has returned: not resumed with nobody running it.
    let sequence = 0n;
    const beat = setInterval(
      () => twin.send({ message: { case: "heartbeat", value: { sequence: ++sequence } } }),
      500,
    );
    cleanups.push(() => clearInterval(beat));
    await twin.ended;
    clearInterval(beat);
    await events.until(
      (e): e is AgentEvent =>
        e.type === "grant" && events.seen.filter((g) => g.type === "grant").length === 2,
    );
    expect(runs).toEqual(["start"]);
    letFirstReturn.resolve();
    for await (const _ of t.client(ActionService).watchAction({ actionId: action?.id ?? "" }));
    const done = (await t.client(ActionService).getAction({ actionId: action?.id ?? "" })).action;
    expect(done).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n, output: { again: true } });
    expect(runs).toEqual(["start", "end", "start"]);
  });

  it("is refused, and disturbs nothing, when it starts with the worker id of another agent that is connected", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const firstEvents = eventsOf();
    const started = deferred();
    const finish = deferred();
    const runs: string[] = [];
    const first = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "shared-id",
      onEvent: firstEvents.onEvent,
      handler: async (ctx) => {
        runs.push(`first ${ctx.epoch}`);
        started.resolve();
        await finish.promise;
        if (ctx.signal.aborted) throw ctx.signal.reason;
        return { by: "first" };
      },
    });
    cleanups.push(() => first.close({ timeoutMs: 100 }));
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    await started.promise;
    // A second process, misconfigured with the same worker id.
    const secondEvents = eventsOf();
    const second = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "shared-id",
      onEvent: secondEvents.onEvent,
      handler: async () => {
        runs.push("second");
        return { by: "second" };
      },
    });
    cleanups.push(() => second.close({ timeoutMs: 100 }));
    const refusals = () =>
      secondEvents.seen.filter(
        (e): e is Extract<AgentEvent, { type: "taken_over" }> => e.type === "taken_over",
      );
    // Refused, it tries again soon (the other might have been a predecessor not yet marked
    // gone), and is refused again: a refused hello disturbs nothing, so there is no need to wait
    // a grace period as after a takeover.
    await secondEvents.until((e): e is AgentEvent => e.type === "taken_over" && refusals().length >= 2);
    const [firstRefusal, nextRefusal] = refusals();
    expect(firstRefusal?.retryInMs).toBeGreaterThanOrEqual(1000);
    expect(firstRefusal?.retryInMs).toBeLessThanOrEqual(2000);
    expect(nextRefusal?.retryInMs).toBeGreaterThanOrEqual(2000);
    expect(secondEvents.seen.some((e) => e.type === "connected")).toBe(false);
    // The operator learns it from the server's log: once a minute, however often it is refused.
    expect(t.logs.filter((l) => String(l.msg).startsWith("hello of worker shared-id refused"))).toEqual([
      expect.objectContaining({
        level: 30,
        workerId: "shared-id",
        cluster: "east",
        reason: "WORKER_ID_IN_USE",
        msg: expect.stringMatching(/is connected from another process/),
      }),
    ]);
    finish.resolve();
    for await (const _ of t.client(ActionService).watchAction({ actionId: action?.id ?? "" }));
    const done = (await t.client(ActionService).getAction({ actionId: action?.id ?? "" })).action;
    expect(done).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n, output: { by: "first" } });
    // The first agent ran it once, never aborted, and never lost its stream.
    expect(runs).toEqual(["first 1"]);
    expect(firstEvents.seen.filter((e) => e.type === "connected")).toHaveLength(1);
    expect(firstEvents.seen.some((e) => e.type === "taken_over" || e.type === "disconnected")).toBe(false);
  });

  it("holds a grant for a slot whose lease the server ended while its handler still stops, instead of bouncing it", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = eventsOf();
    const deploymentStarted = deferred();
    const stopping = deferred();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "slow-stopper",
      capacity: 1,
      onEvent: events.onEvent,
      handler: async (ctx) => {
        if (!ctx.payload.deployment) return { ok: true };
        deploymentStarted.resolve();
        // It honours the abort, but takes a while to tear down (a container's stop).
        await new Promise<void>((resolve) =>
          ctx.signal.addEventListener("abort", () => {
            stopping.resolve();
            setTimeout(resolve, 500);
          }),
        );
        return {};
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const resources = t.client(ResourceService);
    const deployment = await resources.createDeployment({
      runtime: "east",
      spec: { containers: [{ name: "c", command: { argv: ["true"] } }] },
    });
    await deploymentStarted.promise;
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    const actionId = action?.id ?? "";
    // Deleting the deployment ends its lease on the server, which frees the slot at once and
    // grants the queued action to it while the deployment's handler is still stopping.
    await resources.deleteResource({ resourceId: deployment.resource?.id ?? "" });
    await stopping.promise;
    for await (const _ of api.watchAction({ actionId })); // ends once the action is over
    const done = (await api.getAction({ actionId })).action;
    expect(done).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n });
    // Granted once, run once: never released for want of a slot and granted again.
    expect(events.seen.filter((e) => e.type === "grant" && e.actionId === actionId)).toHaveLength(1);
  });

  it("holds prefetched grants beyond its capacity and starts each as a slot frees, in the order granted", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = eventsOf();
    const started: string[] = [];
    type Gate = { promise: Promise<void>; resolve: () => void };
    const startedOne = new Map<string, Gate>();
    const finish = new Map<string, Gate>();
    const gate = (map: Map<string, Gate>, id: string): Gate => {
      if (!map.has(id)) map.set(id, deferred());
      return map.get(id) as Gate;
    };
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "prefetcher",
      capacity: 1,
      prefetch: 2,
      onEvent: events.onEvent,
      handler: (ctx) => {
        started.push(ctx.actionId);
        gate(startedOne, ctx.actionId).resolve();
        return new Promise((resolve, reject) => {
          ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason));
          gate(finish, ctx.actionId).promise.then(() => resolve({ ran: ctx.actionId }));
        });
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    await events.until((e): e is AgentEvent => e.type === "connected");
    const api = t.client(ActionService);
    const ids: string[] = [];
    for (let n = 0; n < 4; n++) ids.push((await api.submitAction({ cluster: "east" })).action?.id ?? "");
    const [a0, a1, a2, a3] = ids as [string, string, string, string];
    const granted = (id: string) => (e: AgentEvent) => e.type === "grant" && e.actionId === id;
    const grantOf = (id: string) => events.until((e): e is AgentEvent => granted(id)(e));

    // capacity + prefetch = 3 leases; one handler runs, two grants wait for its slot.
    await Promise.all([grantOf(a0), grantOf(a1), grantOf(a2), gate(startedOne, a0).promise]);
    expect(started).toEqual([a0]);

    // a0 ends: a1 (granted first) takes the slot, and the server refills the freed lease with a3.
    const ended = events.seen.length;
    gate(finish, a0).resolve();
    await gate(startedOne, a1).promise;
    await grantOf(a3);
    expect(started).toEqual([a0, a1]);
    expect(events.seen.findIndex(granted(a3))).toBeGreaterThanOrEqual(ended);
    expect((await api.getAction({ actionId: a0 })).action).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { ran: a0 },
    });

    // A revoked waiting grant is given back without running.
    await api.cancelAction({ actionId: a2, reason: "no longer needed" });
    await events.until(
      (e): e is AgentEvent => e.type === "finished" && e.actionId === a2 && e.outcome === "released",
    );
    expect((await api.getAction({ actionId: a2 })).action?.state).toBe(ActionState.CANCELLED);

    // Closing gives back the grants still waiting, unrun, and the running one once aborted.
    const { action: a4 } = await api.submitAction({ cluster: "east" });
    await grantOf(a4?.id ?? "");
    await agent.close({ timeoutMs: 100 });
    expect(started).toEqual([a0, a1]);
    for (const id of [a1, a3, a4?.id ?? ""]) {
      expect((await api.getAction({ actionId: id })).action).toMatchObject({
        state: ActionState.QUEUED,
        epoch: 1n,
      });
    }
  });

  it("refuses a capacity or prefetch the server would refuse", () => {
    for (const prefetch of [-1, 1.5, Number.NaN]) {
      expect(() =>
        createAgent({
          address: "127.0.0.1:1",
          cluster: "east",
          workerId: "w",
          prefetch,
          handler: async () => undefined,
        }),
      ).toThrow(/prefetch must be a whole number of at least 0/);
    }
    const agent = (capacity: number, prefetch: number) => () =>
      createAgent({
        address: "127.0.0.1:1",
        cluster: "east",
        workerId: "w",
        capacity,
        prefetch,
        handler: async () => undefined,
      });
    for (const capacity of [0, 2.5, 10_001]) {
      expect(agent(capacity, 0)).toThrow(/capacity must be a whole number from 1 to 10000/);
    }
    // What the hello would ask for is over the server's limit: refused here, before connecting.
    expect(agent(9_000, 1_001)).toThrow(/capacity \+ prefetch must be at most 10000, not 9000 \+ 1001/);
    // Names the server would refuse in every hello, refused by the same rules before connecting.
    const named = (names: { cluster?: string; workerId?: string; labels?: Record<string, string> }) => () =>
      createAgent({
        address: "127.0.0.1:1",
        cluster: "east",
        workerId: "w",
        ...names,
        handler: async () => undefined,
      });
    expect(named({ cluster: "bad cluster" })).toThrow(/^cluster: may contain only letters/);
    expect(named({ workerId: "" })).toThrow(/^workerId: is required/);
    expect(named({ labels: { "": "v" } })).toThrow(/^labels\[""\]: keys must be/);
  });

  it("drains on close: finishes the running action, reports it, says goodbye", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = eventsOf();
    const started = deferred();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "drainer",
      onEvent: events.onEvent,
      handler: async () => {
        started.resolve();
        await new Promise((r) => setTimeout(r, 300));
        return { finished: "during close" };
      },
    });
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    await started.promise;
    await agent.close();
    expect((await api.getAction({ actionId: action?.id ?? "" })).action).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { finished: "during close" },
    });
    const worker = (await t.client(ClusterService).getWorker({ workerId: "drainer" })).worker;
    expect(worker?.state).toBe(WorkerState.OFFLINE);
  });

  // The first close alone waits 30 s for the handler: the test's timeout fails it long before.
  it("cuts a drain short when close is called again with a shorter timeout: aborts now, gives the lease back", {
    timeout: 15_000,
  }, async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const started = deferred();
    const aborted = deferred<unknown>();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "hurried",
      handler: async (ctx) => {
        started.resolve();
        // Runs until aborted, as a long job does.
        await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
        aborted.resolve(ctx.signal.reason);
        return {};
      },
    });
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    await started.promise;
    const draining = agent.close();
    const hurried = agent.close({ timeoutMs: 0 });
    expect(hurried).toBe(draining);
    expect(await aborted.promise).toMatchObject({ message: "the agent is shutting down" });
    await draining;
    const got = await api.getAction({ actionId: action?.id ?? "" });
    expect(got.action?.state).toBe(ActionState.QUEUED);
    expect(got.attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.RELEASED]);
  });

  it("drains with work still queued: a grant that arrives while it closes goes back with the goodbye, once", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const started: string[] = [];
    const bothStarted = deferred();
    const finishFirst = deferred();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "drainer-queued",
      capacity: 2,
      handler: async (ctx) => {
        started.push(ctx.actionId);
        if (started.length === 2) bothStarted.resolve();
        // The first ends when the test says; the second runs on for a while after it, so the
        // slot the first frees is filled (and, given back, filled again) while the agent closes.
        if (started.length === 1) await finishFirst.promise;
        else await finishFirst.promise.then(() => new Promise((r) => setTimeout(r, 500)));
        return { finished: "during close" };
      },
    });
    const api = t.client(ActionService);
    const { results: running } = await api.submitActions({
      actions: [0, 1].map(() => ({ cluster: "east" })),
    });
    await bothStarted.promise;
    const { results: queued } = await api.submitActions({
      actions: [0, 1, 2].map(() => ({ cluster: "east" })),
    });
    const closed = agent.close();
    finishFirst.resolve();
    await closed;
    for (const r of running) {
      expect((await api.getAction({ actionId: r.action?.id ?? "" })).action?.state).toBe(
        ActionState.SUCCEEDED,
      );
    }
    for (const r of queued) {
      const got = (await api.getAction({ actionId: r.action?.id ?? "" })).action;
      // Given back unrun by the goodbye, granted at most once: not a release and a refill per round.
      expect(got?.state).toBe(ActionState.QUEUED);
      expect(got?.epoch).toBeLessThanOrEqual(1n);
    }
    expect(started).toHaveLength(2);
  });

  it("reports output with NUL bytes cleaned, and a result over the server's limits as a failure, on the same stream", async () => {
    const t = await server();
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = eventsOf();
    const deep: Record<string, unknown> = {};
    let node = deep;
    for (let i = 0; i < 40; i++) node = node.next = {} as Record<string, unknown>;
    const agent = createAgent({
      address: t.address,
      cluster: "limits",
      workerId: "sdk-limits",
      onEvent: events.onEvent,
      handler: async (ctx) => {
        if ((ctx.payload as { deep?: boolean }).deep) return deep;
        expect(() => ctx.progress("a\u0000b", { nested: deep })).toThrow(RangeError);
        return { stdoutTail: "before\u0000after" };
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const api = t.client(ActionService);
    const clean = (await api.submitAction({ cluster: "limits", payload: {} })).action?.id ?? "";
    const overLimit =
      (await api.submitAction({ cluster: "limits", payload: { deep: true } })).action?.id ?? "";
    for (const id of [clean, overLimit]) {
      await events.until((e): e is AgentEvent => e.type === "finished" && e.actionId === id && e.accepted);
    }
    const cleaned = (await api.getAction({ actionId: clean })).action;
    expect(cleaned?.state).toBe(ActionState.SUCCEEDED);
    expect(cleaned?.output).toEqual({ stdoutTail: "before\uFFFDafter" });
    const failed = (await api.getAction({ actionId: overLimit })).action;
    expect(failed?.state).toBe(ActionState.FAILED);
    expect(failed?.failureReason).toMatch(/breaks a server limit/);
    // Neither report ended the stream: the agent connected once.
    expect(events.seen.filter((e) => e.type === "connected")).toHaveLength(1);
  });
});
