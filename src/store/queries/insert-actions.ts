import { sql } from "drizzle-orm";
import type { ActionRecord, NewAction } from "../../work/action.js";
import { type ActionRow, actionFromRow } from "../action-rows.js";
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
          id text, request_id text, request_hash text, run_id text, cluster text,
          label_selector jsonb, payload jsonb, priority int, max_attempts int,
          initial_backoff_ms int, backoff_multiplier float8, max_backoff_ms int,
          max_system_retries int, actor text)
      ),
      inserted as (
        insert into actions (id, request_id, request_hash, run_id, cluster, label_selector, payload,
          priority, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
          max_system_retries, state, not_before, created_by)
        select id, request_id, request_hash, run_id, cluster, label_selector, payload,
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
