import { type SQL, sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toNumber } from "../rows.js";
import { keptDeploymentRunning } from "../scope-leases.js";

/**
 * Housekeeping past --history-retention, as Temporal drops a closed workflow
 * after its namespace's retention and Kubernetes a finished Job after its TTL:
 * without it every action, attempt and event ever written stayed in the
 * tables, three or more event rows an action.
 *
 * Three statements, each one batch, each run again by the caller while a batch
 * was full:
 * - {@link removeFinishedActions}: ended actions, with their attempts and events;
 * - {@link removeClosedScopeLeases}: closed scope lease records, with their events;
 * - {@link removeOldEvents}: the other events (sessions, workers, clusters);
 * - {@link removeIdleClusters}: clusters nothing is left of.
 *
 * A record goes only when it ended before the cutoff (`now - retention`) and
 * no event about it is newer than the cutoff (a deployment's delete, a result
 * set after the close): the event log loses only events older than the
 * cutoff. Each statement raises `history.events_removed_through` to the
 * highest sequence it removed, in the same transaction, so a watch resuming
 * after that sequence has missed nothing.
 *
 * Finding what is due: action and lease ids are UUIDv7, time-ordered by
 * creation, and a record ends after it was created; so the candidates are
 * walked in primary-key order below the id of the cutoff's millisecond, and
 * the statements touch the table's oldest part only, not every row. (An id
 * minted by a server whose clock ran ahead of the database's is reached that
 * much later.) Locking: `for update skip locked`, so several processes can run
 * them at once; an ended action is never locked by the hot path.
 */

/** The time past which history is removed, as an SQL expression. */
const cutoffOf = (clock: Clock, retentionMs: number): SQL =>
  sql`(${clock.now()} - make_interval(secs => ${retentionMs} / 1000.0))`;

/** The smallest UUIDv7 minted at `cutoff`'s millisecond: every id below it was minted before. */
const idFloor = (cutoff: SQL): SQL => sql`(
  select substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-0000-0000-000000000000'
  from (select lpad(to_hex(floor(extract(epoch from ${cutoff}) * 1000)::bigint), 12, '0') as h) f)`;

/** Raises the removal mark to the highest sequence `removed` (a CTE of `sequence`) holds. */
const raiseMark = (removed: SQL): SQL => sql`
  update history set events_removed_through = greatest(events_removed_through, m.through)
  from (select max(sequence) as through from ${removed}) m where m.through is not null`;

export interface RemovedActions {
  /** Actions removed (their attempts went with them). */
  readonly actions: number;
  /** Their events. */
  readonly events: number;
}

/**
 * Removes up to `limit` actions that ended (SUCCEEDED, FAILED, CANCELLED)
 * before the cutoff, with their attempts and events. Kept: the action of a
 * deployment that still exists (its status is read from it), and an action
 * with an event newer than the cutoff.
 */
export async function removeFinishedActions(
  db: Db,
  clock: Clock,
  retentionMs: number,
  limit: number,
): Promise<RemovedActions> {
  const cutoff = cutoffOf(clock, retentionMs);
  const [row] = await queryRows<{ actions: unknown; events: unknown }>(
    db,
    sql`
      with due as (
        select a.id from actions a
        where a.id < ${idFloor(cutoff)}
          and a.state in ('SUCCEEDED', 'FAILED', 'CANCELLED')
          and coalesce(a.finished_at, a.updated_at) < ${cutoff}
          and not exists (select 1 from resources r where r.action_id = a.id)
          and not exists (select 1 from events e where e.action_id = a.id and e.at >= ${cutoff})
        order by a.id
        limit ${limit}
        for update of a skip locked
      ),
      removed_events as (
        delete from events e using due where e.action_id = due.id returning e.sequence
      ),
      -- Attempts go by the foreign key's cascade.
      removed as (
        delete from actions a using due where a.id = due.id returning a.id
      ),
      marked as (${raiseMark(sql`removed_events`)})
      select (select count(*) from removed) as actions, (select count(*) from removed_events) as events`,
  );
  return { actions: toNumber(row?.actions ?? 0), events: toNumber(row?.events ?? 0) };
}

export interface RemovedLeases {
  /** Scope lease records removed. */
  readonly leases: number;
  /** Their events. */
  readonly events: number;
}

/**
 * Removes up to `limit` scope lease records closed before the cutoff, with
 * their events; as DeleteLeases does, it leaves the resources a commit made
 * workspace-owned, and a committed lease whose kept deployments have not
 * ended (their outputs are saved into it) until they end. An event about
 * both a lease and an action still kept (a deployment's) stays with the
 * action.
 */
export async function removeClosedScopeLeases(
  db: Db,
  clock: Clock,
  retentionMs: number,
  limit: number,
): Promise<RemovedLeases> {
  const cutoff = cutoffOf(clock, retentionMs);
  const [row] = await queryRows<{ leases: unknown; events: unknown }>(
    db,
    sql`
      with due as (
        select l.id from scope_leases l
        where l.id < ${idFloor(cutoff)}
          and l.state <> 'OPEN'
          and l.closed_at < ${cutoff}
          -- Its outputs still arrive: kept until the deployments its commit kept end.
          and not (l.state = 'COMMITTED' and ${keptDeploymentRunning(sql`l.id`)})
          and not exists (select 1 from events e where e.lease_id = l.id and e.at >= ${cutoff})
        order by l.id
        limit ${limit}
        for update of l skip locked
      ),
      removed_events as (
        delete from events e using due
        where e.lease_id = due.id
          and (e.action_id is null or not exists (select 1 from actions a where a.id = e.action_id))
        returning e.sequence
      ),
      removed as (
        delete from scope_leases l using due where l.id = due.id returning l.id
      ),
      marked as (${raiseMark(sql`removed_events`)})
      select (select count(*) from removed) as leases, (select count(*) from removed_events) as events`,
  );
  return { leases: toNumber(row?.leases ?? 0), events: toNumber(row?.events ?? 0) };
}

export interface RemovedEvents {
  /** Events removed. */
  readonly events: number;
  /** Events looked at: `scan` unless the log ended. */
  readonly scanned: number;
  /** The highest sequence looked at: the next batch starts after it. */
  readonly last: number;
  /** Whether the batch reached an event newer than the cutoff: nothing past it is due. */
  readonly reachedCutoff: boolean;
}

/**
 * Looks at the `scan` events after sequence `after`, oldest first, and removes
 * those older than the cutoff that are about no action and no scope lease
 * still kept: session, worker and cluster events, and any left by a record
 * removed otherwise (DeleteLeases). Events of kept records stay, and are
 * looked at again on every pass; the caller stops at `reachedCutoff`.
 */
export async function removeOldEvents(
  db: Db,
  clock: Clock,
  retentionMs: number,
  after: number,
  scan: number,
): Promise<RemovedEvents> {
  const cutoff = cutoffOf(clock, retentionMs);
  const [row] = await queryRows<{
    events: unknown;
    scanned: unknown;
    last: unknown;
    reached: boolean | null;
  }>(
    db,
    sql`
      with looked as (
        select sequence, at, action_id, lease_id from events
        where sequence > ${after} order by sequence limit ${scan}
      ),
      due as (
        select k.sequence from looked k
        where k.at < ${cutoff}
          and (k.action_id is null or not exists (select 1 from actions a where a.id = k.action_id))
          and (k.lease_id is null or not exists (select 1 from scope_leases l where l.id = k.lease_id))
      ),
      removed as (
        delete from events e using due where e.sequence = due.sequence returning e.sequence
      ),
      marked as (${raiseMark(sql`removed`)})
      select (select count(*) from removed) as events, (select count(*) from looked) as scanned,
        (select max(sequence) from looked) as last,
        (select bool_or(at >= ${cutoff}) from looked) as reached`,
  );
  return {
    events: toNumber(row?.events ?? 0),
    scanned: toNumber(row?.scanned ?? 0),
    last: toNumber(row?.last ?? after),
    reachedCutoff: row?.reached === true,
  };
}

/**
 * Removes up to `limit` clusters nothing is left of: no worker (workers go
 * past --worker-retention, and their sessions with them), no action in any
 * state (ended ones go above), not partitioned, made before the cutoff and
 * with no event newer than it. Without it every cluster name ever used (a
 * typo, a name per CI run) stayed in ListClusters forever. A hello or a
 * submit to the name later makes the row again, as the first one did.
 *
 * A submit racing with it: one that inserts its cluster row after this
 * statement's delete makes a new row (the insert waits for the delete's
 * transaction on the unique key); one that committed its action between this
 * statement's snapshot and its delete leaves an action whose cluster has no
 * row until the next hello or submit names it, which only ListClusters sees.
 */
export async function removeIdleClusters(
  db: Db,
  clock: Clock,
  retentionMs: number,
  limit: number,
): Promise<number> {
  const cutoff = cutoffOf(clock, retentionMs);
  const [row] = await queryRows<{ clusters: unknown }>(
    db,
    sql`
      with due as (
        select c.name from clusters c
        where c.created_at < ${cutoff}
          and c.partitioned_at is null
          and not exists (select 1 from workers w where w.cluster = c.name)
          and not exists (select 1 from actions a where a.cluster = c.name)
          and not exists (select 1 from events e where e.cluster = c.name and e.at >= ${cutoff})
        order by c.name
        limit ${limit}
        for update of c skip locked
      ),
      removed as (
        delete from clusters c using due where c.name = due.name returning c.name
      )
      select count(*) as clusters from removed`,
  );
  return toNumber(row?.clusters ?? 0);
}

/** The highest event sequence --history-retention removed; 0 when none was. */
export async function eventsRemovedThrough(db: Db): Promise<number> {
  const [row] = await queryRows<{ through: unknown }>(
    db,
    sql`select events_removed_through as through from history`,
  );
  return toNumber(row?.through ?? 0);
}
