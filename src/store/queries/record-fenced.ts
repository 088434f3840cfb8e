import { sql } from "drizzle-orm";
import type { Db } from "../database.js";

/** A report that carried a stale lease, or the count of a stream's fenced reports not recorded one by one. */
export interface FencedReport {
  /** The report's action; absent for a count of reports not recorded one by one. */
  readonly actionId?: string | undefined;
  readonly epoch?: number | undefined;
  readonly workerId: string;
  readonly sessionId: string;
  /** The event's message. */
  readonly message: string;
  /** The principal of the reporting session: the event's actor. */
  readonly actor: string;
  readonly details?: Record<string, unknown> | undefined;
}

/**
 * Records `report_fenced` events, all of `reports` in one statement. The
 * fenced report itself changed nothing (SPEC rule 4); this only makes it
 * visible to operators. Rare path: reports.ts group-commits the rows and
 * bounds how many one stream gets.
 */
export async function recordFencedReports(db: Db, reports: readonly FencedReport[]): Promise<void> {
  if (reports.length === 0) return;
  const input = JSON.stringify(
    reports.map((r) => ({
      action_id: r.actionId ?? null,
      epoch: r.epoch ?? null,
      worker_id: r.workerId,
      session_id: r.sessionId,
      actor: r.actor,
      message: r.message,
      details: r.details ?? null,
    })),
  );
  await db.execute(sql`
    insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, details, actor)
    select 'report_fenced', x.action_id, x.worker_id, w.cluster, x.session_id, x.epoch, x.message, x.details, x.actor
    from jsonb_to_recordset(${input}::jsonb)
      as x(action_id text, epoch bigint, worker_id text, session_id text, message text, details jsonb, actor text)
    left join workers w on w.worker_id = x.worker_id`);
}
