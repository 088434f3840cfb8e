import { type SQL, sql } from "drizzle-orm";
import type { ActionFilter, ActionRecord, ActionState, AttemptRecord } from "../work/action.js";
import { type ActionRow, type AttemptRow, actionFromRow, attemptFromRow } from "./action-rows.js";
import type { Db } from "./database.js";
import { type PAGE_JSON_BYTES, readPage, type SizedRow } from "./page-read.js";
import { queryRows } from "./rows.js";

/** Reads one action; undefined if unknown. */
export async function findAction(db: Db, id: string): Promise<ActionRecord | undefined> {
  const [row] = await queryRows<ActionRow>(db, sql`select * from actions where id = ${id}`);
  return row && actionFromRow(row);
}

/** Reads several actions by id, in one query. */
export async function findActions(db: Db, ids: readonly string[]): Promise<Map<string, ActionRecord>> {
  if (ids.length === 0) return new Map();
  const rows = await queryRows<ActionRow>(
    db,
    sql`select * from actions where id in (select jsonb_array_elements_text(${JSON.stringify(ids)}::jsonb))`,
  );
  return new Map(rows.map((r) => [r.id, actionFromRow(r)]));
}

/**
 * Reads the actions `createdBy` submitted with these client request ids, with
 * the stored request hashes. Request ids are per principal: another
 * principal's action with the same id is never returned.
 */
export async function findActionsByRequestId(
  db: Db,
  createdBy: string,
  requestIds: readonly string[],
): Promise<Map<string, { action: ActionRecord; requestHash: string | null }>> {
  const rows = await queryRows<ActionRow & { request_hash: string | null }>(
    db,
    sql`select * from actions where created_by = ${createdBy}
          and request_id in (select jsonb_array_elements_text(${JSON.stringify(requestIds)}::jsonb))`,
  );
  return new Map(
    rows.map((r) => [r.request_id as string, { action: actionFromRow(r), requestHash: r.request_hash }]),
  );
}

/**
 * One page of actions in id (= submission) order, after `afterId`: up to
 * `limit`, fewer (`cut`) where the next would take the page's JSON past
 * {@link PAGE_JSON_BYTES}.
 */
export function listActions(
  db: Db,
  filter: ActionFilter,
  afterId: string | undefined,
  limit: number,
): Promise<{ items: ActionRecord[]; cut: boolean }> {
  return readPage(
    (after, n) => readActions(db, filter, after, n),
    (a) => a.id,
    afterId,
    limit,
  );
}

/** Up to `limit` actions after `afterId`, each with the size of its JSON as text. */
async function readActions(
  db: Db,
  filter: ActionFilter,
  afterId: string | undefined,
  limit: number,
): Promise<SizedRow<ActionRecord>[]> {
  const conditions: SQL[] = [];
  // A literal, not a parameter: a prepared plan cannot prove the partial indexes' predicates
  // (actions_claim_idx, actions_state_idx) from a parameter's value.
  if (filter.state) conditions.push(sql`state = ${sql.raw(stateLiteral(filter.state))}`);
  if (filter.cluster) conditions.push(sql`cluster = ${filter.cluster}`);
  // `<> ''` names actions_run_idx's predicate, which a prepared plan cannot prove from the value.
  if (filter.runId) conditions.push(sql`run_id = ${filter.runId} and run_id <> ''`);
  // events_worker_idx finds them; the attempts table has no index on its worker, and needs none elsewhere.
  if (filter.workerId)
    conditions.push(
      sql`id in (select action_id from events where worker_id = ${filter.workerId} and kind = 'lease_granted')`,
    );
  if (afterId) conditions.push(sql`id > ${afterId}`);
  const where = conditions.length > 0 ? sql`where ${sql.join(conditions, sql` and `)}` : sql``;
  const rows = await queryRows<ActionRow & { json_bytes: unknown }>(
    db,
    sql`select *, coalesce(octet_length(payload::text), 0) + coalesce(octet_length(output::text), 0)
          + coalesce(octet_length(last_error::text), 0) + coalesce(octet_length(phase_details::text), 0)
          as json_bytes
        from actions ${where} order by id limit ${limit}`,
  );
  return rows.map((row) => ({ item: actionFromRow(row), jsonBytes: Number(row.json_bytes) }));
}

const STATE_LITERALS: Readonly<Record<ActionState, string>> = {
  QUEUED: "'QUEUED'",
  LEASED: "'LEASED'",
  SUCCEEDED: "'SUCCEEDED'",
  FAILED: "'FAILED'",
  CANCELLED: "'CANCELLED'",
};

/** `state` as an SQL literal; throws on anything that is not a state (never spliced in unchecked). */
function stateLiteral(state: ActionState): string {
  const literal = Object.hasOwn(STATE_LITERALS, state) ? STATE_LITERALS[state] : undefined;
  if (literal === undefined) throw new Error(`listActions: not an action state: ${JSON.stringify(state)}`);
  return literal;
}

/** Attempts of an action, oldest first. */
export async function listAttempts(db: Db, actionId: string): Promise<AttemptRecord[]> {
  const rows = await queryRows<AttemptRow>(
    db,
    sql`select * from attempts where action_id = ${actionId} order by epoch`,
  );
  return rows.map(attemptFromRow);
}

/** What a cancel did. */
export type CancelOutcome =
  | { readonly kind: "cancelled"; readonly action: ActionRecord }
  | { readonly kind: "revoke_requested"; readonly action: ActionRecord }
  | { readonly kind: "unchanged"; readonly action: ActionRecord }
  | { readonly kind: "not_found" };

/**
 * Cancels an action in one transaction. The row lock (`for update`) orders
 * the cancel against a concurrent grant or completion: a QUEUED action
 * becomes CANCELLED; a LEASED one is marked cancel_requested (its owner gets
 * a revoke); a finished one is left as it is. `actor` is the principal
 * cancelling, recorded on the event.
 */
export async function cancelAction(
  db: Db,
  id: string,
  reason: string,
  actor: string,
): Promise<CancelOutcome> {
  return db.transaction(async (tx) => {
    const txDb = tx as unknown as Db;
    const [row] = await queryRows<ActionRow>(txDb, sql`select * from actions where id = ${id} for update`);
    if (!row) return { kind: "not_found" };
    const current = actionFromRow(row);
    const message = reason ? `action cancelled: ${reason}` : "action cancelled";
    if (current.state === "QUEUED") {
      const [updated] = await queryRows<ActionRow>(
        txDb,
        sql`update actions set state = 'CANCELLED', failure_reason = ${message},
              finished_at = now(), updated_at = now()
            where id = ${id} returning *`,
      );
      await txDb.execute(
        sql`insert into events (kind, action_id, cluster, message, actor)
            values ('action_cancelled', ${id}, ${current.cluster}, ${message}, ${actor})`,
      );
      return { kind: "cancelled", action: actionFromRow(updated as ActionRow) };
    }
    if (current.state === "LEASED" && !current.cancelRequested) {
      // Nothing is cancelled yet: the worker is asked to stop, and the action ends CANCELLED
      // (with `message` as its reason) once it lets go.
      const requested = `cancel requested${reason ? `: ${reason}` : ""}; revoking from ${current.workerId}`;
      const [updated] = await queryRows<ActionRow>(
        txDb,
        sql`update actions set cancel_requested = true, failure_reason = ${message}, updated_at = now()
            where id = ${id} returning *`,
      );
      await txDb.execute(
        sql`insert into events (kind, action_id, cluster, worker_id, session_id, epoch, message, actor)
            values ('action_cancel_requested', ${id}, ${current.cluster}, ${current.workerId},
                    ${current.sessionId}, ${current.epoch}, ${requested}, ${actor})`,
      );
      return { kind: "revoke_requested", action: actionFromRow(updated as ActionRow) };
    }
    return { kind: "unchanged", action: current };
  });
}

/** Which actions {@link cancelMatchingActions} cancels: always one cluster's. */
export interface CancelFilter {
  readonly cluster: string;
  readonly runId?: string | undefined;
  readonly actionIds?: readonly string[] | undefined;
  readonly state?: "QUEUED" | "LEASED" | undefined;
  /** Only the actions this principal submitted (a caller with action.cancel.own alone). */
  readonly createdBy?: string | undefined;
}

/** What {@link cancelMatchingActions} did. */
export interface CancelledMatching {
  /** Queued actions now CANCELLED, in id order. */
  readonly cancelled: readonly string[];
  /** Leased actions now marked cancel_requested, in id order: their owners are to be sent a revoke. */
  readonly cancelRequested: readonly ActionRecord[];
  /** Whether more actions match than were taken. */
  readonly more: boolean;
}

/**
 * Cancels up to `limit` queued or leased actions matching `filter` in one
 * statement, as {@link cancelAction} cancels one: a queued action becomes
 * CANCELLED, a leased one is marked cancel_requested (its owner gets a
 * revoke), each with its event. Actions already cancel_requested are not
 * matched, so a repeated call goes on where the last stopped. Rows are
 * locked in id order, as every statement that locks several actions takes
 * them (schema.ts); a row that changed while waiting for its lock is checked
 * again by PostgreSQL and left out if it no longer matches.
 */
export async function cancelMatchingActions(
  db: Db,
  filter: CancelFilter,
  limit: number,
  reason: string,
  actor: string,
): Promise<CancelledMatching> {
  const message = reason ? `action cancelled: ${reason}` : "action cancelled";
  const requested = `cancel requested${reason ? `: ${reason}` : ""}; revoking from `;
  const conditions: SQL[] = [sql`cluster = ${filter.cluster}`, sql`not cancel_requested`];
  if (filter.runId) conditions.push(sql`run_id = ${filter.runId} and run_id <> ''`);
  if (filter.actionIds)
    conditions.push(
      sql`id in (select jsonb_array_elements_text(${JSON.stringify(filter.actionIds)}::jsonb))`,
    );
  if (filter.createdBy !== undefined) conditions.push(sql`created_by = ${filter.createdBy}`);
  // One branch per state, each naming its state as a literal: the planner then reads a cluster's
  // queued actions through actions_claim_idx and its leased ones through actions_state_idx. With
  // `state in (...)` it proved neither partial index's predicate and read every row of the table.
  const states = filter.state ? [filter.state] : (["QUEUED", "LEASED"] as const);
  const matching = (after?: SQL) =>
    sql.join(
      states.map(
        (state) =>
          sql`select id from actions where state = ${sql.raw(stateLiteral(state))} and ${sql.join(
            after ? [...conditions, after] : conditions,
            sql` and `,
          )}`,
      ),
      sql` union all `,
    );
  const rows = await queryRows<ActionRow & { was: string }>(
    db,
    sql`
      with target as (
        -- Locked in id order. A row that changed while its lock was awaited is checked again
        -- against the outer conditions: one granted meanwhile is cancelled as leased, one
        -- finished meanwhile is left out.
        select id, state from actions
        where id in (${matching()}) and state in ('QUEUED', 'LEASED') and not cancel_requested
        order by id limit ${limit} for update
      ),
      queued as (
        update actions a set state = 'CANCELLED', failure_reason = ${message}, finished_at = now(),
          updated_at = now()
        from target t where a.id = t.id and t.state = 'QUEUED'
        returning a.*
      ),
      leased as (
        update actions a set cancel_requested = true, failure_reason = ${message}, updated_at = now()
        from target t where a.id = t.id and t.state = 'LEASED'
        returning a.*
      ),
      queued_events as (
        insert into events (kind, action_id, cluster, message, actor)
        select 'action_cancelled', id, cluster, ${message}, ${actor} from queued
      ),
      leased_events as (
        insert into events (kind, action_id, cluster, worker_id, session_id, epoch, message, actor)
        select 'action_cancel_requested', id, cluster, worker_id, session_id, epoch,
          ${requested} || coalesce(worker_id, ''), ${actor} from leased
      )
      select *, 'QUEUED' as was from queued
      union all select *, 'LEASED' from leased`,
  );
  // Whether any matches past the last one taken (unlocked: a hint to call again, nothing more).
  let more = false;
  const last = rows.reduce<string | undefined>(
    (max, r) => (max === undefined || r.id > max ? r.id : max),
    undefined,
  );
  if (rows.length === limit && last !== undefined) {
    const [row] = await queryRows<{ more: boolean }>(
      db,
      sql`select exists (${matching(sql`id > ${last}`)}) as more`,
    );
    more = row?.more === true;
  }
  const byId = (a: { id: string }, b: { id: string }) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  return {
    cancelled: rows
      .filter((r) => r.was === "QUEUED")
      .sort(byId)
      .map((r) => r.id),
    cancelRequested: rows
      .filter((r) => r.was === "LEASED")
      .sort(byId)
      .map(actionFromRow),
    more,
  };
}

/**
 * Queued and leased actions by cluster (clusters with neither are left out).
 * Each state is counted through its partial index: the claim index for the
 * queued, the session index for the leased. For the metrics, read at every
 * scrape: `listClusters` (clusters.ts) counts the same two figures, but also
 * walks every live session and the cluster's recent events, more than a
 * scrape every few seconds should cost.
 */
export async function countActionsByCluster(
  db: Db,
): Promise<{ cluster: string; queued: number; leased: number }[]> {
  const rows = await queryRows<{ cluster: string; state: string; n: unknown }>(
    db,
    sql`select cluster, 'QUEUED' as state, count(*) as n from actions where state = 'QUEUED' group by cluster
        union all
        select cluster, 'LEASED', count(*) from actions where state = 'LEASED' group by cluster`,
  );
  const byCluster = new Map<string, { cluster: string; queued: number; leased: number }>();
  for (const row of rows) {
    const counts = byCluster.get(row.cluster) ?? { cluster: row.cluster, queued: 0, leased: 0 };
    if (row.state === "QUEUED") counts.queued = Number(row.n);
    else counts.leased = Number(row.n);
    byCluster.set(row.cluster, counts);
  }
  return [...byCluster.values()];
}
