import { sql } from "drizzle-orm";
import { OWN_NAME, otherListeners } from "../../work/cluster-bus.js";
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
 * The spread, in one statement. A server process is one that listens on the
 * cluster bus, told apart by its connections' `application_name` (unique per
 * process, see database.ts); undefined when this process's name is not one
 * of those (a URL that sets its own), since then processes cannot be told
 * apart. A process killed a moment ago still counts until PostgreSQL drops
 * its connection: the spread then looks more even than it is, never less.
 */
export async function readStreamSpread(db: Db, serverId: string): Promise<StreamSpread | undefined> {
  const [row] = await queryRows<{ own: string; mine: unknown; total: unknown; others: unknown }>(
    db,
    sql`select current_setting('application_name') as own,
          count(*) filter (where server_id = ${serverId} and stream_lost_at is null) as mine,
          count(*) as total,
          (select count(distinct application_name) from pg_stat_activity where ${otherListeners(false)}) as others
        from sessions
        where ended_at is null`,
  );
  if (!row || !OWN_NAME.test(row.own)) return undefined;
  return { mine: Number(row.mine), total: Number(row.total), servers: 1 + Number(row.others) };
}
