import { describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { startTestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

// Each test opens the store twice (PGlite: seconds each on a busy machine).
describe("a restart on the same store", { timeout: 120_000 }, () => {
  it("keeps every action, its state and its request id", async () => {
    let t = await startTestServer();
    try {
      const api = t.client(ActionService);
      const submitted = [];
      for (let i = 0; i < 25; i++) {
        submitted.push(
          (await api.submitAction({ cluster: "keep", requestId: `keep-${i}`, payload: { i } })).action,
        );
      }
      const cancelled = submitted[3]?.id ?? "";
      await api.cancelAction({ actionId: cancelled });

      t = await t.restart();
      const after = t.client(ActionService);
      const listed = await after.listActions({ cluster: "keep", pageSize: 100 });
      expect(listed.actions.map((a) => a.id)).toEqual(submitted.map((a) => a?.id));
      expect(listed.actions.map((a) => a.payload)).toEqual(submitted.map((_, i) => ({ i })));
      expect(listed.actions.find((a) => a.id === cancelled)?.state).toBe(ActionState.CANCELLED);
      // The idempotency keys survive too.
      const retried = await after.submitAction({ cluster: "keep", requestId: "keep-7", payload: { i: 7 } });
      expect(retried).toMatchObject({ created: false, action: { id: submitted[7]?.id } });
    } finally {
      await t.stop();
      await t.store.drop();
    }
  });

  it("extends a live session's deadline to at least the moment the port accepted connections plus the grace (rule 6)", async () => {
    const graceMs = 10_000;
    let t = await startTestServer({ config: { gracePeriod: "10s" } });
    try {
      const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
      t = await t.restart();
      await w.ended;
      // The port is bound before the database is opened: its log line comes
      // first, stamped (in whole milliseconds, rounded down) after the bind.
      const messages = t.logs.map((l) => l.msg);
      const listening = t.logs.find((l) => l.msg === "listening; NOT_SERVING until ready");
      expect(listening?.port).toBe(t.server.port);
      expect(messages.indexOf("listening; NOT_SERVING until ready")).toBeLessThan(
        messages.indexOf("extended live sessions for the restart"),
      );
      const { workers } = await t.client(ClusterService).listWorkers({ cluster: "east" });
      const deadline = workers[0]?.session?.deadline;
      expect(deadline).toBeDefined();
      const deadlineMs = Number(deadline?.seconds) * 1000 + Math.floor((deadline?.nanos ?? 0) / 1e6);
      expect(deadlineMs).toBeGreaterThanOrEqual((listening?.time as number) + graceMs);
    } finally {
      await t.stop();
      await t.store.drop();
    }
  });
});
