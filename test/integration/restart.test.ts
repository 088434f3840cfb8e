import { durationMs } from "@bufbuild/protobuf/wkt";
import { status } from "@grpc/grpc-js";
import { sql } from "drizzle-orm";
import { describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { startTestServer } from "../helpers/server.js";
import { statusDetails } from "../helpers/status.js";
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

  it("answers a heartbeat during a graceful close with a deadline stored afresh, so the worker's guarantee outlasts the restart", async () => {
    const graceMs = 6_000;
    /** The database handle of the latest server. */
    let db: Db | undefined;
    let t = await startTestServer({
      config: { gracePeriod: "6s", heartbeatInterval: "1s" },
      overrides: {
        handOverMs: 5_000,
        wrapDb: (d) => {
          db = d;
          return d;
        },
      },
    });
    try {
      await t.client(ActionService).submitAction({ cluster: "handover", payload: {} });
      const hello = { workerId: "hw", cluster: "handover", capacity: 1, instanceId: "hw-1" };
      const w = await connectWorker(t.address, hello);
      const grant = await w.next("grant");
      const held = [{ actionId: grant.actionId, epoch: grant.epoch }];
      await w.heartbeat(1, held);
      // The worker stays silent for two seconds: until the handover, every ack would promise at
      // most the grace period less those two seconds (the stored deadline is last heard + grace).
      await new Promise((resolve) => setTimeout(resolve, 2_000));
      const stopping = t.stop(); // the handover begins at once, before the streams end
      // Without a handover the stream ends unanswered.
      const ack = await Promise.race([w.heartbeat(2, held), w.ended.then(() => undefined)]);
      const remaining = ack?.remaining;
      expect(remaining && durationMs(remaining)).toBeGreaterThan(graceMs - 1_500);
      await stopping;
      const end = await w.ended;
      expect(end.code).toBe(status.UNAVAILABLE);
      expect(statusDetails(end.metadata).reason).toBe("SHUTTING_DOWN");
      expect(t.logs.find((l) => l.msg === "handed over 1 of 1 worker streams")).toBeDefined();

      // The worker comes back to the restarted server with its lease: resumed, same epoch (and
      // named once, though this hello lists it twice).
      t = await t.restart();
      // Its stream_lost event says the server ended the stream on shutdown: not a crash of the agent.
      for await (const { event } of t
        .client(EventService)
        .watchEvents({ workerId: "hw", kind: EventKind.STREAM_LOST, afterSequence: 0n })) {
        expect(event?.details).toMatchObject({ reason: "SHUTTING_DOWN" });
        expect(event?.message).toMatch(/ended by its server shutting down/);
        break;
      }
      // Ended on purpose: until its deadline, the session does not count as lost for the
      // partition valve (a rolling restart is no partition).
      const [row] = await queryRows<{ lost: boolean; handed_over: boolean }>(
        db as Db,
        sql`select stream_lost_at is not null as lost, stream_handed_over as handed_over
            from sessions where worker_id = 'hw' and ended_at is null`,
      );
      expect(row).toEqual({ lost: true, handed_over: true });
      const again = await connectWorker(t.address, { ...hello, heldLeases: [...held, ...held] });
      expect(again.welcome.resumed).toEqual([expect.objectContaining(held[0])]);
      again.goodbye();
    } finally {
      await t.stop();
      await t.store.drop();
    }
  });

  it("ends the streams once the handover's wait runs out, whether or not their workers heartbeat", async () => {
    const t = await startTestServer({ overrides: { handOverMs: 300 } });
    try {
      const silent = await connectWorker(t.address, { workerId: "mute", cluster: "handover", capacity: 1 });
      await t.stop();
      expect((await silent.ended).code).toBe(status.UNAVAILABLE);
      expect(t.logs.find((l) => l.msg === "handed over 0 of 1 worker streams")).toBeDefined();
    } finally {
      await t.stop();
      await t.store.drop();
    }
  });
});
