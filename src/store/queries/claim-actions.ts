import { type SQL, sql } from "drizzle-orm";
import type { JsonObject } from "../../work/action.js";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toNumber } from "../rows.js";

/** A queued action locked for granting. */
export interface Claimable {
  readonly id: string;
  readonly labelSelector: Readonly<Record<string, string>>;
}

/**
 * Locks up to `limit` queued actions of `cluster` that some free worker can
 * take, by priority then age. Run inside the transaction that grants them.
 *
 * Locking: `for update skip locked`, so processes sharing the database claim
 * disjoint batches and never wait on each other. `labelSets` are the label
 * maps of this process's workers with free slots: an action is claimable only
 * if one of them carries all its selector labels (`<@`), so actions no worker
 * here can take never block the head of the queue. Served by the partial
 * index actions_claim_idx (cluster, priority desc nulls last, created_at)
 * where QUEUED. The order must name `nulls last` as the index does (drizzle's
 * `.desc()`), though priority is never null: without it PostgreSQL cannot
 * read the index in order and sorts every queued action of the cluster on
 * each claim.
 */
export async function claimActions(
  tx: Db,
  clock: Clock,
  cluster: string,
  labelSets: readonly Readonly<Record<string, string>>[],
  limit: number,
): Promise<Claimable[]> {
  const rows = await queryRows<{ id: string; label_selector: Record<string, string> }>(
    tx,
    sql`
      select id, label_selector from actions
      where state = 'QUEUED' and cluster = ${cluster} and not_before <= ${clock.now()}
        and (label_selector = '{}'::jsonb
             or exists (select 1 from jsonb_array_elements(${JSON.stringify(labelSets)}::jsonb) l
                        where actions.label_selector <@ l))
      order by priority desc nulls last, created_at
      limit ${limit}
      for update skip locked`,
  );
  return rows.map((r) => ({ id: r.id, labelSelector: r.label_selector }));
}

/** One action assigned to one session's current stream. */
export interface Assignment {
  readonly actionId: string;
  readonly sessionId: string;
  readonly streamToken: string;
  readonly workerId: string;
}

/** A grant as it is sent to the worker. */
export interface GrantRecord {
  readonly actionId: string;
  readonly sessionId: string;
  readonly workerId: string;
  readonly cluster: string;
  readonly epoch: number;
  readonly attempt: number;
  readonly payload: JsonObject | null;
  readonly runId: string;
  readonly checkpoint: JsonObject | null;
  /** The action's W3C traceparent (its submitting span), when it was submitted while the server traced. */
  readonly traceParent?: string | null;
}

/**
 * Grants claimed actions (locked by {@link claimActions} in the same
 * transaction) in one statement: epoch + 1, attempt row, `lease_granted`
 * event. Conditional on the action still being QUEUED and the session still
 * live on the same stream.
 *
 * Locking: the target sessions are locked `for share` first. A reaper
 * (`for update skip locked`) skips them until this commits, and a goodbye
 * waits for it, so no grant can land on a session that is ending; a session
 * ended or taken over before the lock is re-checked and excluded.
 */
export async function grantActions(
  tx: Db,
  clock: Clock,
  assignments: readonly Assignment[],
): Promise<GrantRecord[]> {
  if (assignments.length === 0) return [];
  const now = clock.now();
  const input = JSON.stringify(
    assignments.map((a) => ({
      id: a.actionId,
      session_id: a.sessionId,
      token: a.streamToken,
      worker_id: a.workerId,
    })),
  );
  const rows = await queryRows<GrantRow>(
    tx,
    sql`
      with g_input as (
        select * from jsonb_to_recordset(${input}::jsonb) as x(id text, session_id text, token text, worker_id text)
      ),
      ${grantCtes(now)}
      select * from g_granted`,
  );
  return rows.map(grantFromRow);
}

/** The columns a grant is read from (a leased action's row). */
export interface GrantRow {
  id: string;
  session_id: string;
  worker_id: string;
  cluster: string;
  epoch: unknown;
  attempt_count: number;
  payload: JsonObject | null;
  run_id: string;
  checkpoint: JsonObject | null;
  trace_parent: string | null;
}

export const grantFromRow = (r: GrantRow): GrantRecord => ({
  actionId: r.id,
  sessionId: r.session_id,
  workerId: r.worker_id,
  cluster: r.cluster,
  epoch: toNumber(r.epoch),
  attempt: r.attempt_count,
  payload: r.payload,
  runId: r.run_id,
  checkpoint: r.checkpoint,
  traceParent: r.trace_parent,
});

/**
 * The grant half of {@link grantActions} as common table expressions, for
 * statements that claim in the same commit (see `settle-and-grant.ts`).
 * Expects `g_input (id, session_id, token, worker_id)` before it; the grants
 * are the rows of `g_granted` (a {@link GrantRow}). Same locking as
 * {@link grantActions}.
 */
export function grantCtes(now: SQL): SQL {
  return sql`
      -- The target sessions, locked; whether each is live is checked on the locked rows, in
      -- g_live. With \`ended_at is null\` here the planner may read the partial index of
      -- every live session (sessions_one_live_per_worker) instead of these few by key.
      g_sessions as (
        select s.id, s.ended_at from sessions s
        where s.id in (select session_id from g_input)
          and s.stream_token in (select token from g_input)
        for share of s
      ),
      g_live as (select id from g_sessions where ended_at is null),
      g_granted as (
        update actions a set
          state = 'LEASED', epoch = a.epoch + 1, attempt_count = a.attempt_count + 1,
          -- A new attempt starts from nothing: no phase, details or stop request of the last one.
          phase = '', phase_details = null, stop_reason = null,
          session_id = i.session_id, worker_id = i.worker_id, granted_at = ${now}, updated_at = ${now}
        from g_input i join g_live on g_live.id = i.session_id
        -- Compared as an expression (\`state || ''\`), which no partial index's predicate
        -- matches: each claimed action is then found by primary key. As \`a.state = 'QUEUED'\`
        -- the planner may (its generic plan for one slot did) read the whole partial index of
        -- QUEUED actions to join it with the claim: a scan as long as the queue, every round.
        -- The same holds for the LEASED index of a session in the settle and progress statements.
        where a.id = i.id and a.state || '' = 'QUEUED'
        returning a.id, a.epoch, a.attempt_count, a.payload, a.run_id, a.checkpoint, a.cluster,
                  a.trace_parent, i.session_id, i.worker_id
      ),
      g_attempt_rows as (
        insert into attempts (action_id, epoch, worker_id, session_id, outcome, started_at)
        select id, epoch, worker_id, session_id, 'RUNNING', ${now} from g_granted
      ),
      g_grant_events as (
        insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message)
        select 'lease_granted', id, worker_id, cluster, session_id, epoch,
          'lease granted to worker ' || worker_id || ' (epoch ' || epoch || ', attempt ' || attempt_count || ')'
        from g_granted
      )`;
}
