import type { Db } from "../../store/database.js";
import { auditLeases, type HeldLease } from "../../store/queries/audit-leases.js";
import type { LeaseToken, RevokeReason } from "../worker-messages.js";
import type { Hosted, HostedSessions } from "./hosted.js";

/** Most leases one audit round checks (see {@link createAudit}). */
export const AUDIT_LEASES_PER_ROUND = 4096;

/**
 * The catch-up for notices lost between processes (a NOTIFY that failed,
 * a listener reconnecting, a process dying between its commit and its
 * notice): one statement compares the leases this process's streams hold
 * with the database, then tells the streams about leases that ended
 * elsewhere, stops still pending, and drains begun or ended. Returns one
 * audit round.
 *
 * A round checks up to {@link AUDIT_LEASES_PER_ROUND} leases (whole
 * sessions, at least one; a session holding none counts as one), those
 * checked least recently first, and only a round that got its answer counts:
 * a process holding 100,000 leases checks each one about every 25 rounds,
 * rather than sending all of them to the database every second (which took
 * 0.27 s of PostgreSQL's CPU a round, while thousands of workers reconnected).
 */
export function createAudit(deps: {
  db: Db;
  hosted: HostedSessions;
  /** Sends a revoke to the hosted stream holding `token`; `ended`: the lease is over, free its slot. */
  revoke: (
    sessionId: string,
    token: LeaseToken,
    reason: RevokeReason,
    message: string,
    ended: boolean,
  ) => void;
  /**
   * Whether a report of the action is being applied in this process: a completion that
   * committed while the audit's statement ran shows the action ended, though its answer (which
   * lets the lease go here) has not come yet. That is no lease ended elsewhere.
   */
  reporting: (actionId: string) => boolean;
}): () => Promise<void> {
  const { db, hosted, revoke, reporting } = deps;
  /** The round that last checked each session; a session never checked goes first. */
  const checkedIn = new WeakMap<Hosted, number>();
  let round = 0;

  /**
   * The live sessions, least recently checked first, and among those checked in the same
   * round in the order of `hosted` (so sessions that come and go between rounds never push
   * others back). Grouped by round in one pass: sorting 10,000 sessions every second
   * took a few milliseconds of the event loop that heartbeat acks wait behind.
   */
  function* leastRecentlyChecked(): Generator<Hosted> {
    const byRound = new Map<number, Hosted[]>();
    for (const s of hosted.values()) {
      if (s.ended) continue;
      const r = checkedIn.get(s) ?? 0;
      const group = byRound.get(r);
      if (group) group.push(s);
      else byRound.set(r, [s]);
    }
    for (const r of [...byRound.keys()].sort((a, b) => a - b)) yield* byRound.get(r) as Hosted[];
  }

  return async () => {
    round += 1;
    const held: HeldLease[] = [];
    const workers = new Set<string>();
    const slice: Hosted[] = [];
    // A session holding nothing counts as one lease: its worker's drain is checked too.
    let checked = 0;
    for (const s of leastRecentlyChecked()) {
      if (checked >= AUDIT_LEASES_PER_ROUND) break;
      checked += Math.max(1, s.held.size);
      slice.push(s);
      workers.add(s.workerId);
      for (const [actionId, epoch] of s.held) held.push({ sessionId: s.sessionId, actionId, epoch });
    }
    if (slice.length === 0) return;
    const drainChanges = new Map(slice.map((s) => [s, s.drainChanges]));
    const { notices, draining } = await auditLeases(db, held, [...workers]);
    // Only a round that answered counts: a failed one is checked again first.
    for (const s of slice) checkedIn.set(s, round);
    for (const n of notices) {
      const s = hosted.get(n.sessionId);
      const token = { actionId: n.actionId, epoch: n.epoch };
      if (!s || s.held.get(n.actionId) !== n.epoch) continue;
      if (n.notice === "ended" || n.notice === "expired") {
        if (reporting(n.actionId)) continue;
        // EXPIRED when the lease expired with its session (reaped by another process, while this
        // one could not renew it): the worker is told its lease expired, not that another
        // session or epoch owns the action (worker.proto, RevokeReason).
        if (n.notice === "expired")
          revoke(
            n.sessionId,
            token,
            "EXPIRED",
            `this lease expired with its session, which was reaped (the action is ${n.state})`,
            true,
          );
        else
          revoke(
            n.sessionId,
            token,
            "SUPERSEDED",
            `this lease ended on the server (the action is ${n.state})`,
            true,
          );
        continue;
      }
      const key = `${n.actionId}:${n.epoch}:${n.notice}`;
      if (s.noticed.has(key)) continue;
      s.noticed.add(key);
      if (n.notice === "cancel") revoke(n.sessionId, token, "CANCELLED", "action cancelled", false);
      else revoke(n.sessionId, token, "COLLECT_OUTPUTS", "save the outputs, then stop", false);
    }
    // Drains and undrains whose notice was lost: the database's word, unless the stream's drain
    // changed here while the statement ran (a newer notice, or this process's own call).
    const reasons = new Map(draining.map((d) => [d.workerId, d.reason]));
    for (const s of slice) {
      if (s.ended || s.drainChanges !== drainChanges.get(s)) continue;
      const reason = reasons.get(s.workerId);
      if (reason !== undefined && !s.draining) hosted.drain(s, reason);
      else if (reason === undefined && s.draining) hosted.undrain(s);
    }
  };
}
