import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, retryOnConflict } from "../rows.js";

/**
 * SPEC rule 6, run once when a server process starts: every live session's
 * deadline becomes at least now + grace, so a control-plane restart never
 * causes an expiry. The extension is capped: a session not heard from for
 * longer than `maxSilenceMs` gets none (a crash-looping server cannot keep
 * sessions alive forever). Sessions nobody renewed for `staleMs` lost their
 * server with it: they are marked in grace. `staleMs` must comfortably exceed
 * the renewal lag of a healthy process, or a starting process would detach
 * the live streams of its peers.
 */
export async function extendSessionsOnStart(
  db: Db,
  clock: Clock,
  options: { graceMs: number; maxSilenceMs: number; staleMs: number },
): Promise<number> {
  // It locks every live session, in no particular order, while other processes renew theirs
  // in theirs: a deadlock is possible, and whichever statement PostgreSQL picks fails. Failing
  // here would stop the start, so it is tried again (the statement is idempotent).
  return retryOnConflict(START_ATTEMPTS, () => extendOnce(db, clock, options));
}

/** Tries of the start extension before a deadlock stops the start. */
const START_ATTEMPTS = 5;

async function extendOnce(
  db: Db,
  clock: Clock,
  options: { graceMs: number; maxSilenceMs: number; staleMs: number },
): Promise<number> {
  const now = clock.now();
  const ms = (value: number) => sql`make_interval(secs => ${value} / 1000.0)`;
  const [row] = await queryRows<{ n: unknown }>(
    db,
    sql`
      with extended as (
        update sessions set
          deadline = greatest(deadline, ${now} + ${ms(options.graceMs)}),
          stream_lost_at = case when last_heard_at < ${now} - ${ms(options.staleMs)}
                                then coalesce(stream_lost_at, ${now}) else stream_lost_at end,
          -- A stream found gone here was not ended on purpose (see schema.ts, stream_handed_over).
          stream_handed_over = stream_handed_over and stream_lost_at is not null,
          server_id = case when last_heard_at < ${now} - ${ms(options.staleMs)} then null else server_id end,
          stream_token = case when last_heard_at < ${now} - ${ms(options.staleMs)} then null else stream_token end
        where ended_at is null and last_heard_at > ${now} - ${ms(options.maxSilenceMs)}
        returning 1
      )
      select count(*) as n from extended`,
  );
  return Number(row?.n ?? 0);
}

/**
 * The restart extension after a database outage, run by each process's reaper
 * before its first reap once the database answers again: while it was gone
 * no process could renew, so every stored deadline is stale, and the first
 * reaper back would otherwise reap the sessions other processes host at
 * deadlines their workers' heartbeats had long moved (rule 7 covers only a
 * process's own sessions). Like a start (rule 6): every live session heard
 * within `maxSilenceMs` gets a deadline of at least now + grace; unlike a
 * start, no stream is marked lost (the processes hosting them are alive).
 * The silence is counted up to the last heartbeat any process recorded (the
 * latest `last_heard_at` of a live session), not up to now: no process could
 * record one during the outage, so its length is nobody's silence (an outage
 * longer than the maximum silence reaped every connected worker of the other
 * processes). Only this process's outage (the others kept renewing) leaves
 * that latest heartbeat at about now, and the cap as at a start. Writes only
 * the rows it moves, locking them as {@link extendAwaitedSessions} does.
 * Returns how many it extended.
 */
export function extendSessionsAfterOutage(
  db: Db,
  clock: Clock,
  options: { graceMs: number; maxSilenceMs: number },
): Promise<number> {
  return extendLiveSessions(db, clock, undefined, { ...options, afterOutage: true });
}

/**
 * The restart extension again, for the sessions a restarted process is still
 * taking back: live sessions not heard from since `since` (the moment this
 * process started; a session whose worker reconnected anywhere, or that a
 * live process renews, has been heard from since) get a deadline of at least
 * now + grace. Capped like the first extension: sessions silent for longer
 * than `maxSilenceMs` get none. Writes only the rows whose deadline is sooner
 * than now + grace. Returns how many it extended.
 */
export function extendAwaitedSessions(
  db: Db,
  clock: Clock,
  since: Date,
  options: { graceMs: number; maxSilenceMs: number },
): Promise<number> {
  return extendLiveSessions(db, clock, since, options);
}

/**
 * Live sessions heard within `maxSilenceMs` of now (`afterOutage`: of the
 * latest heartbeat recorded) and, with `heardBefore`, not since then, whose
 * deadline is sooner than now + grace get now + grace.
 *
 * Locking: `for update skip locked`. It runs while hellos and renewals lock
 * session rows in their own orders; waiting for them could deadlock (a first
 * version did, against a renewal). A row locked at that moment is being
 * resumed or renewed (it needs no extension) or reaped by another process
 * (whose own reaper extended first after the outage, or saw none); a
 * take-back round takes what it skipped in its next round.
 */
async function extendLiveSessions(
  db: Db,
  clock: Clock,
  heardBefore: Date | undefined,
  options: { graceMs: number; maxSilenceMs: number; afterOutage?: boolean },
): Promise<number> {
  const now = clock.now();
  const heardLast = options.afterOutage
    ? sql`least(${now}, coalesce((select max(last_heard_at) from sessions where ended_at is null), ${now}))`
    : now;
  const ms = (value: number) => sql`make_interval(secs => ${value} / 1000.0)`;
  const notSince =
    heardBefore === undefined ? sql`` : sql`and last_heard_at < ${heardBefore.toISOString()}::timestamptz`;
  const [row] = await queryRows<{ n: unknown }>(
    db,
    sql`
      with awaited as (
        select id from sessions
        where ended_at is null ${notSince}
          and last_heard_at > ${heardLast} - ${ms(options.maxSilenceMs)}
          and deadline < ${now} + ${ms(options.graceMs)}
        for update skip locked
      ),
      extended as (
        update sessions s set deadline = ${now} + ${ms(options.graceMs)}
        from awaited a where s.id = a.id
        returning 1
      )
      select count(*) as n from extended`,
  );
  return Number(row?.n ?? 0);
}
