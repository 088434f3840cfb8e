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
 * Session renewal: once per heartbeat interval, statements of up to
 * {@link RENEW_CHUNK} sessions store every hosted stream's deadline (last
 * heard + grace). It owns what the reaper must know of it: whether the
 * renewals are being written.
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
   * the sessions of streams still open here alone. Other processes still
   * reap them at the stored deadline, as they must if this process is dead:
   * a process that cannot renew is indistinguishable from one that died.
   */
  keepHosted(): KeepHosted | undefined;
  /**
   * Renews these streams now, out of turn (a closing process's handover).
   * It says nothing of the others' stored deadlines, so it changes neither
   * what {@link keepHosted} answers nor the tick's own renewal.
   */
  renewNow(streams: readonly Hosted[]): Promise<void>;
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
  onHeld?: (sessionIds: readonly string[]) => void;
  /**
   * Told how every renewal ended, as it ends (before any ack it sends again):
   * the acks' `database_unreachable` follows it.
   */
  answered?: (ok: boolean) => void;
  /** Given each renewal statement as it is sent, to watch for one that never answers. */
  sent?: (statement: Promise<unknown>) => void;
}): Renewal {
  const { db, clock, hosted, graceMs } = deps;
  // A wait longer than a quarter interval would delay the tick itself.
  const lockWaitMs = Math.min(RENEW_LOCK_WAIT_MS, Math.max(50, deps.heartbeatIntervalMs / 4));
  const endStale = endStaleWith(hosted);
  let failed = false;
  /** performance.now() at the start of the renewal in flight. */
  let startedAt: number | undefined;

  /** Renews `streams` in statements of RENEW_CHUNK sessions, one after another. */
  async function renewChunked(streams: readonly Hosted[]): Promise<void> {
    // One after another: building, sending and reading one statement for 10,000 sessions held
    // the event loop for about 10 ms, and every heartbeat ack that came in meanwhile waited for it.
    for (let from = 0; from < streams.length; from += RENEW_CHUNK) {
      const chunk = streams.slice(from, from + RENEW_CHUNK);
      // Ages counted at each statement: a later chunk must not gain the time the earlier took.
      const statement = renewSessions(db, clock, graceMs, chunk, performance.now(), lockWaitMs);
      deps.sent?.(statement);
      const { deadlinesMs, dbNowMs, atMs, notRenewed } = await statement;
      const offsetMs = dbOffsetMs(dbNowMs, atMs);
      const held: string[] = [];
      chunk.forEach((s, i) => {
        const deadlineMs = deadlinesMs[i] as number;
        if (!Number.isNaN(deadlineMs)) persistDeadline(s, deadlineMs, offsetMs);
        // Its row was held by another transaction for longer than the wait: its stored deadline
        // stands, and the next tick tries again.
        else if (notRenewed.get(i) === "busy") held.push(s.sessionId);
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
      const stuck = startedAt !== undefined && performance.now() - startedAt > deps.heartbeatIntervalMs;
      if (!failed && !stuck) return undefined;
      const streamTokens: string[] = [];
      for (const s of hosted.values()) if (!s.ended) streamTokens.push(s.streamToken);
      return streamTokens.length > 0 ? { serverId: deps.serverId, streamTokens } : undefined;
    },
  };
}
