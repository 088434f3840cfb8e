import { sql } from "drizzle-orm";
import type { ActionRecord, NewAction } from "../../work/action.js";
import { type ActionRow, actionFromRow } from "../action-rows.js";
import { findActionsByRequestId } from "../actions.js";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/**
 * Inserts a batch of submitted actions in one statement, with their
 * `action_submitted` events and any new cluster names.
 *
 * Hot path (every submit goes through it, group-committed by the batcher):
 * the batch travels as one JSON parameter expanded by jsonb_to_recordset,
 * which is far cheaper per row than one statement per action.
 *
 * Locking: plain inserts. A request_id the same actor already used (or that
 * repeats for one actor inside the batch) is skipped by `on conflict do
 * nothing`; the caller looks the existing action up. Request ids are per
 * principal: another actor's use of the same id never conflicts. Rows
 * returned are only the ones inserted.
 *
 * `actor` is the submitting principal: the action's `created_by` and the
 * actor of its `action_submitted` event.
 */
export async function insertActions(
  db: Db,
  clock: Clock,
  items: readonly { readonly id: string; readonly action: NewAction; readonly actor: string }[],
): Promise<ActionRecord[]> {
  const input = JSON.stringify(
    items.map(({ id, action: a, actor }) => ({
      id,
      actor,
      request_id: a.requestId ?? null,
      request_hash: a.requestHash ?? null,
      trace_parent: a.traceParent ?? null,
      run_id: a.runId,
      cluster: a.cluster,
      label_selector: a.labelSelector,
      payload: a.payload ?? null,
      priority: a.priority,
      max_attempts: a.retryPolicy.maxAttempts,
      initial_backoff_ms: a.retryPolicy.initialBackoffMs,
      backoff_multiplier: a.retryPolicy.backoffMultiplier,
      max_backoff_ms: a.retryPolicy.maxBackoffMs,
      max_system_retries: a.maxSystemRetries,
    })),
  );
  const rows = await queryRows<ActionRow>(
    db,
    sql`
      with input as (
        select * from jsonb_to_recordset(${input}::jsonb) as x(
          id text, request_id text, request_hash text, trace_parent text, run_id text, cluster text,
          label_selector jsonb, payload jsonb, priority int, max_attempts int,
          initial_backoff_ms int, backoff_multiplier float8, max_backoff_ms int,
          max_system_retries int, actor text)
      ),
      inserted as (
        insert into actions (id, request_id, request_hash, trace_parent, run_id, cluster, label_selector, payload,
          priority, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
          max_system_retries, state, not_before, created_by)
        select id, request_id, request_hash, trace_parent, run_id, cluster, label_selector, payload,
          priority, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
          max_system_retries, 'QUEUED', ${clock.now()}, actor
        from input
        on conflict (created_by, request_id) do nothing
        returning *
      ),
      submitted as (
        insert into events (kind, action_id, cluster, message, actor)
        select 'action_submitted', id, cluster, 'action submitted', created_by from inserted
      ),
      new_clusters as (
        insert into clusters (name) select distinct cluster from inserted
        on conflict (name) do nothing
      )
      select * from inserted`,
  );
  return rows.map(actionFromRow);
}

/** What {@link insertActionsAtomically} did. */
export type AtomicInsertOutcome =
  /** Every item answered, in order: inserted (`created`) or a retry of an earlier submission. */
  | { readonly kind: "done"; readonly results: readonly { action: ActionRecord; created: boolean }[] }
  /** Item `index` reuses a request id the actor used for a different request; nothing was written. */
  | { readonly kind: "reused"; readonly index: number; readonly existing: ActionRecord }
  /**
   * A concurrent submission took one of the request ids between the lookup
   * and the insert (or two bulk calls deadlocked on each other's ids):
   * nothing was written; running it again sees the winner.
   */
  | { readonly kind: "raced" };

/** Thrown inside the transaction to roll it back after a race; never escapes. */
const RACED = Symbol("raced");

/**
 * Inserts `items`, all submitted by `actor`, all or none, in one transaction
 * of two statements whatever the number of items: one lookup of the actor's
 * request ids, one {@link insertActions} of the new ones (with their events
 * and clusters). An item whose request id the actor already used for the same
 * request (same `requestHash`) is answered with the existing action and
 * `created` false; for a different request the outcome is `reused` and
 * nothing is written. Request ids must be distinct within `items` (the rpc
 * layer refuses repeats).
 *
 * Locking: the lookup reads committed rows; the insert's `on conflict do
 * nothing` waits for a concurrent transaction holding the same
 * (created_by, request_id) and then skips the row. Fewer rows inserted than
 * asked means such a race: the transaction is rolled back and the outcome is
 * `raced`, as it is for a deadlock (40P01) between two bulk calls inserting
 * the same ids in different orders. The caller runs it again.
 */
export async function insertActionsAtomically(
  db: Db,
  clock: Clock,
  actor: string,
  items: readonly { readonly id: string; readonly action: NewAction }[],
): Promise<AtomicInsertOutcome> {
  try {
    return await db.transaction(async (t) => {
      const tx = t as unknown as Db;
      const requestIds = items.flatMap(({ action }) => (action.requestId ? [action.requestId] : []));
      const existing =
        requestIds.length > 0 ? await findActionsByRequestId(tx, actor, requestIds) : new Map();
      const fresh: { id: string; action: NewAction; actor: string }[] = [];
      for (const [index, { id, action }] of items.entries()) {
        const earlier = action.requestId ? existing.get(action.requestId) : undefined;
        if (earlier === undefined) fresh.push({ id, action, actor });
        else if (earlier.requestHash !== action.requestHash) {
          return { kind: "reused", index, existing: earlier.action } as const;
        }
      }
      const inserted =
        fresh.length > 0 ? new Map((await insertActions(tx, clock, fresh)).map((a) => [a.id, a])) : new Map();
      if (inserted.size !== fresh.length) throw RACED;
      const results = items.map(({ id, action }) => {
        const created = inserted.get(id);
        if (created) return { action: created as ActionRecord, created: true };
        return { action: existing.get(action.requestId as string)?.action as ActionRecord, created: false };
      });
      return { kind: "done", results } as const;
    });
  } catch (error) {
    if (error === RACED || sqlState(error) === "40P01") return { kind: "raced" };
    throw error;
  }
}

/** The SQLSTATE of a driver error, looking through drizzle's wrapper. */
function sqlState(error: unknown): string | undefined {
  for (let e = error, depth = 0; e !== null && typeof e === "object" && depth < 4; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}
