import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { MIGRATION_LOCK_KEY } from "../database.js";
import { queryRows, toDate, toNumber } from "../rows.js";

/**
 * How far `leasehold db restored` raises the epoch of every action that may
 * still be granted: more than the grants one action can have had since any
 * backup. Failures and expiries are bounded (max_attempts and
 * max_system_retries, at most 100 each), but a release (a drain, a
 * self-fence, an agent's shutdown) or this command's own requeue charge
 * nothing, so no limit of the retry policy bounds them: a million is eleven
 * days of an action released and granted again every second, far past any
 * real history. A listing above it is still caught: a worker naming an
 * epoch above the stored one raises it (epoch-regressions.ts). Raised once
 * per restore, the epochs stay below 2^53 − 1 for nine billion restores.
 */
export const RESTORE_EPOCH_MARGIN = 1_000_000;

/** What {@link markDatabaseRestored} changed. */
export interface DatabaseRestored {
  /** Live sessions ended (their workers' next hellos start new sessions). */
  readonly sessionsEnded: number;
  /** Leased actions put back in the queue (or cancelled, when a cancel was pending). */
  readonly leasesEnded: number;
  /** Actions (queued or leased) whose epoch was raised by the margin. */
  readonly actionsRenumbered: number;
  /** Until when (database clock) no action is granted. */
  readonly grantsFrom: Date;
}

/**
 * Makes a database that went back in time (restored from a backup, or a
 * standby promoted after losing commits) safe to serve, in one transaction:
 * - every action that may still be granted (QUEUED or LEASED) gets its epoch
 *   raised by `margin`, so no grant made after the backup, which the
 *   database no longer knows of, is ever made again with the same epoch;
 * - every live session ends (end_reason `database_restored`): a worker that
 *   still runs a lease from before reconnects into a new session and is told
 *   to stop it (Welcome.revoked), and a stream a running server still hosts
 *   is ended by its next renewal;
 * - every LEASED action goes back to QUEUED (CANCELLED when a cancel was
 *   pending), its attempt ended as LEASE_EXPIRED, and no retry is charged:
 *   neither the action nor its worker lost the lease, the operator's restore
 *   did, and one restore must not fail actions at the end of their budget;
 * - no queued action is granted for `holdMs` (their not_before moves to
 *   now + holdMs): an agent still running a lease the database lost has,
 *   from its last heartbeat ack, at most a grace period before it fences
 *   itself, so with holdMs at least the servers' grace period nothing is
 *   granted while an old holder may still run it, whether or not it
 *   reconnects;
 * - a `database_restored` event records it, with `actor`.
 * The migration lock is held meanwhile, so that a server starting at the
 * same moment serves only after it. Safe with servers running (their
 * sessions end, their grants wait out the hold), though meant to run before
 * they start on the restored database.
 */
export async function markDatabaseRestored(
  db: Db,
  clock: Clock,
  options: { margin: number; holdMs: number; actor: string },
): Promise<DatabaseRestored> {
  const now = clock.now();
  const hold = sql`${now} + ${Math.round(options.holdMs)}::bigint * interval '1 millisecond'`;
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    await tx.execute(sql`select pg_advisory_xact_lock(${MIGRATION_LOCK_KEY.toString()}::bigint)`);
    const [top] = await queryRows<{ top: unknown }>(
      tx,
      sql`select max(epoch) as top from actions where state in ('QUEUED', 'LEASED')`,
    );
    if (toNumber(top?.top ?? 0) + options.margin > Number.MAX_SAFE_INTEGER)
      throw new Error(
        `an action's epoch (${toNumber(top?.top)}) raised by ${options.margin} would pass 2^53 - 1, the largest epoch clients read exactly`,
      );
    const [row] = await queryRows<{
      sessions: unknown;
      leases: unknown;
      renumbered: unknown;
      grants_from: unknown;
    }>(
      tx,
      sql`with ended as (
            update sessions set ended_at = ${now}, end_reason = 'database_restored', server_id = null,
              stream_token = null
            where ended_at is null
            returning id
          ),
          live as (
            select id, state, session_id, worker_id from actions where state in ('QUEUED', 'LEASED')
            order by id for update
          ),
          renumbered as (
            update actions a set
              epoch = a.epoch + ${options.margin},
              state = case when l.state = 'LEASED' and a.cancel_requested then 'CANCELLED' else 'QUEUED' end,
              finished_at = case when l.state = 'LEASED' and a.cancel_requested then ${now} else a.finished_at end,
              session_id = null, worker_id = null, granted_at = null,
              not_before = greatest(a.not_before, ${hold}), updated_at = ${now}
            from live l where a.id = l.id
            returning a.id, a.epoch, a.cluster, a.state, l.state as was, l.session_id, l.worker_id
          ),
          attempts_ended as (
            update attempts t set outcome = 'LEASE_EXPIRED', ended_at = ${now}
            from renumbered r
            where r.was = 'LEASED' and t.action_id = r.id and t.epoch = r.epoch - ${options.margin}
              and t.outcome = 'RUNNING'
          ),
          lease_events as (
            insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, details, actor)
            select 'lease_revoked', r.id, r.worker_id, r.cluster, r.session_id, r.epoch - ${options.margin},
              'lease revoked: the database was restored from a backup (leasehold db restored); the action '
              || case when r.state = 'CANCELLED' then 'is cancelled, as asked'
                      else 'is queued again under epoch ' || r.epoch || ', no retry charged' end,
              jsonb_build_object('cause', 'database_restored', 'state', r.state), ${options.actor}
            from renumbered r where r.was = 'LEASED'
            union all
            select 'action_cancelled', r.id, r.worker_id, r.cluster, r.session_id, r.epoch - ${options.margin},
              'action cancelled (its lease ended when the database was restored, with the cancel pending)',
              null, ${options.actor}
            from renumbered r where r.was = 'LEASED' and r.state = 'CANCELLED'
          ),
          counts as (
            select (select count(*) from ended) as sessions,
              (select count(*) from renumbered where was = 'LEASED') as leases,
              (select count(*) from renumbered) as renumbered,
              ${hold} as grants_from
          ),
          restored_event as (
            insert into events (kind, message, details, actor)
            select 'database_restored',
              'database marked restored: ' || sessions || ' live sessions ended, ' || leases
              || ' leases revoked, the epochs of ' || renumbered || ' queued or leased actions raised by '
              || ${options.margin} || '; no grant before ' || grants_from,
              jsonb_build_object('sessions_ended', sessions, 'leases_revoked', leases,
                'actions_renumbered', renumbered, 'epoch_margin', ${options.margin}::bigint,
                'hold_ms', ${Math.round(options.holdMs)}::bigint),
              ${options.actor}
            from counts
          )
          select sessions, leases, renumbered, grants_from from counts`,
    );
    return {
      sessionsEnded: toNumber(row?.sessions),
      leasesEnded: toNumber(row?.leases),
      actionsRenumbered: toNumber(row?.renumbered),
      grantsFrom: toDate(row?.grants_from),
    };
  });
}
