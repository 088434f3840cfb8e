import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toDate } from "../rows.js";

/**
 * Records that a session's stream is gone (SPEC rule 1): the loss is visible
 * at once (stream_lost_at, event `stream_lost`) but the deadline keeps what
 * the worker earned: last heard (`agoMs` before now) + grace, never less.
 *
 * Conditional on the session being live and still attached to this stream
 * (its token), so a stream that was already taken over, here or elsewhere,
 * records nothing. Returns the deadline with the database time, so the
 * caller can wake its reaper then.
 */
export async function markStreamLost(
  db: Db,
  clock: Clock,
  streamToken: string,
  sessionId: string,
  agoMs: number,
  graceMs: number,
): Promise<{ deadline: Date; workerId: string; dbNow: Date } | undefined> {
  const now = clock.now();
  const [row] = await queryRows<{ deadline: unknown; worker_id: string; db_now: unknown }>(
    db,
    sql`
      with lost as (
        update sessions s set
          stream_lost_at = ${now},
          server_id = null,
          stream_token = null,
          last_heard_at = greatest(s.last_heard_at, ${now} - make_interval(secs => ${agoMs} / 1000.0)),
          deadline = greatest(s.deadline, ${now} - make_interval(secs => ${agoMs} / 1000.0)
                                           + make_interval(secs => ${graceMs} / 1000.0))
        where s.id = ${sessionId} and s.ended_at is null and s.stream_token = ${streamToken}
        returning s.id, s.worker_id, s.deadline
      ),
      event as (
        insert into events (kind, worker_id, cluster, session_id, message, details)
        select 'stream_lost', lost.worker_id, w.cluster, lost.id,
          'stream lost for worker ' || lost.worker_id || '; session in grace until '
            || to_char(lost.deadline at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
          jsonb_build_object('deadline', lost.deadline)
        from lost join workers w on w.worker_id = lost.worker_id
      )
      select deadline, worker_id, ${now} as db_now from lost`,
    { prepared: true },
  );
  return row && { deadline: toDate(row.deadline), workerId: row.worker_id, dbNow: toDate(row.db_now) };
}
