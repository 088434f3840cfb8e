import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/**
 * Ends a session on goodbye: every lease it holds is released at once (the
 * action is queued again without using a retry, or CANCELLED if a cancel was
 * pending), the attempts are RELEASED, and the session ends. One statement.
 */
export async function endSession(
  db: Db,
  clock: Clock,
  sessionId: string,
  reason: string,
): Promise<{ releasedActionIds: string[] }> {
  const now = clock.now();
  const rows = await queryRows<{ id: string | null }>(
    db,
    sql`
      with ended as (
        update sessions s set ended_at = ${now}, end_reason = 'goodbye', server_id = null
        where s.id = ${sessionId} and s.ended_at is null
        returning s.id, s.worker_id
      ),
      released as (
        update actions a set
          state = case when a.cancel_requested then 'CANCELLED' else 'QUEUED' end,
          finished_at = case when a.cancel_requested then ${now} else null end,
          session_id = null, worker_id = null, granted_at = null, not_before = ${now}, updated_at = ${now}
        from ended
        where a.session_id = ended.id and a.state = 'LEASED'
        returning a.id, a.epoch, a.cluster, a.state, ended.worker_id, ended.id as session_id
      ),
      attempts_ended as (
        update attempts t set outcome = case when r.state = 'CANCELLED' then 'CANCELLED' else 'RELEASED' end,
          ended_at = ${now}
        from released r where t.action_id = r.id and t.epoch = r.epoch
      ),
      lease_events as (
        insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message)
        select case when r.state = 'CANCELLED' then 'action_cancelled' else 'lease_released' end,
          r.id, r.worker_id, r.cluster, r.session_id, r.epoch,
          'worker ' || r.worker_id || ' said goodbye; lease released'
        from released r
      ),
      session_events as (
        insert into events (kind, worker_id, cluster, session_id, message)
        select 'session_closed', e.worker_id, w.cluster, e.id,
          'worker ' || e.worker_id || ' said goodbye' || case when ${reason} <> '' then ': ' || ${reason} else '' end
        from ended e join workers w on w.worker_id = e.worker_id
      )
      select id from released`,
  );
  return { releasedActionIds: rows.map((r) => r.id as string) };
}
