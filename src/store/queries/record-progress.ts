import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/**
 * A progress report: phase and optional details and checkpoint, as JSON text
 * (serialized when the report arrives: a queued report holds its text, not
 * the larger object graph, and is measured by it).
 */
export interface ProgressReport {
  readonly actionId: string;
  readonly epoch: number;
  readonly sessionId: string;
  readonly phase: string;
  readonly details?: string | undefined;
  readonly checkpoint?: string | undefined;
}

/**
 * Applies a batch of progress reports in one statement, fenced like
 * completions: only the current lease of the reporting session applies.
 * A report with a phase or details replaces the previous one's details.
 * Returns the indexes of the accepted reports in `reports`. Progress is frequent, so it
 * writes no event; WatchAction shows the phase.
 */
export async function recordProgress(
  db: Db,
  clock: Clock,
  reports: readonly ProgressReport[],
): Promise<number[]> {
  if (reports.length === 0) return [];
  const input = `[${reports
    .map(
      (r, k) =>
        `{"k":${k},"action_id":${JSON.stringify(r.actionId)},"epoch":${r.epoch},` +
        `"session_id":${JSON.stringify(r.sessionId)},"phase":${JSON.stringify(r.phase)},` +
        `"details":${r.details ?? "null"},"checkpoint":${r.checkpoint ?? "null"}}`,
    )
    .join(",")}]`;
  const rows = await queryRows<{ k: number }>(
    db,
    sql`
      with input as (
        select * from jsonb_to_recordset(${input}::jsonb) as x(
          k int, action_id text, epoch bigint, session_id text, phase text, details jsonb, checkpoint jsonb)
      ),
      -- Locked in id order, not the batch's (see the actions table, schema.ts): a cancel of many
      -- deployments locking the same rows in another order would deadlock with it.
      locked as (
        select a.id, i.k, i.phase, i.details, i.checkpoint from actions a join input i
        -- \`state || ''\`: by primary key, not the session's partial index (see grantCtes, claim-actions.ts).
          on a.id = i.action_id and a.epoch = i.epoch and a.session_id = i.session_id
            and a.state || '' = 'LEASED'
        order by a.id
        for update of a
      )
      update actions a set
        phase = case when l.phase <> '' then l.phase else a.phase end,
        phase_details = case when l.phase <> '' or l.details is not null then l.details else a.phase_details end,
        checkpoint = coalesce(l.checkpoint, a.checkpoint),
        updated_at = ${clock.now()}
      from locked l
      where a.id = l.id
      returning l.k`,
    { prepared: true },
  );
  return rows.map((r) => r.k);
}
