import { type SQL, sql } from "drizzle-orm";
import type { Clock } from "./clock.js";
import type { Db } from "./database.js";
import { queryRows, toDate, toNumber } from "./rows.js";

/** HEALTHY, DEGRADED or UNHEALTHY from recent expiries; PARTITIONED while the valve holds (SPEC rule 10). */
export type ClusterHealth = "HEALTHY" | "DEGRADED" | "UNHEALTHY" | "PARTITIONED";

/**
 * Health from lease expiries in a sliding window, counted by the workers whose leases expired:
 * expiries of several workers of one cluster are a sign the cluster (not one worker) is in
 * trouble. One agent of 16 slots killed makes 16 expiries, but one worker.
 */
export const HEALTH_WINDOW_MS = 5 * 60_000;
/** Workers with lease expiries in the window that make a cluster DEGRADED. */
export const DEGRADED_WORKERS = 3;
/** Workers with lease expiries in the window that make a cluster UNHEALTHY. */
export const UNHEALTHY_WORKERS = 10;

export function healthOf(
  recentExpiries: number,
  expiredWorkers: number,
): { health: ClusterHealth; reason: string } {
  const reason = () =>
    `${recentExpiries} lease ${recentExpiries === 1 ? "expiry" : "expiries"} of ${expiredWorkers} ` +
    `${expiredWorkers === 1 ? "worker" : "workers"} ` +
    `in the last ${HEALTH_WINDOW_MS / 60_000} minutes`;
  if (expiredWorkers >= UNHEALTHY_WORKERS) return { health: "UNHEALTHY", reason: reason() };
  if (expiredWorkers >= DEGRADED_WORKERS) return { health: "DEGRADED", reason: reason() };
  return { health: "HEALTHY", reason: "" };
}

/** A cluster with its counts. */
export interface ClusterRecord {
  readonly name: string;
  readonly health: ClusterHealth;
  readonly healthReason: string;
  readonly connectedWorkers: number;
  readonly workersInGrace: number;
  readonly queuedActions: number;
  readonly leasedActions: number;
  readonly recentExpiries: number;
  /** Since when most of its sessions are without a stream (SPEC rule 10); undefined when not partitioned. */
  readonly partitionedAt: Date | undefined;
  /** True while partitioned and no operator resumed its expiries. */
  readonly expiriesPaused: boolean;
}

/** `x.expiries` and `x.expired_workers` of cluster `c` in the health window, as a lateral join. */
const recentExpiries = (clock: Clock) => sql`
  cross join lateral (
    select count(*) as expiries, count(distinct e.worker_id) as expired_workers from events e
    where e.cluster = c.name and e.kind = 'lease_expired'
      and e.at > ${clock.now()} - make_interval(secs => ${HEALTH_WINDOW_MS} / 1000.0)) x`;

/** Every cluster (or the one named) with live counts, health computed now. */
export async function listClusters(db: Db, clock: Clock, name?: string): Promise<ClusterRecord[]> {
  const rows = await queryRows<{
    name: string;
    connected: unknown;
    in_grace: unknown;
    queued: unknown;
    leased: unknown;
    expiries: unknown;
    expired_workers: unknown;
    holding: unknown;
    lost: unknown;
    partitioned_at: unknown;
    expiries_resumed_at: unknown;
  }>(
    db,
    sql`
      select c.name, c.partitioned_at, c.expiries_resumed_at,
        (select count(*) from actions a where a.cluster = c.name and a.state = 'QUEUED') as queued,
        (select count(*) from actions a where a.cluster = c.name and a.state = 'LEASED') as leased,
        x.expiries, x.expired_workers,
        n.holding, n.lost, n.connected, n.in_grace
      from clusters c
      ${recentExpiries(clock)}
      -- One pass over the cluster's live sessions for every count.
      cross join lateral (
        select count(*) filter (where s.stream_lost_at is null) as connected,
               count(*) filter (where s.stream_lost_at is not null) as in_grace,
               -- The mass-disconnect valve weighs the sessions holding leases (reap-sessions.ts);
               -- they are looked up only for a partitioned cluster's reason.
               count(*) filter (where h.holds and (s.deadline < ${clock.now()} or s.stream_lost_at is not null and not s.stream_handed_over)) as lost,
               count(*) filter (where h.holds) as holding
        from sessions s join workers w on w.worker_id = s.worker_id
        cross join lateral (
          select c.partitioned_at is not null
            and exists (select 1 from actions a where a.session_id = s.id and a.state = 'LEASED') as holds
        ) h
        where w.cluster = c.name and s.ended_at is null
      ) n
      ${name === undefined ? sql`` : sql`where c.name = ${name}`} order by c.name`,
  );
  return rows.map((r) => {
    const expiries = toNumber(r.expiries);
    const connectedWorkers = toNumber(r.connected);
    const workersInGrace = toNumber(r.in_grace);
    const partitionedAt = r.partitioned_at == null ? undefined : toDate(r.partitioned_at);
    const resumedAt = r.expiries_resumed_at == null ? undefined : toDate(r.expiries_resumed_at);
    const { health, reason } = partitionedAt
      ? {
          health: "PARTITIONED" as const,
          reason:
            `${toNumber(r.lost)} of ${toNumber(r.holding)} sessions holding leases lost; partitioned since ` +
            `${partitionedAt.toISOString()}; ` +
            (resumedAt
              ? `an operator resumed lease expiries at ${resumedAt.toISOString()}`
              : "lease expiries are paused until they reconnect or an operator resumes them"),
        }
      : healthOf(expiries, toNumber(r.expired_workers));
    return {
      name: r.name,
      health,
      healthReason: reason,
      connectedWorkers,
      workersInGrace,
      queuedActions: toNumber(r.queued),
      leasedActions: toNumber(r.leased),
      recentExpiries: expiries,
      partitionedAt,
      expiriesPaused: partitionedAt !== undefined && resumedAt === undefined,
    };
  });
}

/** What {@link resumeExpiries} found. */
export type ResumeOutcome = "resumed" | "already resumed" | "not partitioned" | "not found";

/**
 * An operator's word that a partitioned cluster's lost sessions are really
 * gone (SPEC rule 10): its expiries go on for the rest of this partition.
 * Records a `cluster_expiries_resumed` event (with `actor`, the operator)
 * when it changes anything.
 */
export async function resumeExpiries(
  db: Db,
  clock: Clock,
  cluster: string,
  reason: string,
  actor: string,
): Promise<ResumeOutcome> {
  const suffix = reason ? `: ${reason}` : "";
  const [row] = await queryRows<{ partitioned: boolean; resumed: boolean; changed: boolean }>(
    db,
    sql`
      with target as (
        select name, partitioned_at, expiries_resumed_at from clusters where name = ${cluster} for update
      ),
      changed as (
        update clusters c set expiries_resumed_at = ${clock.now()}
        from target t
        where c.name = t.name and t.partitioned_at is not null and t.expiries_resumed_at is null
        returning c.name
      ),
      resumed_event as (
        insert into events (kind, cluster, message, details, actor)
        select 'cluster_expiries_resumed', name,
          'an operator resumed lease expiries of partitioned cluster ' || name || ${suffix},
          jsonb_build_object('reason', ${reason}::text), ${actor}
        from changed
      )
      select t.partitioned_at is not null as partitioned, t.expiries_resumed_at is not null as resumed,
             exists (select 1 from changed) as changed
      from target t`,
  );
  if (!row) return "not found";
  if (!row.partitioned) return "not partitioned";
  return row.changed ? "resumed" : "already resumed";
}

/** `x.expired_workers` of cluster `name` in the health window, as a scalar subquery. */
const expiredWorkersNow = (clock: Clock, name: SQL) => sql`
  (select count(distinct e.worker_id) from events e
   where e.cluster = ${name} and e.kind = 'lease_expired'
     and e.at > ${clock.now()} - make_interval(secs => ${HEALTH_WINDOW_MS} / 1000.0))`;

/**
 * Stores a cluster's new health with its `cluster_health_changed` event, in
 * one statement conditioned on what was read: the stored health still
 * `from`, and the window still counting `expiredWorkers` workers. Several
 * processes may judge the same cluster at once (the reaper of each, the
 * reports of expiries): one records a transition, the others find the row
 * changed and record nothing.
 */
async function storeHealth(
  db: Db,
  clock: Clock,
  name: string,
  from: string,
  expiredWorkers: number,
  to: { health: ClusterHealth; reason: string },
): Promise<boolean> {
  const { health, reason } = to;
  const rows = await queryRows<{ cluster: string }>(
    db,
    sql`
    with changed as (
      update clusters c set health = ${health}, health_reason = ${reason}
      where c.name = ${name} and c.health = ${from}
        and ${expiredWorkersNow(clock, sql`c.name`)} = ${expiredWorkers}
      returning c.name
    )
    insert into events (kind, cluster, message, details)
    select 'cluster_health_changed', name, ${`cluster ${name} is now ${health}${reason ? `: ${reason}` : ""}`},
      ${JSON.stringify({ from, to: health })}::jsonb
    from changed
    returning cluster`,
  );
  return rows.length > 0;
}

/**
 * Recomputes the stored health of the given clusters and records a
 * `cluster_health_changed` event for each that changed.
 */
export async function refreshClusterHealth(db: Db, clock: Clock, names: readonly string[]): Promise<void> {
  if (names.length === 0) return;
  const rows = await queryRows<{ name: string; health: string; expiries: unknown; expired_workers: unknown }>(
    db,
    sql`select c.name, c.health, x.expiries, x.expired_workers from clusters c ${recentExpiries(clock)}
        where c.name in (select jsonb_array_elements_text(${JSON.stringify(names)}::jsonb))`,
  );
  for (const r of rows) {
    const workers = toNumber(r.expired_workers);
    const now = healthOf(toNumber(r.expiries), workers);
    if (now.health !== r.health) await storeHealth(db, clock, r.name, r.health, workers, now);
  }
}

/**
 * Recomputes the stored health of every cluster stored as not HEALTHY (a
 * handful at most; the healthy ones are not read), as the window of
 * {@link HEALTH_WINDOW_MS} moves on: expiries only make a cluster worse, and
 * are followed by {@link refreshClusterHealth}, but a cluster gets better
 * only as time passes, with nothing else to say so. Its recovery is
 * recorded (a `cluster_health_changed` event) once its expiries leave the
 * window, as `clusters list` shows it, and a later degradation gets its
 * event too, which a stored health stuck at DEGRADED never gave.
 *
 * Returns the clusters whose health it changed, and when the next expiry of
 * a cluster still unhealthy leaves the window (the clock's time; undefined
 * when none is): nothing can get better before then, but for a cluster
 * another process degraded meanwhile.
 */
export async function refreshFadingClusterHealth(
  db: Db,
  clock: Clock,
): Promise<{ changed: { cluster: string; health: ClusterHealth }[]; next: Date | undefined }> {
  const rows = await queryRows<{
    name: string;
    health: string;
    expiries: unknown;
    expired_workers: unknown;
    leaves_at: unknown;
  }>(
    db,
    sql`select c.name, c.health, x.expiries, x.expired_workers,
          (select min(e.at) from events e
           where e.cluster = c.name and e.kind = 'lease_expired'
             and e.at > ${clock.now()} - make_interval(secs => ${HEALTH_WINDOW_MS} / 1000.0))
          + make_interval(secs => ${HEALTH_WINDOW_MS} / 1000.0) as leaves_at
        from clusters c ${recentExpiries(clock)}
        where c.health <> 'HEALTHY'`,
  );
  let next: Date | undefined;
  const changed: { cluster: string; health: ClusterHealth }[] = [];
  for (const r of rows) {
    const workers = toNumber(r.expired_workers);
    const now = healthOf(toNumber(r.expiries), workers);
    if (now.health !== r.health && (await storeHealth(db, clock, r.name, r.health, workers, now)))
      changed.push({ cluster: r.name, health: now.health });
    if (now.health === "HEALTHY" || r.leaves_at == null) continue;
    const leaves = toDate(r.leaves_at);
    if (next === undefined || leaves < next) next = leaves;
  }
  return { changed, next };
}

/** The stored health of every cluster (PARTITIONED while the valve holds), for the metrics. */
export async function readClusterHealth(db: Db): Promise<{ cluster: string; health: ClusterHealth }[]> {
  const rows = await queryRows<{ name: string; health: ClusterHealth }>(
    db,
    sql`select name, case when partitioned_at is not null then 'PARTITIONED' else health end as health
        from clusters order by name`,
  );
  return rows.map((r) => ({ cluster: r.name, health: r.health }));
}
