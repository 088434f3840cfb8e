import { sql } from "drizzle-orm";
import type { Db } from "../database.js";
import { queryRows, toNumber } from "../rows.js";

/** A lease a hosted stream holds in memory. */
export interface HeldLease {
  readonly sessionId: string;
  readonly actionId: string;
  readonly epoch: number;
}

/** What the database says about a held lease that needs telling its holder. */
export interface LeaseNotice {
  readonly sessionId: string;
  readonly actionId: string;
  readonly epoch: number;
  /**
   * expired: the lease expired (its session was reaped: attempt LEASE_EXPIRED); ended: no longer
   * this session's lease otherwise; cancel / collect: a stop was asked and is still pending.
   */
  readonly notice: "expired" | "ended" | "cancel" | "collect";
  readonly state: string;
}

/**
 * The catch-up for lost notices between processes: compares the leases this
 * process's streams hold in memory with the database, and returns only the
 * ones a stream must hear about (ended elsewhere, a cancel or an outputs
 * request pending), plus the hosted workers that are draining (the others
 * are not: a drain ended elsewhere ends on their streams too). One
 * statement per audit round, a fallback: the notices themselves travel
 * over LISTEN/NOTIFY at once.
 */
export async function auditLeases(
  db: Db,
  held: readonly HeldLease[],
  workerIds: readonly string[],
): Promise<{ notices: LeaseNotice[]; draining: { workerId: string; reason: string }[] }> {
  const notices =
    held.length === 0
      ? []
      : await queryRows<{
          session_id: string;
          action_id: string;
          epoch: unknown;
          notice: LeaseNotice["notice"];
          state: string | null;
        }>(
          db,
          sql`
            with input as (
              select * from jsonb_to_recordset(${JSON.stringify(
                held.map((h) => ({ s: h.sessionId, a: h.actionId, e: h.epoch })),
              )}::jsonb) as x(s text, a text, e bigint)
            )
            select i.s as session_id, i.a as action_id, i.e as epoch, a.state,
              case
                when a.id is null or a.state <> 'LEASED' or a.session_id is distinct from i.s or a.epoch <> i.e
                  -- How the held epoch's attempt ended (by its primary key, for ended leases only):
                  -- expired with its session, or not.
                  then case when (select t.outcome from attempts t where t.action_id = i.a and t.epoch = i.e)
                                 = 'LEASE_EXPIRED' then 'expired' else 'ended' end
                when a.cancel_requested then 'cancel'
                else 'collect' end as notice
            from input i left join actions a on a.id = i.a
            where a.id is null or a.state <> 'LEASED' or a.session_id is distinct from i.s or a.epoch <> i.e
               or a.cancel_requested or a.stop_reason = 'COLLECT_OUTPUTS'`,
        );
  const draining =
    workerIds.length === 0
      ? []
      : await queryRows<{ worker_id: string; drain_reason: string }>(
          db,
          sql`select worker_id, drain_reason from workers where draining
              and worker_id in (select jsonb_array_elements_text(${JSON.stringify(workerIds)}::jsonb))`,
        );
  return {
    notices: notices.map((n) => ({
      sessionId: n.session_id,
      actionId: n.action_id,
      epoch: toNumber(n.epoch),
      notice: n.notice,
      state: n.state ?? "gone",
    })),
    draining: draining.map((d) => ({ workerId: d.worker_id, reason: d.drain_reason })),
  };
}
