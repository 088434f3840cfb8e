import { sql } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import { createFakeClock } from "../../src/store/clock.js";
import { readActionHistory } from "../../src/store/queries/explain-action.js";
import { forgetWorker, forgetWorkers } from "../../src/store/queries/forget-workers.js";
import { queryRows } from "../../src/store/rows.js";
import { explainHistory } from "../../src/work/explain.js";
import { useFreshDatabase } from "../helpers/database.js";

const database = useFreshDatabase();
const db = () => database.current.db;

const at = (s: number) => new Date(Date.UTC(2026, 11, 7, 6, 0, s)).toISOString();

/**
 * Action `action` leased under epoch 1 by worker `worker` (session
 * `s-<worker>`), heard last at 0:02, its stream lost at 0:03, its session
 * reaped at its deadline 0:10 and the lease expired; then granted again
 * (epoch 2) to a worker `w-next` that completes it. Every row as the server
 * leaves them, in the past.
 */
async function failover(action: string, worker: string): Promise<void> {
  const session = `s-${worker}`;
  await db().execute(sql`
    insert into workers (worker_id, cluster, capacity, last_seen_at) values (${worker}, 'east', 1, ${at(3)})`);
  await db().execute(sql`
    insert into sessions (id, worker_id, started_at, deadline, last_heard_at, stream_lost_at, ended_at, end_reason)
    values (${session}, ${worker}, ${at(0)}, ${at(10)}, ${at(2)}, ${at(3)}, ${at(10)}, 'reaped')`);
  await db().execute(sql`
    insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
      max_system_retries, state, epoch, attempt_count, created_at)
    values (${action}, 'east', 2, 1000, 2, 10000, 3, 'SUCCEEDED', 2, 2, ${at(0)})`);
  await db().execute(sql`
    insert into attempts (action_id, epoch, worker_id, session_id, outcome, started_at, ended_at) values
      (${action}, 1, ${worker}, ${session}, 'LEASE_EXPIRED', ${at(1)}, ${at(10)}),
      (${action}, 2, 'w-next', 's-next', 'SUCCEEDED', ${at(11)}, ${at(12)})`);
  await db().execute(sql`
    insert into events (kind, at, action_id, worker_id, cluster, session_id, epoch, message, details) values
      ('action_submitted', ${at(0)}, ${action}, null, 'east', null, null, 'action submitted', null),
      ('lease_granted', ${at(1)}, ${action}, ${worker}, 'east', ${session}, 1, 'lease granted', null),
      ('stream_lost', ${at(3)}, null, ${worker}, 'east', ${session}, null, 'stream lost',
        ${JSON.stringify({ deadline: at(10) })}::jsonb),
      ('session_reaped', ${at(10)}, null, ${worker}, 'east', ${session}, null, 'reaped',
        ${JSON.stringify({ cause: "deadline" })}::jsonb),
      ('lease_expired', ${at(10)}, ${action}, ${worker}, 'east', ${session}, 1, 'lease expired',
        ${JSON.stringify({ cause: "deadline", state: "QUEUED" })}::jsonb),
      ('lease_granted', ${at(11)}, ${action}, 'w-next', 'east', 's-next', 2, 'lease granted', null),
      ('action_succeeded', ${at(12)}, ${action}, 'w-next', 'east', 's-next', 2, 'action succeeded', null)`);
}

/** The action's timeline, a sentence a step. */
async function timeline(action: string): Promise<string[]> {
  const history = await readActionHistory(db(), action, 100);
  if (!history) throw new Error(`no action ${action}`);
  return explainHistory(history).timeline.map((s) => s.summary);
}

async function sessionsOf(worker: string): Promise<number> {
  const [row] = await queryRows<{ n: unknown }>(
    db(),
    sql`select count(*) as n from sessions where worker_id = ${worker}`,
  );
  return Number(row?.n);
}

describe("explain, once the worker that held the action is forgotten", () => {
  beforeAll(async () => {
    await db().execute(sql`insert into clusters (name) values ('east')`);
  });

  it("tells the same heartbeats and expiry after `workers forget` as before", async () => {
    await failover("act-1", "a1");
    const before = await timeline("act-1");
    expect(before).toContain(
      "heartbeats: worker a1 (session s-a1) was last heard 1.0 s after the grant of epoch 1, at 2026-12-07T06:00:02.000Z",
    );
    expect(before).toContain(
      "epoch 1 expired: worker a1's session s-a1 lost its stream at 2026-12-07T06:00:03.000Z and did not come back before its deadline 2026-12-07T06:00:10.000Z; the action goes back to the queue",
    );

    expect(await forgetWorker(db(), "a1", "", "alice-op")).toBe("forgotten");
    expect(await sessionsOf("a1")).toBe(0);
    expect(await timeline("act-1")).toEqual(before);
  });

  it("tells the same after --worker-retention forgets the worker, or only its old sessions", async () => {
    await failover("act-2", "a2");
    await failover("act-3", "a3");
    const before2 = await timeline("act-2");
    const before3 = await timeline("act-3");
    // a3 is back (seen now): retention keeps it, and forgets its session that ended long ago.
    await db().execute(sql`update workers set last_seen_at = now() where worker_id = 'a3'`);
    const clock = createFakeClock();
    const forgotten = await forgetWorkers(db(), clock, 60_000);
    expect(forgotten.workers).toBeGreaterThanOrEqual(1);
    expect(await sessionsOf("a2")).toBe(0);
    expect(await sessionsOf("a3")).toBe(0);
    expect(await timeline("act-2")).toEqual(before2);
    expect(await timeline("act-3")).toEqual(before3);
  });
});
