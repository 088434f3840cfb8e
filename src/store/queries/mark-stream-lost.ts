import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toDate } from "../rows.js";

/** A stream that ended: its session, its token, and how long ago its worker was last heard. */
export interface LostStream {
  readonly sessionId: string;
  readonly streamToken: string;
  readonly agoMs: number;
  /**
   * This server ended the stream (UNAVAILABLE, reason REBALANCING) to move it
   * to another process: its event says so (details.reason REBALANCING).
   */
  readonly rebalanced?: boolean;
  /**
   * This server ended the stream itself for another reason (SHUTTING_DOWN: a
   * handover on shutdown; STREAM_NOT_READ, GRANTS_UNACKNOWLEDGED...): its
   * event says so in details.reason and its message, so that it does not read
   * like a transport loss (an agent crash, a network cut). A rebalancing move
   * or SHUTTING_DOWN tells the worker to reconnect elsewhere with its session
   * intact: the session records it (stream_handed_over), and until its
   * deadline it does not count as lost for the partition valve.
   */
  readonly endedBy?: string;
}

/** A recorded loss: the session's deadline, its worker, and the database time of the statement. */
export interface StreamLoss {
  readonly deadline: Date;
  readonly workerId: string;
  readonly dbNow: Date;
}

/**
 * Records that sessions' streams are gone (SPEC rule 1), in ONE statement
 * for the whole batch: the loss is visible at once (stream_lost_at, event
 * `stream_lost`) but each deadline keeps what the worker earned: last heard
 * (`agoMs` before now, whole milliseconds) + grace, never less. A process
 * that closes, or a network blip, ends thousands of streams at once: one
 * statement each made the closing server run out of time before they were
 * written.
 *
 * Conditional on each session being live and still attached to that stream
 * (its token), so a stream that was already taken over, here or elsewhere,
 * records nothing: undefined at its index. Each loss comes with the database
 * time, so the caller can wake its reaper at the deadline. Session ids and
 * tokens are UUIDs: they go as comma-separated texts, as in renew-sessions.ts.
 */
export async function markStreamsLost(
  db: Db,
  clock: Clock,
  lost: readonly LostStream[],
  graceMs: number,
): Promise<(StreamLoss | undefined)[]> {
  const results = new Array<StreamLoss | undefined>(lost.length);
  if (lost.length === 0) return results;
  const ids = lost.map((l) => l.sessionId).join(",");
  const tokens = lost.map((l) => l.streamToken).join(",");
  const agos = lost.map((l) => Math.max(0, Math.round(l.agoMs))).join(",");
  const moved = lost.map((l) => (l.rebalanced ? "t" : "f")).join(",");
  // Reasons are upper-case words (ErrorInfo reasons): no commas to split on.
  const endedBy = lost.map((l) => (l.rebalanced ? "" : (l.endedBy ?? ""))).join(",");
  const handed = lost.map((l) => (l.rebalanced || l.endedBy === "SHUTTING_DOWN" ? "t" : "f")).join(",");
  const now = clock.now();
  const rows = await queryRows<{ n: unknown; deadline: unknown; worker_id: string; db_now: unknown }>(
    db,
    sql`
      with input as (
        select x.id, x.token, x.n, x.moved, nullif(x.ended_by, '') as ended_by, x.handed,
               ${now} - x.ago * interval '1 millisecond' as heard
        from unnest(string_to_array(${ids}::text, ','), string_to_array(${tokens}::text, ','),
                    string_to_array(${agos}::text, ',')::bigint[], string_to_array(${moved}::text, ',')::boolean[],
                    string_to_array(${endedBy}::text, ','), string_to_array(${handed}::text, ',')::boolean[])
          with ordinality as x(id, token, ago, moved, ended_by, handed, n)
      ),
      lost as (
        update sessions s set
          stream_lost_at = ${now},
          stream_handed_over = i.handed,
          server_id = null,
          stream_token = null,
          last_heard_at = greatest(s.last_heard_at, i.heard),
          deadline = greatest(s.deadline, i.heard + ${graceMs}::bigint * interval '1 millisecond')
        from input i
        where s.id = i.id and s.ended_at is null and s.stream_token = i.token
        returning i.n, i.moved, i.ended_by, s.id, s.worker_id, s.deadline
      ),
      event as (
        insert into events (kind, worker_id, cluster, session_id, message, details)
        select 'stream_lost', lost.worker_id, w.cluster, lost.id,
          case when lost.moved
            then 'stream of worker ' || lost.worker_id || ' ended to rebalance (this server hosted more than its share); '
              || 'it reconnects to another server; session in grace until '
            when lost.ended_by = 'SHUTTING_DOWN'
            then 'stream of worker ' || lost.worker_id || ' ended by its server shutting down (handed over); '
              || 'it reconnects to another server; session in grace until '
            when lost.ended_by is not null
            then 'stream of worker ' || lost.worker_id || ' ended by the server (' || lost.ended_by
              || '); session in grace until '
            else 'stream lost for worker ' || lost.worker_id || '; session in grace until ' end
            || to_char(lost.deadline at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
          case when lost.moved
            then jsonb_build_object('deadline', lost.deadline, 'reason', 'REBALANCING')
            when lost.ended_by is not null
            then jsonb_build_object('deadline', lost.deadline, 'reason', lost.ended_by)
            else jsonb_build_object('deadline', lost.deadline) end
        from lost join workers w on w.worker_id = lost.worker_id
        order by lost.n
      )
      select n, deadline, worker_id, ${now} as db_now from lost`,
    { prepared: true },
  );
  for (const row of rows) {
    results[Number(row.n) - 1] = {
      deadline: toDate(row.deadline),
      workerId: row.worker_id,
      dbNow: toDate(row.db_now),
    };
  }
  return results;
}
