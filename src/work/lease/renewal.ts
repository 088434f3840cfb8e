import type { Clock } from "../../store/clock.js";
import type { Db } from "../../store/database.js";
import type { KeepHosted } from "../../store/queries/reap-sessions.js";
import { type NotRenewed, renewSessions } from "../../store/queries/renew-sessions.js";
import {
  dbOffsetMs,
  type Hosted,
  type HostedSessions,
  persistDeadline,
  REAPED_MESSAGE,
  remainingMs,
  takenOverMessage,
} from "./hosted.js";

/** Most sessions one renewal statement carries; a tick renews every hosted stream in as many as it takes. */
export const RENEW_CHUNK = 2000;

/**
 * How long a renewal waits for one session's row (a grant holds it `for
 * share` for one statement) before it renews the others without it.
 */
export const RENEW_LOCK_WAIT_MS = 500;

/**
 * How near its stored deadline a stream must be, when its worker is heard,
 * for its new deadline to be stored out of turn ({@link Renewal.heard}): one
 * tick, which the next renewal may take to come, and half a tick more for
 * its lateness and its statement. In the steady state a heartbeat is heard
 * with the grace period less one interval left (at least two intervals: the
 * interval is at most a third of the grace period), and a report with at
 * least the grace period less two: only a worker heard again after most of a
 * grace period of silence comes this near, but at a grace period under 3.5
 * intervals a report now and then, or a heartbeat read while the tick that
 * renews it is in flight (its deadline still the tick before's): each shares
 * a statement with the others heard so meanwhile.
 */
export const renewSoonMs = (heartbeatIntervalMs: number): number => 1.5 * heartbeatIntervalMs;

/**
 * Session renewal: once per heartbeat interval, statements of up to
 * {@link RENEW_CHUNK} sessions store every hosted stream's deadline (last
 * heard + grace); a stream heard with its stored deadline about to pass is
 * renewed at once, out of turn. It owns what the reaper must know of it:
 * whether the renewals are being written.
 */
export interface Renewal {
  /**
   * Renews every hosted stream, heard from or not: the deadline only ever
   * becomes last heard + grace, so a silent stream gains nothing, and a
   * session that moved to another stream (even on another process) is
   * noticed within one tick and its stale stream ended (SESSION_ENDED).
   *
   * A renewal that took longer than an interval (a database stall) stored
   * deadlines already stale: it renews again at once. It waits at most
   * {@link RENEW_LOCK_WAIT_MS} (or a quarter interval) for a session row
   * another transaction holds (a grant holds one for a statement); past
   * that, it renews the others and leaves that session to the next tick.
   *
   * A renewal that succeeds after one failed, or after waiting longer than
   * an interval (a database outage, a stall), answers every stream's last
   * heartbeat again with the deadline it stored (`reack`): every ack sent
   * meanwhile only counted down, and a worker would otherwise learn of the
   * new deadline at its next heartbeat, up to an interval later, which is
   * an interval less of the outage it survives without self-fencing.
   *
   * Resolves `false` when no stream was hosted, so nothing was written: that
   * says nothing of whether the database works (see Loops.every); `true`
   * once the renewal is written.
   */
  renew(): Promise<boolean>;
  /**
   * SPEC rule 7: a process never reaps a session it hosts whose renewal it
   * failed to write. While the last renewal failed, or one has been running
   * for longer than a tick (a connection stuck after a database restart),
   * the deadlines of this process's streams in the database may be stale
   * though their workers kept heartbeating; the reap statement then leaves
   * the sessions of streams still open here alone. So it does, at any time,
   * the sessions of streams heard within the grace period whose new deadline
   * is owed (see {@link heard}): not stored yet, or not stored for want of
   * the database. Other processes still reap them at the stored deadline, as
   * they must if this process is dead: a process that cannot renew is
   * indistinguishable from one that died.
   */
  keepHosted(): KeepHosted | undefined;
  /**
   * The worker of `s` was just heard (`s.heardAt`: any message, a
   * heartbeat or a report). When its stored deadline is nearer than
   * {@link renewSoonMs} (its worker was silent for most of the grace
   * period), the next tick may come too late: reaped at the stale stored
   * deadline, the session would lose its leases within a grace period of
   * being heard (SPEC rule 1), and maybe a grant made meanwhile. Its deadline
   * is then stored at once, out of turn, in one statement with those of the
   * other streams heard so meanwhile, and its last heartbeat answered again
   * with it; until it is stored, no grant goes to the stream
   * (`HostedSessions.awaitRenewal`) and this process's reaper leaves its
   * session alone ({@link keepHosted}). In the steady state no stream comes
   * this near: a tick stays one statement (SPEC rule 7), and a heartbeat
   * costs a subtraction.
   */
  heard(s: Hosted): void;
  /**
   * Renews these streams now, out of turn (a closing process's handover).
   * It says nothing of the others' stored deadlines, so it changes neither
   * what {@link keepHosted} answers nor the tick's own renewal.
   */
  renewNow(streams: readonly Hosted[]): Promise<void>;
}

/** A session a tick left unrenewed because another transaction kept holding its row. */
export interface HeldSession {
  readonly sessionId: string;
  readonly workerId: string;
  /** Ticks in a row that skipped it, this one included. */
  readonly skips: number;
  /** Milliseconds left until its stored deadline, by the database clock. */
  readonly remainingMs: number;
  /**
   * Whether its deadline is at risk: skipped on two ticks in a row with its
   * stored deadline within two heartbeat intervals, or with it within one
   * already (the next tick may come too late). A single skip with a margin
   * of ticks left is renewed on the next tick and costs nothing.
   */
  readonly atRisk: boolean;
}

/** Ends a hosted stream whose session the renewal found no longer attached to it. */
function endStaleWith(hosted: HostedSessions) {
  return (s: Hosted, why: NotRenewed | undefined): void => {
    if (why === "taken over")
      hosted.end(s, "SESSION_TAKEN_OVER", takenOverMessage("seen by this process's renewal"));
    else if (why === "reaped") hosted.end(s, "SESSION_REAPED", REAPED_MESSAGE);
    else hosted.end(s, "SESSION_ENDED", "this session is no longer attached to this stream; reconnect");
  };
}

export function createRenewal(deps: {
  db: Db;
  clock: Clock;
  hosted: HostedSessions;
  graceMs: number;
  heartbeatIntervalMs: number;
  serverId: string;
  /**
   * Answers the stream's last heartbeat again, with the deadline just stored
   * (see {@link Renewal.renew}); none: nothing is answered again.
   */
  reack?: (s: Hosted) => void;
  /** Told of sessions a tick left unrenewed because another transaction kept holding their rows. */
  onHeld?: (held: readonly HeldSession[]) => void;
  /**
   * Told how every renewal ended, as it ends (before any ack it sends again):
   * the acks' `database_unreachable` follows it.
   */
  answered?: (ok: boolean) => void;
  /** Given each renewal statement as it is sent, to watch for one that never answers. */
  sent?: (statement: Promise<unknown>) => void;
  /** Told of an out-of-turn renewal that failed ({@link Renewal.heard}); the next tick renews its streams. */
  owedFailed?: (error: unknown, streams: number) => void;
}): Renewal {
  const { db, clock, hosted, graceMs } = deps;
  const soonMs = renewSoonMs(deps.heartbeatIntervalMs);
  // A wait longer than a quarter interval would delay the tick itself.
  const lockWaitMs = Math.min(RENEW_LOCK_WAIT_MS, Math.max(50, deps.heartbeatIntervalMs / 4));
  const endStale = endStaleWith(hosted);
  /** Streams whose session the last ticks skipped (busy), and how many ticks in a row. */
  const skipped = new WeakMap<Hosted, number>();
  let failed = false;
  /** performance.now() at the start of the renewal in flight. */
  let startedAt: number | undefined;
  /**
   * Streams heard with their stored deadline near (see {@link Renewal.heard})
   * whose new deadline is not stored yet, with the `heardAt` that found them
   * so: a renewal that counted their ages from then or later pays the debt.
   */
  const owed = new Map<Hosted, number>();
  /** Settles when the renewal statement in flight has (see renewChunked). */
  let inTurn: Promise<unknown> = Promise.resolve();
  /** Owed streams waiting for the next out-of-turn renewal. */
  let owedQueue: Hosted[] = [];
  /** Whether out-of-turn renewals run (one after another while streams are queued for them). */
  let owedFlushing = false;

  /** `s`'s deadline was stored, with ages counted to `atMs`: a debt it pays ends. */
  function stored(s: Hosted, atMs: number): void {
    const since = owed.get(s);
    if (since === undefined || since > atMs) return;
    owed.delete(s);
    hosted.renewed(s);
  }

  /** Renews the queued owed streams, in as many statements as they take, until none is queued. */
  async function flushOwed(): Promise<void> {
    while (owedQueue.length > 0) {
      const streams: Hosted[] = [];
      for (const s of owedQueue) {
        if (s.ended) owed.delete(s);
        else if (owed.has(s)) streams.push(s);
      }
      owedQueue = [];
      if (streams.length === 0) continue;
      try {
        await renewChunked(streams);
        deps.answered?.(true);
      } catch (error) {
        // The debts stand: the host's reaper keeps leaving the sessions alone (rule 7: this
        // process failed to write their renewal), no grant goes to them, and the next tick
        // renews them with every other stream.
        deps.answered?.(false);
        deps.owedFailed?.(error, streams.length);
        continue;
      }
      // The worker's last ack counted down to the stale deadline: it would self-fence before its
      // next heartbeat is answered.
      if (deps.reack) for (const s of streams) if (!s.ended && !owed.has(s)) deps.reack(s);
    }
  }

  /** Renews `streams` in statements of RENEW_CHUNK sessions, one after another. */
  async function renewChunked(streams: readonly Hosted[]): Promise<void> {
    // One after another: building, sending and reading one statement for 10,000 sessions held
    // the event loop for about 10 ms, and every heartbeat ack that came in meanwhile waited for it.
    for (let from = 0; from < streams.length; from += RENEW_CHUNK) {
      const chunk = streams.slice(from, from + RENEW_CHUNK);
      // One renewal statement at a time, the tick's and the out-of-turn ones alike: each locks its
      // sessions' rows in its own order, and two at once could wait on each other's rows until
      // their lock timeout. Ages counted at each statement: a later one must not gain the time
      // the earlier took.
      const statement = inTurn.then(() => {
        const sent = renewSessions(db, clock, graceMs, chunk, performance.now(), lockWaitMs);
        deps.sent?.(sent);
        return sent;
      });
      inTurn = statement.catch(() => {});
      const { deadlinesMs, dbNowMs, atMs, notRenewed } = await statement;
      const offsetMs = dbOffsetMs(dbNowMs, atMs);
      const held: HeldSession[] = [];
      const intervalMs = deps.heartbeatIntervalMs;
      chunk.forEach((s, i) => {
        const deadlineMs = deadlinesMs[i] as number;
        if (!Number.isNaN(deadlineMs)) {
          persistDeadline(s, deadlineMs, offsetMs);
          skipped.delete(s);
          if (owed.size > 0) stored(s, atMs);
        }
        // Its row was held by another transaction for longer than the wait: its stored deadline
        // stands, and the next tick tries again.
        else if (notRenewed.get(i) === "busy") {
          const skips = (skipped.get(s) ?? 0) + 1;
          skipped.set(s, skips);
          const left = remainingMs(s);
          held.push({
            sessionId: s.sessionId,
            workerId: s.workerId,
            skips,
            remainingMs: left,
            atRisk: left <= 2 * intervalMs && (skips >= 2 || left < intervalMs),
          });
        }
        // Taken over by a stream whose notice did not reach this process, reaped, or ended.
        else if (!s.ended) endStale(s, notRenewed.get(i));
      });
      if (held.length > 0) deps.onHeld?.(held);
    }
  }

  return {
    async renew() {
      // A tick that came due while the event loop was held (a long collection, a paused
      // process) runs before the loop reads its sockets again. It first lets the loop read the
      // heartbeats that waited there: counted from the last ones heard before the stall, the
      // deadlines would be stored an interval short, until the next tick.
      await new Promise((resolve) => setImmediate(resolve));
      const heard: Hosted[] = [];
      for (const s of hosted.values()) if (!s.ended) heard.push(s);
      if (heard.length === 0) return false;
      const now = performance.now();
      startedAt = now;
      try {
        await renewChunked(heard);
        deps.answered?.(true);
        const slow = performance.now() - now > deps.heartbeatIntervalMs;
        // The deadlines it stored count from heartbeats heard before it started: after a stall
        // they are stale already, and other processes would reap these sessions at them before
        // the next tick. Renewed again at once, from the heartbeats heard meanwhile; this
        // process's own reaper still leaves them alone until then (keepHosted: stuck).
        if (slow) await renewChunked(heard.filter((s) => !s.ended));
        const late = failed || slow;
        failed = false;
        if (late && deps.reack) for (const s of heard) if (!s.ended) deps.reack(s);
        return true;
      } catch (error) {
        failed = true;
        deps.answered?.(false);
        throw error;
      } finally {
        if (startedAt === now) startedAt = undefined;
      }
    },
    async renewNow(streams) {
      try {
        await renewChunked(streams.filter((s) => !s.ended));
        deps.answered?.(true);
      } catch (error) {
        deps.answered?.(false);
        throw error;
      }
    },
    keepHosted() {
      const now = performance.now();
      const stuck = startedAt !== undefined && now - startedAt > deps.heartbeatIntervalMs;
      const streamTokens: string[] = [];
      if (failed || stuck) {
        for (const s of hosted.values()) if (!s.ended) streamTokens.push(s.streamToken);
      } else {
        for (const s of owed.keys()) {
          if (s.ended) owed.delete(s);
          // Heard within the grace period: its deadline (rule 1) has not passed.
          else if (now - s.heardAt < graceMs) streamTokens.push(s.streamToken);
        }
      }
      return streamTokens.length > 0 ? { serverId: deps.serverId, streamTokens } : undefined;
    },
    heard(s) {
      // The steady state ends here: one subtraction, no clock read (heardAt is now).
      if (s.deadlineMs - (s.heardAt + s.dbOffsetMs) > soonMs || s.ended || owed.has(s)) return;
      owed.set(s, s.heardAt);
      hosted.awaitRenewal(s);
      owedQueue.push(s);
      // Streams heard in the same turn, or while a renewal of owed streams runs, share the next.
      if (owedFlushing) return;
      owedFlushing = true;
      setImmediate(() => {
        void flushOwed().finally(() => {
          owedFlushing = false;
        });
      });
    },
  };
}
