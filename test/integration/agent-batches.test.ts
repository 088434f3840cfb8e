import { afterEach, describe, expect, it } from "vitest";
import { createAgent } from "../../src/agent/index.js";
import type { ConnectRequest } from "../../src/gen/leasehold/v1/worker_pb.js";
import { type ScriptedResponse, scriptedWorkerServer } from "../helpers/scripted-worker.js";

/** The report messages of the requests, batches opened, in order. */
const reports = (requests: ConnectRequest[]) =>
  requests
    .flatMap((r) => (r.message.case === "batch" ? r.message.value.messages : [r]))
    .map((r) => r.message)
    .filter((m) => m.case === "grantAck" || m.case === "completion");

describe("the agent SDK's batches", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  /** An agent with three slots: a1 and a2 finish at once, a3 when `finishA3` is called. */
  const run = async (acceptsBatches: boolean) => {
    const server = await scriptedWorkerServer({ acceptsBatches });
    cleanups.push(server.close);
    // Once the first ack is out, three grants in one ConnectResponse batch.
    void server.acked.then(() => {
      const grant = (i: number): ScriptedResponse => ({
        message: { case: "grant", value: { actionId: `a${i}`, epoch: 1n, attempt: 1, runId: `r${i}` } },
      });
      server.send({ message: { case: "batch", value: { messages: [grant(1), grant(2), grant(3)] } } });
    });
    let finishA3 = () => {};
    const a3 = new Promise<void>((resolve) => {
      finishA3 = resolve;
    });
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      capacity: 3,
      handler: async (ctx) => {
        if (ctx.actionId === "a3") await a3;
        return { done: ctx.actionId };
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
    return { server, finishA3 };
  };

  it("says accepts_batches in its hello, handles a batch of grants, and sends the reports of one turn in one batch", async () => {
    const { server, finishA3 } = await run(true);
    const ids = () => reports(server.requests).map((m) => `${m.case}:${m.value.actionId}`);
    await server.until(() => ids().length === 3);
    finishA3();
    await server.until(() => ids().length === 4);
    const hello = server.requests[0]?.message;
    expect(hello?.case === "hello" && hello.value.acceptsBatches).toBe(true);
    // a1 and a2 finished in the turn their grants arrived: their completions acknowledge the
    // grants, so no GrantAck goes for them. a3 ran on: its GrantAck went in the same batch.
    expect(ids()).toEqual(["grantAck:a3", "completion:a1", "completion:a2", "completion:a3"]);
    const batches = server.requests.filter((r) => r.message.case === "batch");
    expect(batches.length).toBeGreaterThanOrEqual(1);
    // Heartbeats are never batched.
    for (const b of batches) {
      const inner = b.message.case === "batch" ? b.message.value.messages : [];
      expect(inner.length).toBeGreaterThan(1);
      expect(inner.every((m) => m.message.case !== "heartbeat" && m.message.case !== "hello")).toBe(true);
    }
    // The first three reports went out in one write.
    const first = batches[0]?.message;
    expect(first?.case === "batch" && first.value.messages.map((m) => m.message.case)).toEqual([
      "grantAck",
      "completion",
      "completion",
    ]);
  });

  it("sends its reports one by one, every grant acknowledged, to a server whose welcome does not accept batches", async () => {
    const { server, finishA3 } = await run(false);
    finishA3();
    await server.until((all) => reports(all).length === 6);
    expect(server.requests.filter((r) => r.message.case === "batch")).toEqual([]);
    expect(reports(server.requests).filter((m) => m.case === "grantAck")).toHaveLength(3);
  });
});
