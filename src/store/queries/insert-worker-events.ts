import { sql } from "drizzle-orm";
import type { Db } from "../database.js";

/**
 * An event about a worker's session, written by {@link insertWorkerEvents}.
 * Field names are the columns'.
 */
export interface WorkerEvent {
  readonly kind: string;
  readonly worker_id: string;
  /** The event's cluster; null: the worker's, as its row says. */
  readonly cluster: string | null;
  readonly session_id: string;
  /** The principal whose call caused it. */
  readonly actor: string;
  readonly action_id: string | null;
  readonly epoch: number | null;
  readonly message: string;
  readonly details?: Record<string, unknown> | null;
  /**
   * A lease the worker itself named (listed in a hello, reported on) and did
   * not hold: an (action, epoch) it chose, not one the server gave it. Such a
   * name is checked before the event keeps it, since the worker could name
   * any action of any cluster, and the event is read by the worker's
   * cluster's readers:
   * - an action of the event's cluster at an epoch the worker once held: the
   *   event is written as given;
   * - an action of the event's cluster whose epoch the worker never held:
   *   with `never_message`;
   * - no action of the event's cluster has that id (another cluster's, or
   *   none): with `foreign_message` and `foreign_details`, and without
   *   action or epoch, so the event names nothing of another cluster.
   */
  readonly named?: {
    readonly action_id: string;
    readonly epoch: number;
    readonly never_message: string;
    /**
     * Instead of `never_message` for a listed lease above the action's epoch,
     * or at its epoch granted to another worker: not a lease the worker never
     * held, but one the database no longer knows it granted (it went back in
     * time: lease/regressions.ts).
     */
    readonly lost_message?: string;
    readonly foreign_message: string;
    readonly foreign_details?: Record<string, unknown> | null;
    /**
     * For a fenced report's event: its message up to the reason (e.g.
     * "progress from worker w rejected: "). When the action is of the
     * event's cluster and the worker once held that epoch, the reason is
     * read from the action's row in this statement (off the report path:
     * these rows are group-committed after the answer), so it says the
     * real one: the action already ended (and how), the epoch is older than
     * the current one, another session holds the lease, or the lease ended
     * and the action waits for its next grant. Otherwise `message` stands.
     * The row is read a moment after the report was fenced: what it says
     * may have moved on since (a newer lease that already ended, say).
     */
    readonly fenced_prefix?: string;
  };
}

/**
 * Inserts `events` in one statement, in their order (their sequence numbers
 * follow it: a hello's session event comes before its leases'). An event that names a lease the worker
 * chose (`named`) looks its action up in the event's cluster, and the
 * worker's attempts of it, in the same statement; the others join nothing.
 */
export async function insertWorkerEvents(db: Db, events: readonly WorkerEvent[]): Promise<void> {
  if (events.length === 0) return;
  const input = JSON.stringify(
    events.map((e, n) => ({
      n,
      kind: e.kind,
      worker_id: e.worker_id,
      cluster: e.cluster,
      session_id: e.session_id,
      actor: e.actor,
      action_id: e.action_id,
      epoch: e.epoch,
      message: e.message,
      details: e.details ?? null,
      named_action_id: e.named?.action_id ?? null,
      named_epoch: e.named?.epoch ?? null,
      never_message: e.named?.never_message ?? null,
      lost_message: e.named?.lost_message ?? null,
      foreign_message: e.named?.foreign_message ?? null,
      foreign_details: e.named?.foreign_details ?? null,
      fenced_prefix: e.named?.fenced_prefix ?? null,
    })),
  );
  await db.execute(sql`
    insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, details, actor)
    select x.kind,
      case when x.named_action_id is not null and a.id is null then null else x.action_id end,
      x.worker_id, coalesce(x.cluster, w.cluster), x.session_id,
      case when x.named_action_id is not null and a.id is null then null else x.epoch end,
      case when x.named_action_id is null then x.message
           when a.id is null then x.foreign_message
           when x.lost_message is not null and (a.epoch < x.named_epoch or (a.epoch = x.named_epoch and not exists (
             select 1 from attempts t where t.action_id = a.id and t.epoch = x.named_epoch
                                        and t.worker_id = x.worker_id))) then x.lost_message
           when not exists (select 1 from attempts t where t.action_id = a.id and t.epoch = x.named_epoch
                                                       and t.worker_id = x.worker_id) then x.never_message
           when x.fenced_prefix is null then x.message
           when a.state in ('SUCCEEDED', 'FAILED', 'CANCELLED') then
             x.fenced_prefix || 'the action already ended ' || a.state || ' (under epoch ' || a.epoch || ')'
           when a.epoch > x.named_epoch then
             x.fenced_prefix || 'epoch ' || x.named_epoch || ' is older than the current epoch ' || a.epoch
           when a.state = 'LEASED' and a.session_id is distinct from x.session_id then
             x.fenced_prefix || 'epoch ' || x.named_epoch || ' is the lease of another session (' || a.session_id || ')'
           when a.state = 'QUEUED' then
             x.fenced_prefix || 'the lease of epoch ' || x.named_epoch
             || ' ended (expired, released or revoked); the action waits in the queue for its next grant'
           else x.message end,
      case when x.named_action_id is not null and a.id is null then x.foreign_details else x.details end,
      x.actor
    from jsonb_to_recordset(${input}::jsonb)
      as x(n int, kind text, worker_id text, cluster text, session_id text, actor text, action_id text, epoch bigint,
           message text, details jsonb, named_action_id text, named_epoch bigint, never_message text, lost_message text,
           foreign_message text, foreign_details jsonb, fenced_prefix text)
    left join workers w on w.worker_id = x.worker_id
    left join actions a on a.id = x.named_action_id and a.cluster = coalesce(x.cluster, w.cluster)
    order by x.n`);
}
