import type { Db } from "../database.js";
import { insertWorkerEvents, type WorkerEvent } from "./insert-worker-events.js";

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
  /**
   * The lease the report named (for a count, the first report's), with the
   * messages used when it is not one the worker ever held or not an action of
   * its cluster (see {@link WorkerEvent.named}): a worker may name any action
   * id, and the event is its cluster's.
   */
  readonly named: NonNullable<WorkerEvent["named"]>;
}

/**
 * Records `report_fenced` events, all of `reports` in one statement. The
 * fenced report itself changed nothing (SPEC rule 4); this only makes it
 * visible to operators. Rare path: reports.ts group-commits the rows and
 * bounds how many one stream gets.
 */
export async function recordFencedReports(db: Db, reports: readonly FencedReport[]): Promise<void> {
  await insertWorkerEvents(
    db,
    reports.map((r) => ({
      kind: "report_fenced",
      worker_id: r.workerId,
      cluster: null,
      session_id: r.sessionId,
      actor: r.actor,
      action_id: r.actionId ?? null,
      epoch: r.epoch ?? null,
      message: r.message,
      details: r.details ?? null,
      named: r.named,
    })),
  );
}
