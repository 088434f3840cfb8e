import { sql } from "drizzle-orm";
import type { Db } from "../database.js";

/** A report that carried a stale lease. */
export interface FencedReport {
  readonly actionId: string;
  readonly epoch: number;
  readonly workerId: string;
  readonly sessionId: string;
  /** What was reported: completion, release, progress, grant acknowledgement. */
  readonly what: string;
  /** The principal of the reporting session: the event's actor. */
  readonly actor: string;
}

/**
 * Records `report_fenced` events. The fenced report itself changed nothing
 * (SPEC rule 4); this only makes it visible to operators. Rare path.
 */
export async function recordFencedReports(db: Db, reports: readonly FencedReport[]): Promise<void> {
  if (reports.length === 0) return;
  const input = JSON.stringify(
    reports.map((r) => ({
      action_id: r.actionId,
      epoch: r.epoch,
      worker_id: r.workerId,
      session_id: r.sessionId,
      actor: r.actor,
      message: `${r.what} from worker ${r.workerId} rejected: epoch ${r.epoch} is not the current lease`,
    })),
  );
  await db.execute(sql`
    insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, actor)
    select 'report_fenced', x.action_id, x.worker_id, w.cluster, x.session_id, x.epoch, x.message, x.actor
    from jsonb_to_recordset(${input}::jsonb)
      as x(action_id text, epoch bigint, worker_id text, session_id text, message text, actor text)
    left join workers w on w.worker_id = x.worker_id`);
}
