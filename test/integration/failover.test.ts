import { describe, expect, it } from "vitest";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { type Event, EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { runAgent } from "../helpers/process.js";
import { startTestServer } from "../helpers/server.js";

// Real PostgreSQL, real timers (grace 2 s), real agent processes killed with SIGKILL.
describe.runIf(runsPostgresTests())("failover after an agent is killed", () => {
  it("expires the lease at the deadline and re-grants it to the other agent with epoch + 1; it completes once", async () => {
    await using store = await freshPostgresDatabase();
    const t = await startTestServer({ store, config: { gracePeriod: "2s", heartbeatInterval: "500ms" } });
    const doomed = runAgent([t.address, "east", "doomed", "hold"]);
    let survivor: ReturnType<typeof runAgent> | undefined;
    try {
      await doomed.waitForLine((l) => l.event === "welcome");
      const api = t.client(ActionService);
      const { action } = await api.submitAction({ cluster: "east", payload: { argv: ["sleep", "3600"] } });
      const id = action?.id ?? "";
      await doomed.waitForLine((l) => l.event === "grant" && l.actionId === id && l.epoch === "1");
      survivor = runAgent([t.address, "east", "survivor", "complete"]);
      await survivor.waitForLine((l) => l.event === "welcome");

      const seen: Event[] = [];
      const watching = (async () => {
        for await (const m of t.client(EventService).watchEvents({ actionId: id, afterSequence: 0n })) {
          if (m.event) seen.push(m.event);
          if (m.event?.kind === EventKind.ACTION_SUCCEEDED) return;
        }
      })();
      doomed.child.kill("SIGKILL");
      await survivor.waitForLine((l) => l.event === "grant" && l.actionId === id && l.epoch === "2");
      await watching;

      expect(seen.map((e) => e.kind)).toEqual([
        EventKind.ACTION_SUBMITTED,
        EventKind.LEASE_GRANTED,
        EventKind.LEASE_EXPIRED,
        EventKind.LEASE_GRANTED,
        EventKind.ACTION_SUCCEEDED,
      ]);
      expect(seen[2]?.message).toBe(`lease expired for action ${id} (worker doomed, cluster east, epoch 1)`);
      expect(seen[3]).toMatchObject({ workerId: "survivor", epoch: 2n });
      const lost = await t
        .client(EventService)
        .listEvents({ workerId: "doomed", kind: EventKind.STREAM_LOST });
      expect(lost.events).toHaveLength(1);
      expect(t.logs.map((l) => l.msg)).toContain(seen[2]?.message);

      const got = await api.getAction({ actionId: id });
      expect(got.action).toMatchObject({
        state: ActionState.SUCCEEDED,
        output: { worker: "survivor" },
        epoch: 2n,
      });
      expect(got.attempts.map((a) => [a.workerId, a.outcome])).toEqual([
        ["doomed", AttemptOutcome.LEASE_EXPIRED],
        ["survivor", AttemptOutcome.SUCCEEDED],
      ]);
    } finally {
      doomed.child.kill("SIGKILL");
      survivor?.child.kill("SIGKILL");
      await t.stop();
    }
  });
});
