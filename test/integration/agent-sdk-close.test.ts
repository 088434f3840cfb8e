import { createServer } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { createAgent } from "../../src/agent/index.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { agentEvents } from "../helpers/agent-events.js";
import { deferred } from "../helpers/deferred.js";
import { scriptedWorkerServer } from "../helpers/scripted-worker.js";
import { startTestServer } from "../helpers/server.js";

describe("an SDK agent's close() says what it did", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  async function connectedAgent(handler: Parameters<typeof createAgent>[0]["handler"]) {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = agentEvents();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "closing",
      onEvent: events.onEvent,
      handler,
    });
    cleanups.push(() => agent.close({ timeoutMs: 0 }));
    await events.until((e) => e.type === "connected");
    return { t, agent, events };
  }

  it("the goodbye was confirmed by the server, and no handler was left running", async () => {
    const { agent } = await connectedAgent(async () => ({}));
    expect(await agent.close()).toEqual({ goodbye: true, stillRunning: [], stopped: [] });
  });

  it("the goodbye was not confirmed when the server is gone", async () => {
    const { t, agent, events } = await connectedAgent(async () => ({}));
    await t.stop();
    await events.until((e) => e.type === "disconnected");
    expect(await agent.close({ timeoutMs: 0 })).toEqual({ goodbye: false, stillRunning: [], stopped: [] });
  });

  it("has no goodbye to wait for when it was never welcomed and no hello is out", async () => {
    // A port that cuts every connection: the agent only ever retries.
    const holder = createServer((socket) => socket.destroy());
    await new Promise<void>((resolve) => holder.listen(0, "127.0.0.1", resolve));
    cleanups.push(() => holder.close());
    const events = agentEvents();
    const agent = createAgent({
      address: `127.0.0.1:${(holder.address() as { port: number }).port}`,
      cluster: "never-welcomed",
      workerId: "never",
      onEvent: events.onEvent,
      handler: async () => ({}),
    });
    await events.until((e) => e.type === "disconnected");
    // It used to wait 5 s for a goodbye it could never say; the bound leaves room for a busy machine.
    const started = performance.now();
    expect(await agent.close()).toEqual({ goodbye: false, stillRunning: [], stopped: [] });
    expect(performance.now() - started).toBeLessThan(4000);
  });

  it("asks for no more grants when close() comes between the hello and the welcome", async () => {
    const welcome = deferred();
    const server = await scriptedWorkerServer({ acceptsStopGrants: true, welcomeAfter: welcome.promise });
    cleanups.push(() => server.close());
    const agent = createAgent({
      address: server.address,
      cluster: "east",
      workerId: "early",
      handler: async () => ({}),
    });
    await server.next("hello");
    const closed = agent.close();
    welcome.resolve();
    await server.next("goodbye");
    expect(server.received).toEqual(expect.arrayContaining(["stopGrants"]));
    expect(server.received.indexOf("stopGrants")).toBeLessThan(server.received.indexOf("goodbye"));
    await closed;
  });

  it("names the actions whose handler ignored its abort signal when their leases were given back", async () => {
    const started = deferred();
    const never = deferred();
    cleanups.push(() => never.resolve());
    const { t, agent } = await connectedAgent(async () => {
      started.resolve();
      await never.promise;
    });
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    await started.promise;
    expect(await agent.close({ timeoutMs: 0 })).toEqual({
      goodbye: true,
      stillRunning: [action?.id],
      stopped: [{ actionId: action?.id, epoch: 1 }],
    });
  });
});
