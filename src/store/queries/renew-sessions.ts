import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toDate } from "../rows.js";

/** One session heard from since the last tick: `agoMs` before the statement runs. */
export interface Heard {
  readonly sessionId: string;
  readonly agoMs: number;
}

/** A renewed session's persisted deadline, with the database time of the renewal. */
export interface Renewed {
  readonly sessionId: string;
  readonly deadline: Date;
  readonly dbNow: Date;
}

/**
 * Renews the deadlines of every session this process heard from since the
 * last tick, in ONE statement (SPEC rule 7: heartbeats are not writes).
 * deadline = last heard + grace, never moved backwards.
 *
 * Locking: row locks on the renewed sessions only. Conditional on the session
 * being live and still hosted by this server: a session missing from the
 * result was reaped or taken over elsewhere, and its stream must close.
 */
export async function renewSessions(
  db: Db,
  clock: Clock,
  serverId: string,
  graceMs: number,
  heard: readonly Heard[],
): Promise<Renewed[]> {
  if (heard.length === 0) return [];
  const input = JSON.stringify(
    heard.map((h) => ({ id: h.sessionId, ago: Math.max(0, Math.round(h.agoMs)) })),
  );
  const now = clock.now();
  const rows = await queryRows<{ id: string; deadline: unknown; db_now: unknown }>(
    db,
    sql`
      with input as (select * from jsonb_to_recordset(${input}::jsonb) as x(id text, ago int))
      update sessions s set
        last_heard_at = greatest(s.last_heard_at, ${now} - make_interval(secs => i.ago / 1000.0)),
        deadline = greatest(s.deadline, ${now} - make_interval(secs => i.ago / 1000.0)
                                         + make_interval(secs => ${graceMs} / 1000.0))
      from input i
      where s.id = i.id and s.ended_at is null and s.server_id = ${serverId}
      returning s.id, s.deadline, ${now} as db_now`,
  );
  return rows.map((r) => ({ sessionId: r.id, deadline: toDate(r.deadline), dbNow: toDate(r.db_now) }));
}
