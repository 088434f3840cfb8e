import { sql } from "drizzle-orm";
import type { Db } from "../database.js";

/** A span of time in which one server process could not reach its database. */
export interface DatabaseOutage {
  readonly serverId: string;
  /** When the process found the database unreachable (its own clock). */
  readonly since: Date;
  /** When it reached it again (its own clock). */
  readonly until: Date;
  /** What the first failed check or renewal met. */
  readonly cause: string;
  /** Whether the database answered but refused writes (read-only), not that it did not answer. */
  readonly readOnly: boolean;
}

/**
 * Records a `database_unreachable` event once the process reaches its
 * database again: nothing could be written while it lasted, so the event
 * log would otherwise hold no trace of why heartbeat acks said
 * database_unreachable, reports were answered UNAVAILABLE and health said
 * NOT_SERVING. The times are the process's own: the database's clock was out
 * of reach for the start.
 */
export async function recordDatabaseOutage(db: Db, outage: DatabaseOutage): Promise<void> {
  const ms = Math.max(0, outage.until.getTime() - outage.since.getTime());
  const message =
    `server ${outage.serverId} could not reach its database ${outage.readOnly ? "for writes (read-only) " : ""}` +
    `for ${(ms / 1000).toFixed(1)} s, from ${outage.since.toISOString()} to ${outage.until.toISOString()} ` +
    `(NOT_SERVING, reports answered UNAVAILABLE, heartbeat acks saying database_unreachable): ${outage.cause}`;
  const details = JSON.stringify({
    server_id: outage.serverId,
    since: outage.since.toISOString(),
    until: outage.until.toISOString(),
    duration_ms: ms,
    read_only: outage.readOnly,
    cause: outage.cause,
  });
  await db.execute(
    sql`insert into events (kind, message, details) values ('database_unreachable', ${message}, ${details}::jsonb)`,
  );
}
