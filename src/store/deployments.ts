import { sql } from "drizzle-orm";
import type { Db } from "./database.js";
import { queryRows, toNumber } from "./rows.js";

/** A lease held by a worker session: where to send a revoke. */
export interface HeldToken {
  readonly actionId: string;
  readonly epoch: number;
  readonly sessionId: string;
}

/** What a destroy's cancel ended: every action, for its watchers; the held ones, for their holders. */
export interface EndedActions {
  /** Every action cancelled, queued or leased: its watchers wait for a wake-up. */
  readonly actionIds: readonly string[];
  /** The leased ones' leases, to revoke from their holders once the transaction commits. */
  readonly revokes: readonly HeldToken[];
}

/**
 * Finishes the actions of destroyed deployments as CANCELLED, in the caller's
 * transaction (a rollback, an expiry, a delete). Queued ones never start; a
 * leased one's lease ends here, so any later report of its holder is fenced.
 * Returns every action cancelled (their watchers are to be woken, a queued
 * one's too) and the leases that were held, to revoke from their holders once
 * the transaction commits. `actor` is the principal whose call destroyed them
 * (empty for a TTL rollback): the events' actor.
 */
export async function cancelDeploymentActions(
  tx: Db,
  actionIds: readonly string[],
  message: string,
  actor: string,
  only: "queued" | "queued or leased" = "queued or leased",
): Promise<EndedActions> {
  if (actionIds.length === 0) return { actionIds: [], revokes: [] };
  const rows = await queryRows<{ id: string; epoch: unknown; state: string; session_id: string | null }>(
    tx,
    sql`
      with target as (
        select id, epoch, state, cluster, worker_id, session_id from actions
        where id in (select jsonb_array_elements_text(${JSON.stringify(actionIds)}::jsonb))
          and state in ('QUEUED', ${only === "queued" ? "QUEUED" : "LEASED"})
        -- In id order, as every statement that locks several actions takes them (see the actions
        -- table, schema.ts): in any other order, a rollback of many deployments deadlocks with a
        -- batch of their agents' reports.
        order by id
        for update
      ),
      cancelled as (
        update actions a set state = 'CANCELLED', failure_reason = ${message}, finished_at = now(),
          updated_at = now(), session_id = null, worker_id = null, granted_at = null
        from target t where a.id = t.id
        returning t.*
      ),
      attempts_ended as (
        update attempts t set outcome = 'CANCELLED', ended_at = now()
        from cancelled c where t.action_id = c.id and t.epoch = c.epoch and c.state = 'LEASED'
      ),
      event as (
        insert into events (kind, action_id, cluster, worker_id, session_id, epoch, message, actor)
        select 'action_cancelled', id, cluster, worker_id, session_id, epoch, ${message}, ${actor} from cancelled
      )
      select id, epoch, state, session_id from cancelled`,
  );
  return {
    actionIds: rows.map((r) => r.id),
    revokes: rows
      .filter((r) => r.state === "LEASED")
      .map((r) => ({ actionId: r.id, epoch: toNumber(r.epoch), sessionId: r.session_id as string })),
  };
}

/**
 * Asks the holders of deployment actions to save their outputs and stop
 * (stop_reason COLLECT_OUTPUTS; the lease stays valid so the holder can report
 * its files). Returns the leases to send the request to. Queued actions are
 * not touched: the caller cancels them. `actor` is who asked (the events' actor).
 * The actions are locked in id order first (see `cancelDeploymentActions`).
 */
export async function requestOutputs(
  db: Db,
  actionIds: readonly string[],
  actor: string,
): Promise<(HeldToken & { readonly workerId: string })[]> {
  if (actionIds.length === 0) return [];
  const rows = await queryRows<{ id: string; epoch: unknown; session_id: string; worker_id: string }>(
    db,
    sql`
      with target as (
        select id from actions
        where id in (select jsonb_array_elements_text(${JSON.stringify(actionIds)}::jsonb))
          and state = 'LEASED'
        order by id
        for update
      ),
      asked as (
        update actions a set stop_reason = 'COLLECT_OUTPUTS', updated_at = now()
        from target t where a.id = t.id
        returning a.id, a.epoch, a.session_id, a.cluster, a.worker_id
      ),
      event as (
        insert into events (kind, action_id, cluster, worker_id, session_id, epoch, message, actor)
        select 'outputs_requested', id, cluster, worker_id, session_id, epoch,
          'asked the agent to save the outputs and stop', ${actor} from asked
      )
      select id, epoch, session_id, worker_id from asked`,
  );
  return rows.map((r) => ({
    actionId: r.id,
    epoch: toNumber(r.epoch),
    sessionId: r.session_id,
    workerId: r.worker_id,
  }));
}
