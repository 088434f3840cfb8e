import { sql } from "drizzle-orm";
import type { Clock } from "./clock.js";
import type { Db } from "./database.js";
import { queryRows, toNumber } from "./rows.js";

/** HEALTHY, DEGRADED or UNHEALTHY. */
export type ClusterHealth = "HEALTHY" | "DEGRADED" | "UNHEALTHY";

/**
 * Health from lease expiries in a sliding window: the same cluster seeing
 * repeated expiries is a sign the cluster (not one worker) is in trouble.
 */
export const HEALTH_WINDOW_MS = 5 * 60_000;
/** Expiries in the window that make a cluster DEGRADED. */
export const DEGRADED_EXPIRIES = 3;
/** Expiries in the window that make a cluster UNHEALTHY. */
export const UNHEALTHY_EXPIRIES = 10;

export function healthOf(recentExpiries: number): { health: ClusterHealth; reason: string } {
  const window = `${HEALTH_WINDOW_MS / 60_000} minutes`;
  if (recentExpiries >= UNHEALTHY_EXPIRIES) {
    return { health: "UNHEALTHY", reason: `${recentExpiries} lease expiries in the last ${window}` };
  }
  if (recentExpiries >= DEGRADED_EXPIRIES) {
    return { health: "DEGRADED", reason: `${recentExpiries} lease expiries in the last ${window}` };
  }
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
}

const recentExpiries = (clock: Clock) => sql`
  (select count(*) from events e
   where e.cluster = c.name and e.kind = 'lease_expired'
     and e.at > ${clock.now()} - make_interval(secs => ${HEALTH_WINDOW_MS} / 1000.0))`;

/** Every cluster with live counts, health computed now. */
export async function listClusters(db: Db, clock: Clock): Promise<ClusterRecord[]> {
  const rows = await queryRows<{
    name: string;
    connected: unknown;
    in_grace: unknown;
    queued: unknown;
    leased: unknown;
    expiries: unknown;
  }>(
    db,
    sql`
      select c.name,
        (select count(*) from sessions s join workers w on w.worker_id = s.worker_id
          where w.cluster = c.name and s.ended_at is null and s.stream_lost_at is null) as connected,
        (select count(*) from sessions s join workers w on w.worker_id = s.worker_id
          where w.cluster = c.name and s.ended_at is null and s.stream_lost_at is not null) as in_grace,
        (select count(*) from actions a where a.cluster = c.name and a.state = 'QUEUED') as queued,
        (select count(*) from actions a where a.cluster = c.name and a.state = 'LEASED') as leased,
        ${recentExpiries(clock)} as expiries
      from clusters c order by c.name`,
  );
  return rows.map((r) => {
    const expiries = toNumber(r.expiries);
    const { health, reason } = healthOf(expiries);
    return {
      name: r.name,
      health,
      healthReason: reason,
      connectedWorkers: toNumber(r.connected),
      workersInGrace: toNumber(r.in_grace),
      queuedActions: toNumber(r.queued),
      leasedActions: toNumber(r.leased),
      recentExpiries: expiries,
    };
  });
}

/**
 * Recomputes the stored health of the given clusters and records a
 * `cluster_health_changed` event for each that changed.
 */
export async function refreshClusterHealth(db: Db, clock: Clock, names: readonly string[]): Promise<void> {
  if (names.length === 0) return;
  const rows = await queryRows<{ name: string; health: string; expiries: unknown }>(
    db,
    sql`select c.name, c.health, ${recentExpiries(clock)} as expiries from clusters c
        where c.name in (select jsonb_array_elements_text(${JSON.stringify(names)}::jsonb))`,
  );
  for (const r of rows) {
    const { health, reason } = healthOf(toNumber(r.expiries));
    if (health === r.health) continue;
    await db.execute(sql`
      with changed as (
        update clusters set health = ${health}, health_reason = ${reason}
        where name = ${r.name} and health <> ${health} returning name
      )
      insert into events (kind, cluster, message, details)
      select 'cluster_health_changed', name, ${`cluster ${r.name} is now ${health}${reason ? `: ${reason}` : ""}`},
        ${JSON.stringify({ from: r.health, to: health })}::jsonb
      from changed`);
  }
}
