import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toDate } from "../rows.js";

/** One hosted session: its stream's token, and when it was last heard (`agoMs` before the statement). */
export interface Heard {
  readonly sessionId: string;
  readonly streamToken: string;
  readonly agoMs: number;
}

/** A renewed session's persisted deadline, with the database time of the renewal. */
export interface Renewed {
  readonly sessionId: string;
  readonly deadline: Date;
  readonly dbNow: Date;
}

/**
 * Renews the deadlines of every session whose stream this process hosts, in
 * ONE statement per tick (SPEC rule 7: heartbeats are not writes).
 * deadline = last heard + grace, never moved backwards, so a silent stream
 * gains nothing.
 *
 * Locking: row locks on the renewed sessions only. Conditional on the session
 * being live and still attached to this very stream (its token): a session
 * missing from the result was reaped or taken over (here or on another
 * process), and its stream must close.
 */
export async function renewSessions(
  db: Db,
  clock: Clock,
  graceMs: number,
  heard: readonly Heard[],
): Promise<Renewed[]> {
  if (heard.length === 0) return [];
  const input = JSON.stringify(
    heard.map((h) => ({ id: h.sessionId, token: h.streamToken, ago: Math.max(0, Math.round(h.agoMs)) })),
  );
  const now = clock.now();
  const rows = await queryRows<{ id: string; deadline: unknown; db_now: unknown }>(
    db,
    sql`
      with input as (select * from jsonb_to_recordset(${input}::jsonb) as x(id text, token text, ago int))
      update sessions s set
        last_heard_at = greatest(s.last_heard_at, ${now} - make_interval(secs => i.ago / 1000.0)),
        deadline = greatest(s.deadline, ${now} - make_interval(secs => i.ago / 1000.0)
                                         + make_interval(secs => ${graceMs} / 1000.0))
      from input i
      where s.id = i.id and s.ended_at is null and s.stream_token = i.token
      returning s.id, s.deadline, ${now} as db_now`,
    { prepared: true },
  );
  return rows.map((r) => ({ sessionId: r.id, deadline: toDate(r.deadline), dbNow: toDate(r.db_now) }));
}
