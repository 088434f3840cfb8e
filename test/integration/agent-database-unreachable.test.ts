import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, type AgentOptions, createAgent } from "../../src/agent/agent.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { WorkerService } from "../../src/gen/leasehold/v1/worker_pb.js";
import { type CuttableProxy, cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/**
 * Two servers on one PostgreSQL, each through a proxy that can cut it off:
 * the server an agent is on loses its database, the other does not.
 */
describe.runIf(runsPostgresTests())("an agent whose server lost its database", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  /**
   * Two servers, each reaching the database through a proxy of its own; by default with the
   * default timings: the agent must be gone well before its guarantee is.
   */
  async function twoServers(config = { gracePeriod: "10s", heartbeatInterval: "2s" }): Promise<{
    servers: TestServer[];
    proxies: CuttableProxy[];
    store: TestStore;
  }> {
    const store = await freshPostgresDatabase();
    cleanups.push(() => store.drop());
    const servers: TestServer[] = [];
    const proxies: CuttableProxy[] = [];
    for (let i = 0; i < 2; i++) {
      const url = new URL(store.url as string);
      const proxy = await cuttableProxy(url.hostname, Number(url.port || 5432));
      cleanups.push(() => proxy.close());
      url.host = `127.0.0.1:${proxy.port}`;
      const server = await startTestServer({
        store: { ...store, url: url.toString() },
        config,
      });
      cleanups.push(() => server.stop());
      servers.push(server);
      proxies.push(proxy);
    }
    return { servers, proxies, store };
  }

  /** An agent given both servers' addresses, its events kept in `events`; closed after the test. */
  function agentOn(servers: TestServer[], events: AgentEvent[], handler: AgentOptions["handler"]): void {
    const agent = createAgent({
      address: servers.map((s) => s.address),
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler,
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
  }

  /**
   * An agent on both servers, with one action submitted and started; its handler holds it until
   * `finish` resolves. `runs()`: how many times the handler was called.
   */
  async function holding(servers: TestServer[]) {
    const events: AgentEvent[] = [];
    const started = deferred<string>();
    const finish = deferred();
    let runs = 0;
    agentOn(servers, events, async (ctx) => {
      runs += 1;
      started.resolve(ctx.actionId);
      await finish.promise;
      return { done: true };
    });
    const submitted = await (servers[0] as TestServer)
      .client(ActionService)
      .submitAction({ cluster: "east" });
    const actionId = submitted.action?.id as string;
    expect(await started.promise).toBe(actionId);
    return { events, actionId, finish, runs: () => runs };
  }

  it("moves to the server that serves, which resumes its lease: the work runs once", async () => {
    const { servers, proxies } = await twoServers();
    const { events, actionId, finish, runs } = await holding(servers);
    const api = (s: TestServer) => s.client(ActionService);

    const connected = events.find((e) => e.type === "connected");
    const on = servers.findIndex((s) => s.address === (connected as { address: string }).address);
    expect(on).not.toBe(-1);
    const other = servers[1 - on] as TestServer;
    // The agent's server loses its database; the other keeps it.
    proxies[on]?.cut();

    const moved = await until(events, (e) => e.type === "connected" && e.address === other.address);
    expect(moved).toMatchObject({ resumed: [actionId], revoked: [] });
    const left = events.find((e) => e.type === "disconnected");
    expect(left).toMatchObject({
      error: expect.stringMatching(
        new RegExp(`^the server cannot reach its database; ${other.address} serves$`),
      ),
    });
    finish.resolve();
    await until(events, (e) => e.type === "finished" && e.actionId === actionId);
    const done = (await api(other).getAction({ actionId })).action;
    expect(done).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n });
    expect(runs()).toBe(1);
    expect(events.filter((e) => e.type === "self_fenced" || e.type === "revoked")).toEqual([]);
    expect(events.find((e) => e.type === "finished")).toMatchObject({ accepted: true, epoch: 1 });
  }, 60_000);

  it("moves back when the first server has its database again and the second loses it", async () => {
    // A round of health checks comes at most every 4 intervals, counted from the first move's: with
    // a 2 s interval that left 1.3-1.8 s of the guarantee. A 1 s interval leaves about 5 s.
    const { servers, proxies } = await twoServers({ gracePeriod: "10s", heartbeatInterval: "1s" });
    const { events, actionId, finish, runs } = await holding(servers);
    const connected = events.find((e) => e.type === "connected") as { address: string };
    const first = servers.findIndex((s) => s.address === connected.address);
    const second = 1 - first;

    proxies[first]?.cut();
    await until(events, (e) => e.type === "connected" && e.address === servers[second]?.address);
    // The first server has its database again, and says so; then the second loses its own.
    proxies[first]?.restore();
    const health = healthClient((servers[first] as TestServer).address);
    cleanups.push(() => health.close());
    while ((await health.check(WorkerService.typeName)) !== "SERVING") {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const movesBefore = events.filter((e) => e.type === "connected").length;
    proxies[second]?.cut();

    const back = await until(
      events,
      (e) =>
        e.type === "connected" &&
        e.address === servers[first]?.address &&
        events.filter((x) => x.type === "connected").indexOf(e) >= movesBefore,
    );
    expect(back).toMatchObject({ resumed: [actionId], revoked: [] });
    finish.resolve();
    await until(events, (e) => e.type === "finished" && e.actionId === actionId);
    const done = (await (servers[first] as TestServer).client(ActionService).getAction({ actionId })).action;
    expect(done).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n });
    expect(runs()).toBe(1);
    expect(events.filter((e) => e.type === "self_fenced" || e.type === "revoked")).toEqual([]);
  }, 90_000);

  it("stays when no other server serves either (the database is down for all), and self-fences", async () => {
    const { servers, proxies } = await twoServers();
    const events: AgentEvent[] = [];
    const started = deferred<string>();
    agentOn(servers, events, async (ctx) => {
      started.resolve(ctx.actionId);
      await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
      return {};
    });
    const submitted = await (servers[0] as TestServer)
      .client(ActionService)
      .submitAction({ cluster: "east" });
    expect(await started.promise).toBe(submitted.action?.id);
    const connected = events.find((e) => e.type === "connected") as { address: string };
    const on = servers.findIndex((s) => s.address === connected.address);
    // The other server first, and only once it says NOT_SERVING: then the agent's own.
    const other = servers[1 - on] as TestServer;
    proxies[1 - on]?.cut();
    const health = healthClient(other.address);
    cleanups.push(() => health.close());
    while ((await health.check(WorkerService.typeName)) !== "NOT_SERVING") {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    proxies[on]?.cut();
    await until(events, (e) => e.type === "self_fenced");
    // Its server's acks said it cannot reach its database, and the agent asked the other,
    // which said NOT_SERVING: it stayed on its stream, and self-fenced as with one address.
    const fence = events.findIndex((e) => e.type === "self_fenced");
    expect(fence).not.toBe(-1);
    expect(events.slice(0, fence).filter((e) => e.type === "disconnected" || e.type === "connected")).toEqual(
      [expect.objectContaining({ type: "connected" })],
    );
    expect(events[fence]).toMatchObject({ actionIds: [submitted.action?.id], databaseUnreachable: true });
    // Once the database is back, the release it made is applied and marked as the self-fence's.
    for (const proxy of proxies) proxy.restore();
    const first = healthClient((servers[0] as TestServer).address);
    cleanups.push(() => first.close());
    while ((await first.check(WorkerService.typeName)) !== "SERVING") {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const watch = (servers[0] as TestServer).client(EventService).watchEvents({
      actionId: submitted.action?.id ?? "",
      kind: EventKind.LEASE_RELEASED,
      afterSequence: 0n,
    });
    for await (const m of watch) {
      expect(m.event?.details).toEqual({ self_fenced: true });
      // Acks kept coming: what failed was the server's database, and the release says so.
      expect(m.event?.message).toMatch(/the server could not reach its database to extend the lease/);
      break;
    }
  }, 60_000);
});

/**
 * Resolves with the first event of `events` (pushed to as they come) that
 * `matches`; throws once the agent self-fenced without one.
 */
async function until(
  events: readonly AgentEvent[],
  matches: (e: AgentEvent) => boolean,
): Promise<AgentEvent> {
  for (;;) {
    const found = events.find(matches);
    if (found) return found;
    if (events.some((e) => e.type === "self_fenced"))
      throw new Error(`the agent self-fenced first: ${JSON.stringify(events)}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
