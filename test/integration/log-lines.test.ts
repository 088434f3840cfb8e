import { afterEach, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { startTestServer, type TestServer, waitForLog } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * The server's log lines carry what joins them to the rest: the process that
 * wrote them, the session and cause of an expiry, the cluster of a lost
 * stream, and who changed what (operators' changes are audit lines).
 */
describe("the server's log lines", () => {
  let t: TestServer | undefined;
  afterEach(async () => {
    await t?.[Symbol.asyncDispose]();
    t = undefined;
  });

  it("all name the server that wrote them", async () => {
    t = await startTestServer();
    const serving = await waitForLog(t.logs, (l) => l.msg === "leasehold serving");
    expect(serving.serverId).toBe(t.server.serverId);
    await t.client(ActionService).submitAction({ cluster: "east" });
    expect(t.logs.length).toBeGreaterThan(2);
    expect(t.logs.filter((l) => l.serverId !== t?.server.serverId)).toEqual([]);
  });

  it("say which session a lease expired with, and that a restarted agent's expired on its hello, and the lost stream's cluster", async () => {
    t = await startTestServer();
    const first = await connectWorker(t.address, {
      workerId: "w1",
      cluster: "east",
      capacity: 1,
      instanceId: "a",
    });
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    await first.next("grant");
    first.drop();
    expect(
      await waitForLog(t.logs, (l) => l.msg === "worker stream lost" && l.workerId === "w1"),
    ).toMatchObject({ cluster: "east", sessionId: first.welcome.sessionId });
    const second = await connectWorker(t.address, {
      workerId: "w1",
      cluster: "east",
      capacity: 1,
      instanceId: "b",
    });
    const expired = await waitForLog(t.logs, (l) => String(l.msg).startsWith("lease expired for action"));
    expect(expired).toMatchObject({
      actionId: action?.id,
      sessionId: first.welcome.sessionId,
      cause: "restarted",
    });
    second.drop();
  });

  it("record who cancelled an action and who drained and undrained a worker", async () => {
    t = await startTestServer();
    const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "west" });
    const cancelled = await api.cancelAction({ actionId: action?.id ?? "", reason: "not needed" });
    expect(cancelled.action?.state).toBe(ActionState.CANCELLED);
    expect(t.logs.find((l) => l.msg === "audit: cancel action")).toMatchObject({
      level: 30,
      principal: expect.any(String),
      actionId: action?.id,
      cluster: "west",
      reason: "not needed",
      state: "CANCELLED",
    });
    await api.submitAction({ cluster: "west" });
    await api.cancelActions({ cluster: "west", all: true, reason: "clean up" });
    expect(t.logs.find((l) => l.msg === "audit: cancel actions")).toMatchObject({
      cluster: "west",
      cancelled: 1,
      reason: "clean up",
    });
    const clusters = t.client(ClusterService);
    await clusters.drainWorker({ workerId: "w1", reason: "maintenance" });
    await clusters.undrainWorker({ workerId: "w1", reason: "done" });
    expect(t.logs.find((l) => l.msg === "audit: drain worker")).toMatchObject({
      principal: expect.any(String),
      workerId: "w1",
      reason: "maintenance",
    });
    expect(t.logs.find((l) => l.msg === "audit: undrain worker")).toMatchObject({
      workerId: "w1",
      reason: "done",
      outcome: "undrained",
    });
    w.drop();
  });
});
