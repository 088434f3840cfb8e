import { sql } from "drizzle-orm";
import type { Db } from "../database.js";

/** How long after its death a killed process's row is deleted (by another process's mark). */
const FORGET_AFTER = "1 hour";

/**
 * Marks the server process `serverId` alive for the next `forMs`, by the
 * database's clock, with its connections' `application_name`, in one
 * statement (the spread counts it until then, while a connection of that
 * name is open: see stream-spread.ts); the same statement deletes the rows of processes dead
 * for an hour (a handful: one per process killed, not closed, in that hour).
 */
export async function markServerAlive(db: Db, serverId: string, forMs: number): Promise<void> {
  await db.execute(
    sql`with gone as (
          delete from server_processes
          where alive_until < now() - ${FORGET_AFTER}::interval and id <> ${serverId}
        )
        insert into server_processes (id, application_name, alive_until)
        values (${serverId}, current_setting('application_name'),
                now() + ${Math.round(forMs)}::bigint * interval '1 millisecond')
        on conflict (id) do update set
          application_name = excluded.application_name, alive_until = excluded.alive_until`,
  );
}

/** A process that closes stops counting at once. */
export async function forgetServer(db: Db, serverId: string): Promise<void> {
  await db.execute(sql`delete from server_processes where id = ${serverId}`);
}
