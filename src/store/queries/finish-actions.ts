import { type SQL, sql } from "drizzle-orm";
import type { ActionErrorInfo, JsonObject } from "../../work/action.js";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/** A report that ends an attempt: success, failure or release. */
export interface FinishReport {
  readonly actionId: string;
  readonly epoch: number;
  readonly sessionId: string;
  readonly kind: "succeeded" | "failed" | "released";
  readonly output?: JsonObject | undefined;
  readonly error?: ActionErrorInfo | undefined;
  readonly reason?: string | undefined;
  /** A release the worker made on its self-fence: its event says so. */
  readonly selfFenced?: boolean | undefined;
  /** The principal of the reporting session (whose hello opened it): the events' actor. */
  readonly actor: string;
}

/** An accepted report and the state it moved the action to. */
export interface Finished {
  /** Index of the report in its batch. */
  readonly key: number;
  readonly actionId: string;
  readonly state: "SUCCEEDED" | "FAILED" | "QUEUED" | "CANCELLED";
}

/**
 * Applies a batch of finishing reports in one statement (group commit: the
 * reports of many streams within a few milliseconds share it).
 *
 * Fencing (SPEC rule 4): a report applies only if (action id, epoch) is the
 * current lease AND the action is LEASED to the reporting session; the join
 * below is that condition, with the row locked (`for update`, in id order). A report that
 * does not come back was fenced and left no trace. Action ids must be unique
 * within one batch.
 *
 * A report sent again after its first copy was applied (its answer lost) is
 * accepted again without changing anything, so reports are idempotent.
 *
 * Outcomes: success → SUCCEEDED; release → QUEUED with no retry used;
 * retryable failure with attempts left → QUEUED after the policy's backoff;
 * other failures → FAILED; any report of an action whose cancel was
 * requested → CANCELLED.
 */
export async function finishActions(
  db: Db,
  clock: Clock,
  reports: readonly FinishReport[],
): Promise<Finished[]> {
  if (reports.length === 0) return [];
  const rows = await queryRows<FinishedRow>(
    db,
    sql`
      with ${finishCtes(reports, clock.now())}
      select k, id, state from f_updated
      union all
      select k, id, state from f_repeated`,
    { prepared: true },
  );
  return rows.map(finishedFromRow);
}

/** The columns an accepted report is read from. */
export interface FinishedRow {
  k: number;
  id: string;
  state: Finished["state"];
}

export const finishedFromRow = (r: FinishedRow): Finished => ({ key: r.k, actionId: r.id, state: r.state });

/**
 * The common table expressions of {@link finishActions}, for statements that
 * do more in the same commit (see `settle-and-grant.ts`). Accepted reports
 * are the rows of `f_updated` and `f_repeated` (k, id, state).
 */
export function finishCtes(reports: readonly FinishReport[], now: SQL): SQL {
  const input = JSON.stringify(
    reports.map((r, k) => ({
      k,
      action_id: r.actionId,
      epoch: r.epoch,
      session_id: r.sessionId,
      kind: r.kind,
      output: r.output ?? null,
      error: r.error ?? null,
      retryable: r.error?.retryable ?? false,
      reason: r.reason ?? "",
      self_fenced: r.selfFenced === true,
      actor: r.actor,
    })),
  );
  return sql`
f_input as (
        select * from jsonb_to_recordset(${input}::jsonb) as x(
          k int, action_id text, epoch bigint, session_id text, kind text,
          output jsonb, error jsonb, retryable bool, reason text, self_fenced bool, actor text)
        -- Always true (k is the report's index in the batch). A range on a column without
        -- statistics makes the planner expect a row instead of the 100 it assumes for any
        -- jsonb_to_recordset, which favours looking each report's action up by primary key.
        where x.k >= 0 and x.k < 2147483647
      ),
      f_current as (
        select a.id, a.epoch, a.cluster, a.worker_id, a.session_id, a.failure_count, a.max_attempts,
               a.initial_backoff_ms, a.backoff_multiplier, a.max_backoff_ms, a.cancel_requested,
               a.attempt_count, i.k, i.kind, i.output, i.error, i.retryable, i.reason, i.self_fenced, i.actor
        -- \`state || ''\`: by primary key, not the session's partial index (see grantCtes, claim-actions.ts).
        from actions a join f_input i
          on a.id = i.action_id and a.epoch = i.epoch and a.session_id = i.session_id
            and a.state || '' = 'LEASED'
        -- In id order, not the batch's (see the actions table, schema.ts): a cancel of many
        -- deployments locking the same rows in another order would deadlock with it.
        order by a.id
        for update of a
      ),
      f_decided as (
        select c.*,
          case
            when c.cancel_requested then 'CANCELLED'
            when c.kind = 'succeeded' then 'SUCCEEDED'
            when c.kind = 'released' then 'QUEUED'
            when c.retryable and c.failure_count + 1 < c.max_attempts then 'QUEUED'
            else 'FAILED' end as next_state
        from f_current c
      ),
      f_updated as (
        update actions a set
          state = d.next_state,
          output = case when d.next_state = 'SUCCEEDED' then d.output else a.output end,
          last_error = case when d.kind = 'failed' then d.error else a.last_error end,
          failure_count = a.failure_count + case when d.kind = 'failed' then 1 else 0 end,
          failure_reason = case
            when d.next_state = 'FAILED' and d.retryable then
              'failed after ' || (d.failure_count + 1)
              || case when d.failure_count = 0 then ' attempt' else ' attempts' end
              || ' (max_attempts ' || d.max_attempts || '): '
              || coalesce(d.error->>'message', '')
            when d.next_state = 'FAILED' then 'failed (not retryable): ' || coalesce(d.error->>'message', '')
            else a.failure_reason end,
          not_before = case
            when d.next_state = 'QUEUED' and d.kind = 'failed' then ${now} + make_interval(secs =>
              least(d.max_backoff_ms, d.initial_backoff_ms * power(d.backoff_multiplier, d.failure_count)) / 1000.0)
            else ${now} end,
          finished_at = case when d.next_state in ('SUCCEEDED', 'FAILED', 'CANCELLED') then ${now} else null end,
          session_id = null, worker_id = null, granted_at = null, updated_at = ${now}
        from f_decided d
        where a.id = d.id
        returning a.id, a.state, d.k, d.kind, d.epoch, d.cluster, d.worker_id, d.session_id, d.error, d.reason,
                  d.self_fenced, a.not_before, d.actor
      ),
      f_attempts_ended as (
        update attempts t set
          outcome = case
            when u.state = 'CANCELLED' then 'CANCELLED'
            when u.kind = 'succeeded' then 'SUCCEEDED'
            when u.kind = 'failed' then 'FAILED'
            else 'RELEASED' end,
          error = case when u.kind = 'failed' then u.error else null end,
          ended_at = ${now}
        from f_updated u where t.action_id = u.id and t.epoch = u.epoch
      ),
      f_report_events as (
        insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, details, actor)
        select
          case
            when u.state = 'CANCELLED' then 'action_cancelled'
            when u.state = 'SUCCEEDED' then 'action_succeeded'
            when u.state = 'FAILED' then 'action_failed'
            when u.kind = 'released' then 'lease_released'
            else 'action_retry_scheduled' end,
          u.id, u.worker_id, u.cluster, u.session_id, u.epoch,
          case
            when u.state = 'CANCELLED' then 'action cancelled; worker ' || u.worker_id || ' stopped it'
            when u.state = 'SUCCEEDED' then 'action succeeded on worker ' || u.worker_id
            when u.state = 'FAILED' then 'action failed on worker ' || u.worker_id || ': '
              || coalesce(u.error->>'message', '')
            when u.kind = 'released' then 'worker ' || u.worker_id || ' released the lease'
              || case when u.reason <> '' then ': ' || u.reason else '' end
            else 'attempt failed on worker ' || u.worker_id || '; retry after '
              || to_char(u.not_before at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') end,
          case when u.self_fenced then '{"self_fenced": true}'::jsonb end,
          u.actor
        from f_updated u
      ),
      -- A report sent again after its first copy was applied but not answered
      -- (the connection broke): the same attempt already ended the same way.
      -- An attempt a cancel ended when its worker reported keeps none of the
      -- worker's outcome (the action is CANCELLED whatever it reported): any
      -- copy is its repeat. One the server ended itself (a deployment's
      -- scope lease rolled back, without cancel_requested) had no report: a
      -- report on it is fenced. The copy may come from a later session of the
      -- same worker (its stream stayed broken past the grace period): a repeat
      -- changes nothing, and it tells the worker its report landed.
      f_repeated as (
        select i.k, a.id, a.state from f_input i
        join attempts t on t.action_id = i.action_id and t.epoch = i.epoch
          and (t.session_id = i.session_id
            or t.worker_id = (select s.worker_id from sessions s where s.id = i.session_id))
        join actions a on a.id = i.action_id
        where i.k not in (select k from f_current)
          and case
            when t.outcome = 'CANCELLED' then a.state = 'CANCELLED' and a.cancel_requested
            when i.kind = 'succeeded' then t.outcome = 'SUCCEEDED' and a.epoch = i.epoch and a.output is not distinct from i.output
            when i.kind = 'failed' then t.outcome = 'FAILED' and t.error is not distinct from i.error
            else t.outcome = 'RELEASED' end
        -- A copy whose first is still committing is not seen here: the statement's snapshot
        -- predates that commit, and a row that does not match is never locked nor looked at
        -- again. settleAndGrant then looks again, in a statement of its own.
        for share of t
      )`;
}
