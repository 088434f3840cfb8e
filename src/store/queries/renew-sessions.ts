import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { driverError, queryRows } from "../rows.js";

/** SQLSTATE of a lock wait that passed `lock_timeout`. */
const LOCK_NOT_AVAILABLE = "55P03";

/** One hosted session: its stream's token, and when it was last heard (`performance.now()` then). */
export interface Heard {
  readonly sessionId: string;
  readonly streamToken: string;
  readonly heardAt: number;
}

/**
 * Why a session was not renewed: "busy" (another transaction held its row:
 * left for the next renewal, the stream kept), or its stream must close.
 */
export type NotRenewed = "busy" | "taken over" | "reaped" | "ended";

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
   * The `performance.now()` the ages of the sessions were counted to: `nowMs`,
   * or a later one if the statement ran again after a lock wait.
   */
  readonly atMs: number;
  /**
   * Why each session not renewed was not, by its index in `heard`: "busy"
   * (its row was locked by another transaction), "taken over" (another
   * stream holds it, or ended it with a goodbye), "reaped", or "ended" (no
   * longer attached to this stream, for another reason).
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
 * Locking: row locks on the renewed sessions only (the `no key update` lock
 * the update takes anyway). With `lockWaitMs`, a wait for one row that
 * lasts longer ends the statement, which runs again `skip locked`: a
 * session whose row another transaction keeps holding is not renewed
 * ("busy"), and the others are. Waiting for it held the whole statement,
 * with the rows it had
 * already locked, so every other session of the process stopped being
 * renewed, and the grants and reports that lock them waited too, until
 * other processes reaped healthy sessions at their stale deadlines.
 * Conditional on the session being live and still attached to this very
 * stream (its token): a session not renewed for another reason was reaped or
 * taken over (here or on another process), and its stream must close. Why
 * (taken over by another stream, reaped, ended) is read by a second
 * statement, only when there are such sessions.
 */
export async function renewSessions(
  db: Db,
  clock: Clock,
  graceMs: number,
  heard: readonly Heard[],
  /** `performance.now()` at the statement, which the times last heard are counted back from. */
  nowMs: number,
  /**
   * How long it may wait for one session's row; past it, the sessions whose
   * rows are held are left out ("busy") and the rest renewed. 0: it never
   * waits (`skip locked`); unset: it waits as long as it takes.
   */
  lockWaitMs?: number,
): Promise<Renewed> {
  if (lockWaitMs !== undefined && lockWaitMs > 0 && heard.length > 0) {
    try {
      return await db.transaction(async (t) => {
        const tx = t as unknown as Db;
        await tx.execute(sql`select set_config('lock_timeout', ${`${Math.round(lockWaitMs)}ms`}, true)`);
        return renewSessions(tx, clock, graceMs, heard, nowMs);
      });
    } catch (error) {
      if (driverError(error)?.code !== LOCK_NOT_AVAILABLE) throw error;
      // Ages counted afresh: the database's now() of this statement is that much later.
      return renewSessions(db, clock, graceMs, heard, performance.now(), 0);
    }
  }
  /** Milliseconds since each was last heard, then its deadline. */
  const deadlinesMs = new Float64Array(heard.length);
  const notRenewed = new Map<number, NotRenewed>();
  if (heard.length === 0) return { deadlinesMs, dbNowMs: Number.NaN, atMs: nowMs, notRenewed };
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
    busy: string | null;
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
      locked as (
        select i.n, i.id, i.heard, i.due from input i join sessions s on s.id = i.id
        where s.ended_at is null and s.stream_token = i.token
        for no key update of s ${lockWaitMs === 0 ? sql`skip locked` : sql``}
      ),
      renewed as (
        update sessions s set
          last_heard_at = greatest(s.last_heard_at, l.heard),
          deadline = greatest(s.deadline, l.due)
        from locked l
        where s.id = l.id
        returning l.n, l.due, s.deadline
      ),
      -- Live and attached in this statement's snapshot, but held by another transaction. Looked up
      -- only for the sessions not renewed: almost always none.
      busy as (
        select i.n from input i
        where i.n not in (select n from locked)
          and exists (select 1 from sessions s where s.id = i.id and s.ended_at is null and s.stream_token = i.token)
      )
      -- The intervals are whole milliseconds: floored to the millisecond, a deadline stored as
      -- now + grace - ago is exactly db_now_ms + grace - ago.
      select
        floor(extract(epoch from ${now}) * 1000)::float8 as db_now_ms,
        (select string_agg((n - 1)::text || ':' || floor(extract(epoch from deadline) * 1000)::bigint::text, ',')
           from renewed where deadline <> due) as later,
        (select string_agg((n - 1)::text, ',')
           from (select n from input except select n from renewed except select n from busy) gone) as missing,
        (select string_agg((n - 1)::text, ',') from busy) as busy`,
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
  for (const index of row.busy ? row.busy.split(",").map(Number) : []) {
    deadlinesMs[index] = Number.NaN;
    notRenewed.set(index, "busy");
  }
  const missing = row.missing ? row.missing.split(",").map(Number) : [];
  for (const index of missing) deadlinesMs[index] = Number.NaN;
  if (missing.length > 0) {
    // Why, read in a statement of its own: this one's snapshot predates a reap or takeover that
    // the update waited for, and would show those sessions as they were. Rare: a stream whose
    // session moved on or ended.
    const ids = missing.map((i) => (heard[i] as Heard).sessionId);
    const rows = await queryRows<{ id: string; why: string }>(
      db,
      sql`select id, case
                when ended_at is null and stream_token is not null then 'taken over'
                when end_reason = 'goodbye' then 'taken over'
                when end_reason = 'reaped' then 'reaped'
                else 'ended' end as why
          from sessions where id in (select jsonb_array_elements_text(${JSON.stringify(ids)}::jsonb))`,
    );
    const why = new Map(rows.map((r) => [r.id, r.why as NotRenewed]));
    for (const index of missing) notRenewed.set(index, why.get((heard[index] as Heard).sessionId) ?? "ended");
  }
  return { deadlinesMs, dbNowMs, atMs: nowMs, notRenewed };
}
