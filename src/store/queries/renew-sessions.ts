import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/** One hosted session: its stream's token, and when it was last heard (`performance.now()` then). */
export interface Heard {
  readonly sessionId: string;
  readonly streamToken: string;
  readonly heardAt: number;
}

/** Why a session was not renewed. */
export type NotRenewed = "taken over" | "reaped" | "ended";

/** What one renewal stored, in milliseconds since the epoch. */
export interface Renewed {
  /**
   * The persisted deadline of each session, by its index in the `heard`
   * argument; NaN for a session that was not renewed.
   */
  readonly deadlinesMs: Float64Array;
  /** The database time of the renewal; NaN for no sessions (no statement ran). */
  readonly dbNowMs: number;
  /**
   * Why each session not renewed was not, by its index in `heard`: "taken
   * over" (another stream holds it, or ended it with a goodbye), "reaped",
   * or "ended" (no longer attached to this stream, for another reason).
   */
  readonly notRenewed: ReadonlyMap<number, NotRenewed>;
}

/**
 * Renews the deadlines of `heard`, sessions whose streams this process
 * hosts, in ONE statement, whatever their number; each tick renews them all,
 * in chunks (lease/renewal.ts; SPEC rule 7: heartbeats are not writes).
 * deadline = last heard + grace, never moved backwards, so a silent stream
 * gains nothing.
 *
 * With 10,000 hosted streams this is the biggest task of the process's tick,
 * and heartbeat acks wait behind what it does on the event loop: the
 * sessions go as three comma-separated texts (ids and tokens are UUIDs), not
 * arrays the driver escapes element by element, and the answer is one row,
 * not one per session. It names only the exceptions: the sessions not
 * renewed, and those whose stored deadline was already later than last
 * heard + grace (a restart's extension); every other deadline is that sum.
 *
 * Locking: row locks on the renewed sessions only. Conditional on the session
 * being live and still attached to this very stream (its token): a session
 * not renewed was reaped or taken over (here or on another process), and its
 * stream must close. Those still live belong to another stream now
 * (taken over); the statement says which, read in its own snapshot.
 */
export async function renewSessions(
  db: Db,
  clock: Clock,
  graceMs: number,
  heard: readonly Heard[],
  /** `performance.now()` at the statement, which the times last heard are counted back from. */
  nowMs: number,
): Promise<Renewed> {
  /** Milliseconds since each was last heard, then its deadline. */
  const deadlinesMs = new Float64Array(heard.length);
  const notRenewed = new Map<number, NotRenewed>();
  if (heard.length === 0) return { deadlinesMs, dbNowMs: Number.NaN, notRenewed };
  let ids = "";
  let tokens = "";
  let agos = "";
  for (let i = 0; i < heard.length; i++) {
    const h = heard[i] as Heard;
    const ago = Math.max(0, Math.round(nowMs - h.heardAt));
    const sep = i === 0 ? "" : ",";
    ids += sep + h.sessionId;
    tokens += sep + h.streamToken;
    agos += sep + ago;
    deadlinesMs[i] = ago;
  }
  const now = clock.now();
  const [row] = await queryRows<{
    db_now_ms: unknown;
    later: string | null;
    missing: string | null;
  }>(
    db,
    sql`
      with input as (
        select x.id, x.token, x.n, h.heard, h.heard + ${graceMs}::bigint * interval '1 millisecond' as due
        from unnest(string_to_array(${ids}::text, ','), string_to_array(${tokens}::text, ','),
                    string_to_array(${agos}::text, ',')::bigint[])
          with ordinality as x(id, token, ago, n)
          cross join lateral (select ${now} - x.ago * interval '1 millisecond' as heard) h
      ),
      renewed as (
        update sessions s set
          last_heard_at = greatest(s.last_heard_at, i.heard),
          deadline = greatest(s.deadline, i.due)
        from input i
        where s.id = i.id and s.ended_at is null and s.stream_token = i.token
        returning i.n, i.due, s.deadline
      )
      -- The intervals are whole milliseconds: floored to the millisecond, a deadline stored as
      -- now + grace - ago is exactly db_now_ms + grace - ago.
      select
        floor(extract(epoch from ${now}) * 1000)::float8 as db_now_ms,
        (select string_agg((n - 1)::text || ':' || floor(extract(epoch from deadline) * 1000)::bigint::text, ',')
           from renewed where deadline <> due) as later,
        -- 't' marks a session another stream took (it holds it now, or ended it with a goodbye),
        -- 'r' one that was reaped.
        (select string_agg((gone.n - 1)::text || case
                  when s.ended_at is null and s.stream_token is not null then 't'
                  when s.end_reason = 'goodbye' then 't'
                  when s.end_reason = 'reaped' then 'r'
                  else '' end, ',')
           from (select n from input except select n from renewed) gone
           join input i on i.n = gone.n
           left join sessions s on s.id = i.id) as missing`,
    { prepared: true },
  );
  if (!row) throw new Error("renewSessions: the statement returned no row");
  const dbNowMs = Number(row.db_now_ms);
  for (let i = 0; i < deadlinesMs.length; i++)
    deadlinesMs[i] = dbNowMs + graceMs - (deadlinesMs[i] as number);
  for (const pair of row.later ? row.later.split(",") : []) {
    const colon = pair.indexOf(":");
    deadlinesMs[Number(pair.slice(0, colon))] = Number(pair.slice(colon + 1));
  }
  for (const entry of row.missing ? row.missing.split(",") : []) {
    const index = Number.parseInt(entry, 10);
    deadlinesMs[index] = Number.NaN;
    const mark = entry.at(-1);
    notRenewed.set(index, mark === "t" ? "taken over" : mark === "r" ? "reaped" : "ended");
  }
  return { deadlinesMs, dbNowMs, notRenewed };
}
