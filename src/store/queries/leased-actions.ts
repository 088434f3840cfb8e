import { sql } from "drizzle-orm";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";
import { type GrantRecord, type GrantRow, grantFromRow } from "./claim-actions.js";

/**
 * The actions LEASED to these sessions, as grants. Used after a statement
 * that claimed for these sessions failed with an unknown outcome: what it
 * did grant is found here (the caller skips the leases it knows of).
 */
export async function actionsLeasedTo(db: Db, sessionIds: readonly string[]): Promise<GrantRecord[]> {
  if (sessionIds.length === 0) return [];
  const rows = await queryRows<GrantRow>(
    db,
    sql`select id, session_id, worker_id, cluster, epoch, attempt_count, payload, run_id, checkpoint,
          trace_parent
        from actions
        where state = 'LEASED'
          and session_id in (select jsonb_array_elements_text(${JSON.stringify(sessionIds)}::jsonb))`,
  );
  return rows.map(grantFromRow);
}
