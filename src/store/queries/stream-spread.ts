import { sql } from "drizzle-orm";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/** How the worker sessions are spread over the server processes of one database. */
export interface StreamSpread {
  /** Open streams (of live sessions, not recorded lost) this process hosts. */
  readonly mine: number;
  /**
   * Live sessions of every process, those in grace included: most of them
   * are on their way to a process (moved, or their server gone), and a
   * share counted without them would move more than needed.
   */
  readonly total: number;
  /** Server processes on the database, this one included. */
  readonly servers: number;
}

/**
 * The spread, in one statement. The other server processes are those whose
 * liveness mark (server-liveness.ts, renewed every heartbeat interval) has
 * not run out, and which still have a connection open (by its
 * `application_name`): not a process that hangs (SIGSTOP, a frozen host)
 * with its connections open, where moved streams find no welcome, nor one
 * killed a moment ago, whose connections PostgreSQL dropped at once (one on
 * a vanished host stops counting when its mark runs out). Were the names
 * not unique (something overrides the one each process sets), a process
 * would only count a moment longer after it was killed.
 */
export async function readStreamSpread(db: Db, serverId: string): Promise<StreamSpread> {
  const [row] = await queryRows<{ mine: unknown; total: unknown; others: unknown }>(
    db,
    sql`select
          count(*) filter (where server_id = ${serverId} and stream_lost_at is null) as mine,
          count(*) as total,
          (select count(*) from server_processes p
           where p.id <> ${serverId} and p.alive_until > now()
             and exists (select 1 from pg_stat_activity a
                         where a.datname = current_database() and a.application_name = p.application_name)
          ) as others
        from sessions
        where ended_at is null`,
  );
  return {
    mine: Number(row?.mine ?? 0),
    total: Number(row?.total ?? 0),
    servers: 1 + Number(row?.others ?? 0),
  };
}
