import type { Logger } from "pino";
import type { LeaseToken, RevokeReason } from "../worker-messages.js";
import type { Dispatcher } from "./dispatch.js";
import type { Hosted, HostedSessions } from "./hosted.js";

/**
 * Revokes sent to the streams this process hosts, and the leases a worker
 * lets go of by leaving them out of its heartbeat (SPEC rule 9).
 */
export interface Revokes {
  /**
   * Sends a revoke if this process hosts the stream holding the lease;
   * `ended`: the lease already ended on the server, so its slot is freed too.
   */
  revoke(sessionId: string, token: LeaseToken, reason: RevokeReason, message: string, ended: boolean): void;
  /** A report about a lease proves the worker has it (its grant arrived). */
  sawLease(s: Hosted, token: LeaseToken): void;
  /** A heartbeat's held leases: a revoked lease no longer listed is released. */
  releaseOmitted(s: Hosted, held: readonly LeaseToken[]): void;
}

export function createRevokes(deps: {
  log: Logger;
  hosted: HostedSessions;
  /** Settles a report in its action's turn (`Reports.settle`). */
  settle: Dispatcher["settle"];
  /** Wakes the watchers of these actions (and of the event feed). */
  publishActions: (ids: Iterable<string>) => void;
  /** Log every revoke sent at debug level. */
  debug?: boolean;
}): Revokes {
  const { log, hosted, settle, publishActions } = deps;

  /** Whether `held` lists the lease (action id, epoch). */
  function lists(held: readonly LeaseToken[], actionId: string, epoch: number): boolean {
    for (const l of held) if (l.actionId === actionId && l.epoch === epoch) return true;
    return false;
  }

  /** A report about a lease proves the worker has it (its grant arrived). */
  function sawLease(s: Hosted, token: LeaseToken): void {
    const r = s.revoked?.get(token.actionId);
    if (r && r.epoch === token.epoch) r.known = true;
  }

  /** Remembers a stop request sent to the holder, until the worker lets the lease go. */
  function trackRevoke(s: Hosted, token: LeaseToken, reason: RevokeReason): void {
    const prior = s.revoked?.get(token.actionId);
    if (prior && prior.epoch === token.epoch) return;
    s.revoked ??= new Map();
    s.revoked.set(token.actionId, {
      epoch: token.epoch,
      reason,
      // Listed in the last heartbeat (or the hello), or acknowledged: a GrantAck or a report
      // already showed the grant arrived.
      known:
        lists(s.lastHeld, token.actionId, token.epoch) ||
        (s.held.get(token.actionId) === token.epoch && s.unacked.get(token.actionId)?.epoch !== token.epoch),
      releasing: false,
    });
  }

  /**
   * SPEC rule 9: a revoked lease the worker no longer lists in its heartbeat's
   * held leases counts as released, exactly as if it had sent a ReleaseReport
   * (same group commit, fenced on action, epoch and session; a cancelled
   * action becomes CANCELLED). Only leases already asked to stop count. After
   * COLLECT_OUTPUTS, only once the worker showed it had the lease (see
   * {@link RevokedLease}): the release runs the deployment again elsewhere, so
   * a grant still on its way, left out of a heartbeat sent before it arrived,
   * must never be mistaken for one. After CANCELLED, any heartbeat read after
   * the revoke counts, even for a grant the worker never acknowledged (it may
   * have read the revoke and dropped both): the release ends the action
   * CANCELLED, which no epoch follows, and a worker that had not seen the grant
   * yet reads the revoke right after it, so what it then does with the grant
   * (stops it; its reports are answered as repeats of the release, and a
   * heartbeat listing it draws a SUPERSEDED revoke) ends the same way as had
   * it let go itself. A report the worker sent before this heartbeat is
   * applied first (in its action's turn, see Reports.settle), so a completion
   * that raced the revoke keeps its result. Runs only while the session has a
   * revoked lease pending.
   */
  function releaseOmitted(s: Hosted, held: readonly LeaseToken[]): void {
    const revoked = s.revoked;
    if (!revoked) return;
    for (const [actionId, r] of revoked) {
      if (s.held.get(actionId) !== r.epoch) {
        // Finished or ended some other way meanwhile.
        if (!r.releasing) revoked.delete(actionId);
        continue;
      }
      if (r.releasing) continue;
      if (lists(held, actionId, r.epoch)) {
        r.known = true;
        continue;
      }
      if (!r.known && r.reason !== "CANCELLED") continue;
      r.releasing = true;
      const token = { actionId, epoch: r.epoch };
      settle(
        s,
        {
          ...token,
          sessionId: s.sessionId,
          actor: s.principal,
          kind: "released",
          reason: `no longer listed in held_leases after a ${r.reason.toLowerCase()} revoke`,
        },
        // Not applied means the lease had already ended on the server: it is not held either way
        // (the dispatcher lets it go).
        (finished) => {
          if (revoked.get(actionId) === r) revoked.delete(actionId);
          if (s.revoked === revoked && revoked.size === 0) s.revoked = undefined;
          if (finished) publishActions([actionId]);
        },
        (error) => {
          // Tried again on the next heartbeat that still omits it.
          r.releasing = false;
          log.warn({ err: error, actionId }, "could not release a lease the worker let go of; will retry");
        },
      );
    }
    if (revoked.size === 0 && s.revoked === revoked) s.revoked = undefined;
  }

  /** Sends a revoke if this process hosts the stream holding the lease. */
  function revoke(
    sessionId: string,
    token: LeaseToken,
    reason: RevokeReason,
    message: string,
    ended: boolean,
  ): void {
    const s = hosted.get(sessionId);
    if (!s || s.held.get(token.actionId) !== token.epoch) return;
    if (ended) hosted.letGo(s, token.actionId, token.epoch);
    else if (reason === "CANCELLED" || reason === "COLLECT_OUTPUTS") {
      // The audit need not send it again.
      s.noticed.add(`${token.actionId}:${token.epoch}:${reason === "CANCELLED" ? "cancel" : "collect"}`);
      trackRevoke(s, token, reason);
    }
    if (deps.debug)
      log.debug(
        { ...token, reason, workerId: s.workerId, sessionId: s.sessionId },
        `revoke sent: ${message}`,
      );
    s.link.send({ type: "revoke", ...token, reason, message });
  }

  return { revoke, sawLease, releaseOmitted };
}
