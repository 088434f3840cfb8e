import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { MIGRATION_LOCK_KEY, shippedMigrations } from "../database.js";
import {
  type AppliedMigration,
  appliedMigrations,
  type JournalEntry,
  pendingMigrations,
} from "../newer-database.js";
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

/**
 * The oldest migration whose schema has every table and column the mark
 * reads and writes: `events.actor` came with it, `sessions.stream_token`
 * with 0002_stream_token, the rest with 0000_initial. The mark runs on any
 * schema from it to this build's newest, as it is: a restored backup of an
 * older build is marked without gaining this build's migrations, so that the
 * older build serves it afterwards (a rollback). A mark that needs more must
 * move this forward (test/integration/database-restored.test.ts marks a
 * database at exactly this migration).
 */
export const OLDEST_MARKABLE_MIGRATION = "0006_authorization";

/**
 * The database's schema is not one {@link markDatabaseRestored} can mark:
 * no Leasehold schema at all, one older than {@link OLDEST_MARKABLE_MIGRATION},
 * or one a newer build migrated. Nothing was changed.
 */
export class DatabaseNotMarkable extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DatabaseNotMarkable";
  }
}

/**
 * Throws {@link DatabaseNotMarkable} unless the database that has `applied`
 * has a schema from {@link OLDEST_MARKABLE_MIGRATION} to the newest of
 * `journal`. A newer build's schema is refused: it may keep state this
 * build's mark knows nothing of (a new column or table about a lease or a
 * session), which the mark would leave as it was, and that build would then
 * serve a database it believes marked. Its own `db restored` marks it.
 */
export function refuseUnmarkableSchema(
  applied: readonly AppliedMigration[],
  journal: readonly JournalEntry[],
): void {
  const oldest = journal.find((entry) => entry.tag === OLDEST_MARKABLE_MIGRATION);
  const newestKnown = journal.at(-1);
  if (!oldest || !newestKnown) throw new Error(`this build ships no migration ${OLDEST_MARKABLE_MIGRATION}`);
  if (applied.length === 0)
    throw new DatabaseNotMarkable(
      "the database has no Leasehold schema (no migration was ever applied to it), so there is nothing to mark: " +
        "give the database the backup was restored into (--database-url, or --data-dir for PGlite)",
    );
  const times = applied.map((row) => Number(row.created_at ?? 0));
  const newest = Math.max(...times);
  const at = (when: number) => {
    const entry = journal.find((e) => e.when === when);
    return entry ? `migration ${entry.tag}` : `a migration from ${new Date(when).toISOString()}`;
  };
  const unknown = times.filter((when) => when > newestKnown.when).length;
  if (unknown > 0)
    throw new DatabaseNotMarkable(
      `the database was migrated by a newer leasehold: it has ${unknown} migration${unknown === 1 ? "" : "s"} this build does not know ` +
        `(the newest from ${new Date(newest).toISOString()}; the newest this build knows is ${newestKnown.tag}), ` +
        "and that build's schema may keep state this build's mark would leave as it was. Nothing was changed. " +
        "Run `leasehold db restored` of a build at least as new as the one that migrated it: it marks the database " +
        "on the schema it has, without migrating it",
    );
  if (newest < oldest.when) {
    const missing = pendingMigrations(applied, journal).filter((entry) => entry.when <= oldest.when).length;
    throw new DatabaseNotMarkable(
      `the database's schema is too old to mark: its newest migration is ${at(newest)}, and the mark needs ` +
        `${OLDEST_MARKABLE_MIGRATION} (${missing} migration${missing === 1 ? "" : "s"} later) or newer. Nothing was changed. ` +
        `Start a build that ships ${OLDEST_MARKABLE_MIGRATION} (any from 1c6c78a, 2026-12-02, on) on it once, with no agent ` +
        "able to reach it (leasehold serve applies its migrations at start), stop it, run this command again, and serve it " +
        "with that build or a newer one",
    );
  }
}

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
 * same moment serves only after it. Applies no migration: under that lock it
 * checks that the schema is one it can mark as it is
 * ({@link refuseUnmarkableSchema}), so that a restored backup of an older
 * build keeps that build's schema. Safe with servers running (their
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
    // Under the lock: a server migrating the database at the same moment has finished, or not begun.
    refuseUnmarkableSchema(
      await appliedMigrations((text) => queryRows<Record<string, unknown>>(tx, sql.raw(text))),
      shippedMigrations(),
    );
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
