import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { agentEvents, finishedOf } from "../helpers/agent-events.js";
import { deferred } from "../helpers/deferred.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * A worker that is stopping takes no more grants (worker.proto, StopGrants):
 * the work goes to the other workers at once instead of waiting, granted to
 * the stopping one, for its goodbye.
 */
describe("StopGrants: a stopping worker takes no more work", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  async function server(): Promise<TestServer> {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    return t;
  }

  async function rawWorker(t: TestServer, workerId: string, stopGrants = false) {
    const w = await connectWorker(t.address, { workerId, cluster: "east", capacity: 2, stopGrants });
    cleanups.push(() => w.drop());
    return w;
  }

  const submit = async (t: TestServer) => {
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    return action?.id ?? "";
  };

  it("a stream that sent StopGrants is passed over, and another worker gets the action", async () => {
    const t = await server();
    const stopping = await rawWorker(t, "stopping");
    expect(stopping.welcome.acceptsStopGrants).toBe(true);
    stopping.send({ message: { case: "stopGrants", value: { reason: "shutting down" } } });
    // Messages of a stream are handled in order: once this heartbeat is answered, so was StopGrants.
    await stopping.heartbeat(1);
    const id = await submit(t);
    const other = await rawWorker(t, "other");
    const grant = await other.next("grant");
    expect(grant.actionId).toBe(id);
    expect(stopping.received.filter((m) => m.message.case === "grant")).toEqual([]);
  });

  it("StopGrants inside a batch counts the same", async () => {
    const t = await server();
    const stopping = await rawWorker(t, "stopping");
    stopping.send({
      message: {
        case: "batch",
        value: {
          messages: [
            { message: { case: "stopGrants", value: {} } },
            { message: { case: "heartbeat", value: { sequence: 1n } } },
          ],
        },
      },
    });
    await stopping.next("heartbeatAck", (a) => a.sequence === 1n);
    const id = await submit(t);
    const other = await rawWorker(t, "other");
    expect((await other.next("grant")).actionId).toBe(id);
    expect(stopping.received.filter((m) => m.message.case === "grant")).toEqual([]);
  });

  it("a hello with stop_grants opens a stream that gets no grants", async () => {
    const t = await server();
    const stopping = await rawWorker(t, "stopping", true);
    expect(stopping.welcome.acceptsStopGrants).toBe(true);
    const id = await submit(t);
    const other = await rawWorker(t, "other");
    expect((await other.next("grant")).actionId).toBe(id);
    expect(stopping.received.filter((m) => m.message.case === "grant")).toEqual([]);
  });

  it("the leases a stopping stream holds are still its own: its completion is accepted", async () => {
    const t = await server();
    const w = await rawWorker(t, "stopping");
    const id = await submit(t);
    const grant = await w.next("grant");
    w.send({ message: { case: "stopGrants", value: {} } });
    const result = await w.complete(grant, { output: { done: true } });
    expect(result.accepted).toBe(true);
    const { action } = await t.client(ActionService).getAction({ actionId: id });
    expect(action?.state).toBe(ActionState.SUCCEEDED);
  });

  it("a StopGrants reason over 1024 characters ends the stream INVALID_ARGUMENT, naming the field", async () => {
    const t = await server();
    const w = await rawWorker(t, "stopping");
    w.send({ message: { case: "stopGrants", value: { reason: "x".repeat(1025) } } });
    const ended = await w.ended;
    expect(ended.code).toBe(3);
    expect(ended.details).toContain("stop_grants.reason");
  });

  describe("the SDK's close()", () => {
    /** An agent whose handlers wait, each until the test lets its action finish. */
    function gatedAgent(t: TestServer, workerId: string, options: { capacity: number; prefetch?: number }) {
      const gates = new Map<string, ReturnType<typeof deferred<void>>>();
      const gate = (id: string) => {
        let g = gates.get(id);
        if (!g) {
          g = deferred();
          gates.set(id, g);
        }
        return g;
      };
      const events = agentEvents();
      const agent = createAgent({
        address: t.address,
        cluster: "east",
        workerId,
        ...options,
        onEvent: events.onEvent,
        handler: async (ctx) => {
          await gate(ctx.actionId).promise;
          return {};
        },
      });
      cleanups.push(async () => {
        for (const g of gates.values()) g.resolve(undefined);
        await agent.close({ timeoutMs: 0 });
      });
      return { agent, events, finish: (id: string) => gate(id).resolve(undefined) };
    }

    const grantOf =
      (actionId: string) =>
      (e: AgentEvent): e is Extract<AgentEvent, { type: "grant" }> =>
        e.type === "grant" && e.actionId === actionId;

    it("a slot freed while closing is not filled: the queued action goes to another agent", async () => {
      const t = await server();
      const a = gatedAgent(t, "a", { capacity: 2 });
      await a.events.until((e) => e.type === "connected");
      const [a1, a2] = [await submit(t), await submit(t)];
      await a.events.until(grantOf(a1));
      await a.events.until(grantOf(a2));
      const b = gatedAgent(t, "b", { capacity: 1 });
      const b1 = await submit(t);
      await b.events.until(grantOf(b1));
      // Both agents are full: a3 waits in the queue.
      const a3 = await submit(t);

      const closed = a.agent.close();
      a.finish(a1);
      await a.events.until(finishedOf(a1));
      b.finish(b1);
      // Had a1's freed slot been filled, a3 would have gone to the closing agent, to wait there
      // for a2 and the goodbye.
      const whoGotA3 = await Promise.race([
        a.events.until(grantOf(a3)).then(() => "a"),
        b.events.until(grantOf(a3)).then(() => "b"),
      ]);
      expect(whoGotA3).toBe("b");
      b.finish(a3);
      await b.events.until(finishedOf(a3));
      a.finish(a2);
      expect(await closed).toEqual({ goodbye: true, stillRunning: [], stopped: [] });
      expect(a.events.seen.filter((e) => e.type === "grant").map((e) => e.actionId)).toEqual([a1, a2]);
    });

    it("a prefetched grant is given back as close begins, and runs on another agent at once", async () => {
      const t = await server();
      const a = gatedAgent(t, "a", { capacity: 1, prefetch: 1 });
      await a.events.until((e) => e.type === "connected");
      const a1 = await submit(t);
      await a.events.until(grantOf(a1));
      const a2 = await submit(t);
      await a.events.until(grantOf(a2));
      const b = gatedAgent(t, "b", { capacity: 1 });
      await b.events.until((e) => e.type === "connected");

      const closed = a.agent.close();
      // a1 still runs on a; a2 did not wait for it.
      await b.events.until(grantOf(a2));
      b.finish(a2);
      await b.events.until(finishedOf(a2));
      a.finish(a1);
      expect(await closed).toEqual({ goodbye: true, stillRunning: [], stopped: [] });
      const { action } = await t.client(ActionService).getAction({ actionId: a1 });
      expect(action?.state).toBe(ActionState.SUCCEEDED);
    });
  });
});
