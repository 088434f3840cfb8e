import type { Db } from "../../store/database.js";
import { auditLeases, type HeldLease } from "../../store/queries/audit-leases.js";
import type { LeaseToken, RevokeReason } from "../worker-messages.js";
import type { HostedSessions } from "./hosted.js";

/** Most leases one audit round checks (see {@link createAudit}). */
export const AUDIT_LEASES_PER_ROUND = 4096;

/**
 * The catch-up for notices lost between processes (a NOTIFY that failed,
 * a listener reconnecting, a process dying between its commit and its
 * notice): one statement compares the leases this process's streams hold
 * with the database, then tells the streams about leases that ended
 * elsewhere, stops still pending, and drains. Returns one audit round.
 *
 * A round checks up to {@link AUDIT_LEASES_PER_ROUND} leases (whole
 * sessions, at least one; a session holding none counts as one), going on from where the last round stopped: a
 * process holding 100,000 leases checks each one about every 25 rounds,
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
}): () => Promise<void> {
  const { db, hosted, revoke } = deps;
  /** Where the next round starts, in the order `hosted` lists its sessions. */
  let next = 0;
  return async () => {
    const live = [...hosted.values()].filter((s) => !s.ended);
    if (live.length === 0) return;
    const held: HeldLease[] = [];
    const workers = new Set<string>();
    const start = next % live.length;
    // A session holding nothing counts as one lease: its worker's drain is checked too.
    for (let k = 0, checked = 0; k < live.length && checked < AUDIT_LEASES_PER_ROUND; k++) {
      const s = live[(start + k) % live.length] as (typeof live)[number];
      checked += Math.max(1, s.held.size);
      workers.add(s.workerId);
      for (const [actionId, epoch] of s.held) held.push({ sessionId: s.sessionId, actionId, epoch });
      next = start + k + 1;
    }
    const { notices, draining } = await auditLeases(db, held, [...workers]);
    for (const n of notices) {
      const s = hosted.get(n.sessionId);
      const token = { actionId: n.actionId, epoch: n.epoch };
      if (!s || s.held.get(n.actionId) !== n.epoch) continue;
      if (n.notice === "ended") {
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
    if (draining.length === 0) return;
    const drained = new Set(draining);
    for (const s of hosted.values()) {
      if (drained.has(s.workerId) && !s.draining) {
        s.draining = true;
        s.link.send({ type: "drain", reason: "the worker is being drained" });
      }
    }
  };
}
