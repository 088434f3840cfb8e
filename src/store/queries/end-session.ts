import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/**
 * Ends a session on goodbye: every lease it holds is released at once (the
 * action is queued again without using a retry, or CANCELLED if a cancel was
 * pending), the attempts are RELEASED, and the session ends.
 *
 * Two statements in one transaction, on purpose: the first ends the session,
 * waiting for any grant that holds the session row (`for share`) to commit;
 * the second then runs with a fresh snapshot, so it also releases a lease
 * granted in that window instead of leaving it on an ended session.
 * Conditional on the stream token: a stale stream cannot end a session that
 * moved to another stream.
 */
export async function endSession(
  db: Db,
  clock: Clock,
  sessionId: string,
  streamToken: string,
  reason: string,
): Promise<{ releasedActionIds: string[] }> {
  const now = clock.now();
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const [ended] = await queryRows<{ id: string; worker_id: string; principal: string }>(
      tx,
      sql`
        with ended as (
          update sessions s set ended_at = ${now}, end_reason = 'goodbye', server_id = null, stream_token = null
          where s.id = ${sessionId} and s.ended_at is null and s.stream_token = ${streamToken}
          returning s.id, s.worker_id, s.principal
        ),
        -- The goodbye is the last the server heard of it: what ListWorkers shows once it is offline.
        seen as (
          update workers w set last_seen_at = ${now} from ended e where w.worker_id = e.worker_id
        ),
        session_events as (
          insert into events (kind, worker_id, cluster, session_id, message, actor)
          select 'session_closed', e.worker_id, w.cluster, e.id,
            'worker ' || e.worker_id || ' said goodbye' || case when ${reason} <> '' then ': ' || ${reason} else '' end,
            e.principal
          from ended e join workers w on w.worker_id = e.worker_id
        )
        select id, worker_id, principal from ended`,
    );
    if (!ended) return { releasedActionIds: [] };
    const rows = await queryRows<{ id: string }>(
      tx,
      sql`
        -- Locked in id order first (see the actions table, schema.ts).
        with held as (
          select id from actions where session_id = ${sessionId} and state = 'LEASED' order by id for update
        ),
        released as (
          update actions a set
            state = case when a.cancel_requested then 'CANCELLED' else 'QUEUED' end,
            finished_at = case when a.cancel_requested then ${now} else null end,
            session_id = null, worker_id = null, granted_at = null, not_before = ${now}, updated_at = ${now}
          from held h
          where a.id = h.id
          returning a.id, a.epoch, a.cluster, a.state
        ),
        attempts_ended as (
          update attempts t set outcome = case when r.state = 'CANCELLED' then 'CANCELLED' else 'RELEASED' end,
            ended_at = ${now}
          from released r where t.action_id = r.id and t.epoch = r.epoch
        ),
        lease_events as (
          insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, actor)
          select case when r.state = 'CANCELLED' then 'action_cancelled' else 'lease_released' end,
            r.id, ${ended.worker_id}, r.cluster, ${sessionId}, r.epoch,
            'worker ' || ${ended.worker_id} || ' said goodbye; lease released', ${ended.principal}
          from released r
        )
        select id from released`,
    );
    return { releasedActionIds: rows.map((r) => r.id) };
  });
}
