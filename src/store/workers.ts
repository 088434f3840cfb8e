import { type SQL, sql } from "drizzle-orm";
import type { LeaseToken } from "../work/worker-messages.js";
import type { Clock } from "./clock.js";
import type { Db } from "./database.js";
import { queryRows, toDate, toDateOrNull, toNumber } from "./rows.js";

/** Connected (open stream), in grace (stream lost, before the deadline) or offline. */
export type WorkerState = "CONNECTED" | "IN_GRACE" | "OFFLINE";

/** A worker with its live session and held leases. */
export interface WorkerRecord {
  readonly workerId: string;
  readonly cluster: string;
  readonly capacity: number;
  readonly labels: Readonly<Record<string, string>>;
  readonly agentVersion: string;
  readonly draining: boolean;
  readonly lastSeenAt: Date;
  readonly state: WorkerState;
  readonly session:
    | {
        readonly sessionId: string;
        readonly startedAt: Date;
        readonly deadline: Date;
        readonly streamLostAt: Date | null;
        readonly serverId: string | null;
        readonly lastHeardAt: Date;
      }
    | undefined;
  readonly heldLeases: readonly LeaseToken[];
}

interface WorkerRow {
  worker_id: string;
  cluster: string;
  capacity: number;
  labels: Record<string, string>;
  agent_version: string;
  draining: boolean;
  last_seen_at: unknown;
  session_id: string | null;
  started_at: unknown;
  deadline: unknown;
  stream_lost_at: unknown;
  server_id: string | null;
  last_heard_at: unknown;
  held: { id: string; epoch: unknown }[] | null;
}

function workerFromRow(r: WorkerRow): WorkerRecord {
  const session = r.session_id
    ? {
        sessionId: r.session_id,
        startedAt: toDate(r.started_at),
        deadline: toDate(r.deadline),
        streamLostAt: toDateOrNull(r.stream_lost_at),
        serverId: r.server_id,
        lastHeardAt: toDate(r.last_heard_at),
      }
    : undefined;
  return {
    workerId: r.worker_id,
    cluster: r.cluster,
    capacity: r.capacity,
    labels: r.labels,
    agentVersion: r.agent_version,
    draining: r.draining,
    lastSeenAt: toDate(r.last_seen_at),
    state: !session ? "OFFLINE" : session.streamLostAt ? "IN_GRACE" : "CONNECTED",
    session,
    heldLeases: (r.held ?? []).map((h) => ({ actionId: h.id, epoch: toNumber(h.epoch) })),
  };
}

/** Workers by id with their live session (if any) and held leases. */
export async function listWorkers(
  db: Db,
  filter: { cluster?: string | undefined; state?: WorkerState | undefined; workerId?: string | undefined },
  afterWorkerId: string | undefined,
  limit: number,
): Promise<WorkerRecord[]> {
  const conditions: SQL[] = [];
  if (filter.workerId) conditions.push(sql`w.worker_id = ${filter.workerId}`);
  if (filter.cluster) conditions.push(sql`w.cluster = ${filter.cluster}`);
  if (afterWorkerId) conditions.push(sql`w.worker_id > ${afterWorkerId}`);
  if (filter.state === "OFFLINE") conditions.push(sql`s.id is null`);
  if (filter.state === "CONNECTED") conditions.push(sql`s.id is not null and s.stream_lost_at is null`);
  if (filter.state === "IN_GRACE") conditions.push(sql`s.stream_lost_at is not null`);
  const where = conditions.length > 0 ? sql`where ${sql.join(conditions, sql` and `)}` : sql``;
  const rows = await queryRows<WorkerRow>(
    db,
    sql`
      select w.worker_id, w.cluster, w.capacity, w.labels, w.agent_version, w.last_seen_at,
             -- The flag stays set when the drained session ends (the next hello clears it): only a live session drains.
             w.draining and s.id is not null as draining,
             s.id as session_id, s.started_at, s.deadline, s.stream_lost_at, s.server_id, s.last_heard_at,
             (select jsonb_agg(jsonb_build_object('id', a.id, 'epoch', a.epoch) order by a.id)
                from actions a where a.session_id = s.id and a.state = 'LEASED') as held
      from workers w
      left join sessions s on s.worker_id = w.worker_id and s.ended_at is null
      ${where}
      order by w.worker_id
      limit ${limit}`,
  );
  return rows.map(workerFromRow);
}

/**
 * Marks a worker as draining (no new grants) and records the event, with
 * `actor` as who asked. A drain lasts as long as the worker's session, so
 * only a worker with a live session (connected, or in grace) can be drained:
 * "no session" leaves the row alone, and its next session gets work.
 */
export async function setWorkerDraining(
  db: Db,
  workerId: string,
  reason: string,
  actor: string,
): Promise<"draining" | "no session" | "not found"> {
  const row = await changeDrain(db, workerId, true, reason, actor);
  if (!row) return "not found";
  return row.changed ? "draining" : "no session";
}

/**
 * Ends a worker's drain (ClusterService.UndrainWorker) and records the event,
 * with `actor` as who asked. As for a drain, only a worker with a live
 * session: without one there is no drain to end ("no session"; the next
 * session is granted work anyway). A worker with a live session that is not
 * draining is left alone, without an event ("not draining").
 */
export async function setWorkerUndrained(
  db: Db,
  workerId: string,
  reason: string,
  actor: string,
): Promise<"undrained" | "not draining" | "no session" | "not found"> {
  const row = await changeDrain(db, workerId, false, reason, actor);
  if (!row) return "not found";
  if (row.changed) return "undrained";
  return row.live ? "not draining" : "no session";
}

/**
 * One statement for both: sets the flag while the worker has a live session
 * (an undrain only while it drains: no event for nothing) and records the
 * event of what changed. Undefined when the worker is unknown.
 */
async function changeDrain(
  db: Db,
  workerId: string,
  drain: boolean,
  reason: string,
  actor: string,
): Promise<{ live: boolean; changed: boolean } | undefined> {
  const [row] = await queryRows<{ live: boolean; changed: boolean }>(
    db,
    sql`
      with live as (
        select exists (select 1 from sessions where worker_id = ${workerId} and ended_at is null) as live
      ),
      changed as (
        update workers set draining = ${drain}, drain_reason = ${drain ? reason : ""}
        where worker_id = ${workerId} and (select live from live) ${drain ? sql`` : sql`and draining`}
        returning worker_id, cluster
      ),
      event as (
        insert into events (kind, worker_id, cluster, message, actor)
        select ${drain ? "worker_draining" : "worker_undrained"}, worker_id, cluster,
          'worker ' || worker_id || ${drain ? " is draining" : " is no longer draining"}
            || case when ${reason} <> '' then ': ' || ${reason} else '' end,
          ${actor}
        from changed
      )
      select (select live from live) as live, exists (select 1 from changed) as changed
      from workers where worker_id = ${workerId}`,
  );
  return row;
}

/** Used by tests and the health window: how long ago the database thinks `at` was. */
export async function databaseNow(db: Db, clock: Clock): Promise<Date> {
  const [row] = await queryRows<{ now: unknown }>(db, sql`select ${clock.now()} as now`);
  return toDate(row?.now);
}
