import { type SQL, sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/** Most workers (and, separately, ended sessions) one statement forgets. */
export const FORGET_BATCH = 1000;

/**
 * Housekeeping, as Nomad collects the nodes it has not heard from: forgets
 * the workers last seen before `now - retentionMs` that have no live session
 * (a drain ends with its session: a worker drained and gone is forgotten as
 * any other), with all their sessions; and, of the workers kept, the sessions that ended
 * before then. Without it, every worker id ever seen (a pod name per
 * deployment, say) stayed in ListWorkers and in the tables forever.
 *
 * A hello racing with it is safe: it locks the worker's row, and this
 * statement skips a locked row; one that committed first set `last_seen_at`
 * to now, which the row lock makes this statement see (READ COMMITTED
 * re-checks a row it locks). Sessions keep no row of anything else alive:
 * attempts and events name them by id, and the attempts keep a copy of the
 * record of the sessions that held them, for ExplainAction.
 *
 * Returns how many workers and how many sessions it forgot; the caller runs
 * it again while a batch was full.
 */
export async function forgetWorkers(
  db: Db,
  clock: Clock,
  retentionMs: number,
): Promise<{ workers: number; sessions: number }> {
  const cutoff = sql`${clock.now()} - make_interval(secs => ${retentionMs} / 1000.0)`;
  const [row] = await queryRows<{ workers: unknown; sessions: unknown }>(
    db,
    sql`
      with gone as (
        select w.worker_id from workers w
        where w.last_seen_at < ${cutoff}
          and not exists (select 1 from sessions s where s.worker_id = w.worker_id and s.ended_at is null)
        order by w.last_seen_at
        limit ${FORGET_BATCH}
        for update of w skip locked
      ),
      ${forgetting},
      old_sessions as (
        delete from sessions s
        where s.id in (
          select id from sessions where ended_at < ${cutoff}
            and worker_id not in (select worker_id from gone)
          order by ended_at limit ${FORGET_BATCH}
        )
        returning ${sessionRecord}
      ),
      ${keepRecords(sql`old_sessions`, sql`kept_old`)}
      select (select count(*) from forgotten) as workers,
        (select count(*) from their_sessions) + (select count(*) from old_sessions) as sessions`,
  );
  return { workers: Number(row?.workers ?? 0), sessions: Number(row?.sessions ?? 0) };
}

/** What a deleted session's row gives {@link keepRecords}. */
const sessionRecord = sql.raw(
  "s.id, s.last_heard_at, s.deadline, s.stream_lost_at, s.ended_at, s.end_reason",
);

/**
 * A CTE `name` that copies the records of the sessions a CTE `deleted`
 * removed (returning {@link sessionRecord}) onto the attempts they held
 * (`attempts_session_idx`): the attempts outlive the sessions' rows (an
 * action is kept for --history-retention), and ExplainAction tells their
 * heartbeats and expiries from these. The sessions are all ended, so the
 * records are final.
 */
function keepRecords(deleted: SQL, name: SQL): SQL {
  return sql`${name} as (
    update attempts t set session_last_heard_at = d.last_heard_at, session_deadline = d.deadline,
      session_stream_lost_at = d.stream_lost_at, session_ended_at = d.ended_at,
      session_end_reason = d.end_reason
    from ${deleted} d where t.session_id = d.id
  )`;
}

/**
 * What forgetting the workers of a `gone` CTE takes, for both ways of
 * forgetting (retention above, an operator's {@link forgetWorker}): their
 * sessions, all ended, then the workers. The foreign key from sessions is
 * checked at the end of the statement, once their_sessions has deleted theirs.
 * Nothing else goes: attempts and events name workers and sessions by id (the
 * attempts get their sessions' records, {@link keepRecords}), and
 * an action's lease is held by a live session, which a forgotten worker has
 * none of.
 */
const forgetting = sql`
  their_sessions as (
    delete from sessions s using gone g where s.worker_id = g.worker_id returning ${sessionRecord}
  ),
  ${keepRecords(sql`their_sessions`, sql`kept_theirs`)},
  forgotten as (
    delete from workers w using gone g where w.worker_id = g.worker_id returning w.worker_id, w.cluster
  )`;

/**
 * ClusterService.ForgetWorker: forgets one worker now, as retention would
 * once it ages out, and records the event with `actor` as who asked. Only a
 * worker without a live session: "live" leaves everything as it was.
 *
 * The worker's row is locked first, in a statement of its own: a hello holds
 * that lock for its whole transaction, so the statement that follows (a new
 * snapshot, READ COMMITTED) sees the session a hello committed meanwhile, and
 * a hello that comes later waits, then registers the worker anew. A lease
 * still held by one of its sessions (none should be: a session's end
 * releases its leases) counts as live too, so that no lease is left to a
 * worker the server no longer knows.
 */
export async function forgetWorker(
  db: Db,
  workerId: string,
  reason: string,
  actor: string,
): Promise<"forgotten" | "live" | "not found"> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const [locked] = await queryRows<{ worker_id: string }>(
      tx,
      sql`select worker_id from workers where worker_id = ${workerId} for update`,
    );
    if (!locked) return "not found";
    const [row] = await queryRows<{ forgotten: boolean }>(
      tx,
      sql`
        with gone as (
          select w.worker_id from workers w
          where w.worker_id = ${workerId}
            and not exists (select 1 from sessions s where s.worker_id = w.worker_id and s.ended_at is null)
            and not exists (
              select 1 from actions a join sessions s on s.id = a.session_id
              where s.worker_id = w.worker_id and a.state = 'LEASED'
            )
        ),
        ${forgetting},
        event as (
          insert into events (kind, worker_id, cluster, message, actor)
          select 'worker_forgotten', worker_id, cluster,
            'worker ' || worker_id || ' forgotten (its id is free)'
              || case when ${reason} <> '' then ': ' || ${reason} else '' end,
            ${actor}
          from forgotten
        )
        select exists (select 1 from forgotten) as forgotten`,
    );
    return row?.forgotten ? "forgotten" : "live";
  });
}
