import { describe, expect, it } from "vitest";
import type { ActionHistory } from "../../src/store/queries/explain-action.js";
import type { ActionRecord, AttemptRecord, JsonObject } from "../../src/work/action.js";
import type { EventKind, EventRecord } from "../../src/work/event.js";
import { explainHistory } from "../../src/work/explain.js";

const at = (s: number) => new Date(Date.UTC(2026, 11, 7, 6, 0, s));
const attempt: AttemptRecord = {
  actionId: "a1",
  epoch: 1,
  workerId: "w1",
  sessionId: "s1",
  outcome: "LEASE_EXPIRED",
  error: null,
  startedAt: at(0),
  endedAt: at(4),
};
let sequence = 0;
const event = (
  kind: EventKind,
  s: number,
  details: JsonObject | null,
  epoch: number | null = null,
): EventRecord => ({
  sequence: ++sequence,
  kind,
  at: at(s),
  actionId: epoch === null ? null : "a1",
  workerId: "w1",
  cluster: "east",
  sessionId: "s1",
  epoch,
  leaseId: null,
  message: "",
  details,
  actor: "",
});

/** The timeline's sentences of a session s1 lost at 0:02 and ended at 0:04, its deadline 0:12. */
function told(events: EventRecord[]): string[] {
  const history: ActionHistory = {
    action: { id: "a1" } as ActionRecord,
    attempts: [
      {
        attempt,
        session: {
          lastHeardAt: at(2),
          deadline: at(12),
          streamLostAt: at(2),
          endedAt: at(4),
          endReason: "reaped",
        },
      },
    ],
    events,
    truncated: false,
    now: at(20),
  };
  return explainHistory(history)
    .timeline.filter((s) => s.event)
    .map((s) => s.summary);
}

describe("explain, on how a session ended", () => {
  it("tells a stream its server ended to rebalance apart from a lost one", () => {
    const [summary] = told([
      event("stream_lost", 2, { deadline: at(12).toISOString(), reason: "REBALANCING" }),
    ]);
    expect(summary).toBe(
      "stream of worker w1 ended to rebalance, for it to reconnect to another server, in grace until 2026-12-07T06:00:12.000Z (10.0 s); epoch 1 waits for it to come back",
    );
  });

  it("tells a restart from a session's row when its events are older than their cause", () => {
    const [reaped, expired] = told([event("session_reaped", 4, null), event("lease_expired", 4, null, 1)]);
    expect(reaped).toBe(
      "session s1 of worker w1 ended: a new process of the worker connected while the stream of this one was gone",
    );
    expect(expired).toBe(
      "epoch 1 expired: worker w1's session s1 lost its stream at 2026-12-07T06:00:02.000Z and a new process of the worker connected at 2026-12-07T06:00:04.000Z, ending the session instead of resuming it; the action goes back to the queue",
    );
  });

  it("tells a deadline its event names as the cause, whatever the row", () => {
    const [reaped] = told([event("session_reaped", 4, { cause: "deadline" })]);
    expect(reaped).toBe("session s1 of worker w1 reaped: its deadline passed with no heartbeat");
  });

  it("tells a session reaped because its server process went silent, not its worker", () => {
    const details = { cause: "server_silent", server_id: "s2", server_alive_until: at(9).toISOString() };
    const [reaped, expired] = told([
      event("session_reaped", 13, details),
      event("lease_expired", 13, { ...details, state: "QUEUED" }, 1),
    ]);
    const host =
      "its server process s2 stopped renewing it (its liveness mark ran out at 2026-12-07T06:00:09.000Z: it lost its database, hung or died) while the worker was connected to it";
    expect(reaped).toBe(`session s1 of worker w1 reaped at its deadline: ${host}`);
    expect(expired).toBe(
      `epoch 1 expired: worker w1's session s1 passed its deadline 2026-12-07T06:00:12.000Z (last renewed at 2026-12-07T06:00:02.000Z): ${host}; the action goes back to the queue`,
    );
    expect(`${reaped} ${expired}`).not.toMatch(/no heartbeat|did not come back/);
  });

  it("says what became of the action: cancelled when a cancel was pending, failed when its budget is spent", () => {
    const afterwards = (state: string) =>
      told([event("lease_expired", 4, { cause: "deadline", state }, 1)])[0]?.replace(/^.*; /, "");
    expect(afterwards("QUEUED")).toBe("the action goes back to the queue");
    expect(afterwards("CANCELLED")).toBe("the action is cancelled, as was asked while it was leased");
    expect(afterwards("FAILED")).toBe("the action failed: its system-retry budget is spent");
  });
});

describe("explain, on a lease resumed after a reconnect", () => {
  it("says a worker came back after its deadline when its partitioned cluster kept the session", () => {
    const [session, lease] = told([
      event("session_resumed", 3, { late: true }),
      event("lease_resumed", 3, { late: true }, 1),
    ]);
    expect(session).toBe(
      "worker w1 reconnected after its deadline; session s1, kept while its cluster was partitioned (or its server could not renew it), resumed",
    );
    expect(lease).toMatch(
      /^epoch 1 resumed by worker w1, reconnected after its deadline: its session was kept/,
    );
  });

  it("says the lease still holds while nothing ended it", () => {
    const [resumed] = told([event("lease_resumed", 3, null, 1)]);
    expect(resumed).toBe(
      "epoch 1 resumed by worker w1, reconnected in time (session s1): the lease still holds",
    );
  });

  it("does not leave 'still holds' as the last word when the worker released it (it self-fenced while away)", () => {
    const [resumed] = told([
      event("lease_resumed", 3, null, 1),
      event("lease_released", 4, null, 1),
      event("lease_granted", 4, null, 2),
    ]);
    expect(resumed).toBe(
      "epoch 1 resumed by worker w1, reconnected in time (session s1), but the worker released it 1.0 s later, at 2026-12-07T06:00:04.000Z, so the lease no longer holds",
    );
  });

  it("says the lease ended when a later epoch was granted with no release logged in between", () => {
    const [resumed] = told([event("lease_resumed", 3, null, 1), event("lease_granted", 5, null, 2)]);
    expect(resumed).toBe(
      "epoch 1 resumed by worker w1, reconnected in time (session s1); the lease ended before epoch 2 was granted 2.0 s later, at 2026-12-07T06:00:05.000Z",
    );
  });
});

describe("explain, without saying a thing twice", () => {
  /** The sentences of `events` about action a1, its one attempt ending with `error`, the action as `action` says. */
  const tellAll = (
    events: EventRecord[],
    action: Partial<ActionRecord> = {},
    error: AttemptRecord["error"] = null,
  ) =>
    explainHistory({
      action: { id: "a1", state: "LEASED", failureReason: "", ...action } as ActionRecord,
      attempts: [{ attempt: { ...attempt, outcome: "FAILED", error }, session: undefined }],
      events,
      truncated: false,
      now: at(20),
    }).timeline.map((s) => s.summary);
  const withText = (e: EventRecord, message: string, actor = "") => ({ ...e, message, actor });

  it("names the operator who resumed a partitioned cluster's expiries", () => {
    const [resumed] = tellAll([
      withText(
        event("cluster_expiries_resumed", 3, { reason: "agents-gone" }),
        "an operator resumed lease expiries of partitioned cluster east: agents-gone",
        "alice-op",
      ),
    ]);
    expect(resumed).toBe("operator alice-op resumed lease expiries of partitioned cluster east: agents-gone");
  });

  it("gives a retried attempt's error, and says the retries ran out as GetAction does", () => {
    const [retry, failed] = tellAll(
      [
        withText(
          event("action_retry_scheduled", 3, null, 1),
          "attempt failed on worker w1; retry after 2026-12-07T06:00:04.000Z",
          "agent-east",
        ),
        withText(event("action_failed", 8, null, 1), "action failed on worker w1: exit 1", "agent-east"),
      ],
      { state: "FAILED", failureReason: "failed after 2 attempts (max_attempts 2): exit 1" },
      { message: "exit 1", retryable: true },
    );
    expect(retry).toBe(
      "attempt of epoch 1 failed on worker w1: exit 1; retry after 2026-12-07T06:00:04.000Z",
    );
    expect(failed).toBe("action failed after 2 attempts (max_attempts 2): exit 1 (epoch 1, worker w1)");
  });

  it("says a cancel request and a release once each", () => {
    const [requested, released, bare] = tellAll([
      withText(
        event("action_cancel_requested", 3, null, 1),
        "cancel requested: ops-cleanup; revoking from w1",
        "alice-op",
      ),
      withText(event("lease_released", 4, null, 1), "worker w1 released the lease: shutting down", "agent"),
      withText(event("lease_released", 5, null, 1), "worker w1 released the lease", "agent"),
    ]);
    expect(requested).toBe("cancel requested by alice-op: ops-cleanup; revoking from w1");
    expect(released).toBe("worker w1 released epoch 1: shutting down");
    expect(bare).toBe("worker w1 released epoch 1");
  });
});
