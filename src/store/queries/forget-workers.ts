import { sql } from "drizzle-orm";
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
 * attempts and events name them by id, and ExplainAction shows an attempt
 * without its session's record once it is gone.
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
      their_sessions as (
        delete from sessions s using gone g where s.worker_id = g.worker_id returning s.id
      ),
      old_sessions as (
        delete from sessions s
        where s.id in (
          select id from sessions where ended_at < ${cutoff}
            and worker_id not in (select worker_id from gone)
          order by ended_at limit ${FORGET_BATCH}
        )
        returning s.id
      ),
      forgotten as (
        -- The foreign key from sessions is checked at the end of the statement, once
        -- their_sessions has deleted theirs.
        delete from workers w using gone g where w.worker_id = g.worker_id returning w.worker_id
      )
      select (select count(*) from forgotten) as workers,
        (select count(*) from their_sessions) + (select count(*) from old_sessions) as sessions`,
  );
  return { workers: Number(row?.workers ?? 0), sessions: Number(row?.sessions ?? 0) };
}
