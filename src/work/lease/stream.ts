import type { Logger } from "pino";
import { Code, LeaseholdError } from "../../errors.js";
import type { Clock } from "../../store/clock.js";
import { type Db, isTransientConnectError } from "../../store/database.js";
import { endSession } from "../../store/queries/end-session.js";
import type { LostStream, StreamLoss } from "../../store/queries/mark-stream-lost.js";
import { driverError } from "../../store/rows.js";
import { type ChangeFeed, EVENTS_TOPIC } from "../change-feed.js";
import { type FailureLog, failureLog } from "../failure-log.js";
import type { LeaseToken, WorkerMessage } from "../worker-messages.js";
import type { Handover } from "./handover.js";
import { type Hosted, type HostedSessions, remainingMs } from "./hosted.js";
import type { Reports } from "./reports.js";
import type { Revokes } from "./revokes.js";

/** Revokes (SUPERSEDED) one heartbeat draws at most for listed leases that are not the session's. */
export const MAX_SUPERSEDED_PER_HEARTBEAT = 64;

/** A worker's open stream, as the rpc layer drives it. */
export interface SessionHandle {
  readonly sessionId: string;
  /**
   * Leases the session held when the stream opened: those the welcome
   * resumed and those sent again after it. More than twice the capacity when
   * the worker came back with a smaller capacity than they were granted under.
   */
  readonly heldAtOpen: number;
  /** Handles one message from the worker. Never throws; replies go through the link. */
  receive(message: WorkerMessage): void;
  /**
   * The worker sent something the rpc layer answered itself (a report it
   * refused as INVALID): any message counts as hearing from the worker.
   */
  heard(): void;
  /**
   * The stream ended. With a goodbye the session ended too; otherwise the
   * session enters grace. `answerFirst`: the worker ended its side (every
   * message it sent was received) or sent a message that ends the stream,
   * and the completions, releases and progress it sent before are answered
   * first, unless `signal` aborts (the worker cancels, the server stops); no
   * grant is sent meanwhile.
   */
  /** `endedBy`: the ErrorInfo reason when this server ended the stream itself (see LostStream.endedBy). */
  streamEnded(end: {
    answerFirst: boolean;
    signal: AbortSignal;
    rebalanced?: boolean;
    endedBy?: string;
  }): Promise<void>;
  /** The stream's outbound buffer fell under the grant high-water mark: grants may go on. */
  writable(): void;
}

/**
 * What one hosted stream's messages do, from the welcome to its end:
 * heartbeats are answered from memory (SPEC rule 7: the deadline is renewed
 * by the renewal loop, not per heartbeat), reports go to {@link Reports},
 * a goodbye ends the session, and a lost stream starts its grace.
 */
export function createStreamHandle(
  deps: {
    db: Db;
    clock: Clock;
    log: Logger;
    feed: ChangeFeed;
    hosted: HostedSessions;
    reports: Reports;
    revokes: Revokes;
    heartbeatAckSeconds: { observe(seconds: number): void };
    /** Whether this process cannot reach its database now: every ack says so (worker.proto). */
    databaseUnreachable: () => boolean;
    /** A closing process answers heartbeats through it (see handover.ts). */
    handover: Pick<Handover, "active" | "heartbeat" | "ended">;
    /** Wakes the watchers of these actions (and of the event feed). */
    publishActions: (ids: Iterable<string>) => void;
    /** Actions were re-queued: the dispatcher looks at the queue again. */
    queueChanged: () => void;
    /**
     * The worker of the stream was just heard (`heardAt`): a deadline about to pass is stored at
     * once (Renewal.heard), on a later turn than the ack the message may get.
     */
    heard: (s: Hosted) => void;
    /** Records a lost stream (group-committed with the others lost meanwhile: `markStreamsLost`). */
    markLost: (lost: LostStream) => Promise<StreamLoss | undefined>;
    /**
     * Listed leases a heartbeat drew a SUPERSEDED revoke for: looked at, off this path, for proof
     * that the database went back in time (lease/regressions.ts).
     */
    strays: (s: Hosted, stray: readonly LeaseToken[]) => void;
    /** The stream was lost: its session is due at `deadline` (database clock, ms). */
    streamLost: (deadlineMs: number, dbOffsetMs: number) => void;
    /**
     * How long a goodbye's session end or a lost stream's record that failed (the database lost,
     * a connection cut) is tried again, in ms (the maximum silence), and whether this process
     * stopped meanwhile.
     */
    endRetry: { readonly forMs: number; readonly stopped: () => boolean };
    /**
     * How long heartbeats may keep coming after a grant without acknowledging it, in ms (the
     * grace period by default): longer, and the stream reads nothing the server sends
     * (worker.proto, GrantAck).
     */
    grantAckLimitMs: number;
    /** The heartbeat interval, in ms: heartbeats further apart break a run (see endIfGrantsUnread). */
    heartbeatIntervalMs: number;
  },
  s: Hosted,
): SessionHandle {
  const { db, clock, log, feed, hosted, reports, revokes, publishActions } = deps;
  // Set on goodbye: the stream ends only after the session's end has committed, so the
  // worker's close returns with the session already over.
  let goodbye: Promise<void> | undefined;
  /**
   * A session's end on goodbye, or the record of its lost stream, tried again while it fails:
   * either is applied even when the database was lost meanwhile. A goodbye whose worker stopped
   * waiting for its answer would otherwise leave its leases to expire, each charged a system
   * retry; a lost stream left unrecorded would keep its session connected, and a restarted
   * worker refused as WORKER_ID_IN_USE, until a grace period after the database came back. Both
   * are conditional on the stream token, so a try after one that committed unseen changes nothing.
   */
  const untilApplied = async <T>(what: string, apply: () => Promise<T>): Promise<T> => {
    const started = performance.now();
    // Made at the first failure: most ends apply at once. The first failure is a warning, the
    // tries after it debug lines, and a success after them one info line (an outage of 10 s
    // wrote seven warnings for one stream).
    let failures: FailureLog | undefined;
    for (let attempt = 0; ; attempt++) {
      try {
        const applied = await apply();
        failures?.worked();
        return applied;
      } catch (error) {
        if (
          !endMayWorkLater(error) ||
          deps.endRetry.stopped() ||
          performance.now() - started >= deps.endRetry.forMs
        )
          throw error;
        failures ??= failureLog(log.child({ workerId: s.workerId, sessionId: s.sessionId }), {
          failed: `could not ${what}; trying again`,
          still: `could not ${what} yet; trying again`,
          again: `could ${what} after trying again`,
        });
        failures.failed(error);
        // Unreferenced: a process stopping meanwhile is not held up by the wait.
        await new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** attempt, 2000)).unref());
      }
    }
  };
  /**
   * Ends a stream whose heartbeats keep coming, for longer than the limit, without acknowledging
   * a grant sent before them: it reads nothing the server sends (a receive loop stuck while the
   * heartbeat loop runs, a peer that never reads), so its grants would stay leased, never run,
   * for as long as it heartbeats. Timed over a run of heartbeats read at most two intervals
   * apart, not from the grant: while this server does not read the stream (a throttled backlog
   * of reports, a stalled event loop) or the worker is paused, the run breaks, and the messages
   * held back come together afterwards, the acknowledgement among them.
   * Ended as lost: the session is in grace; a worker that comes back is sent again the grants its
   * hello does not list, and one that does not loses them at its deadline. A grant cancelled
   * before it was acknowledged waits for nothing: a heartbeat that leaves it out releases it
   * (Revokes.releaseOmitted), so it is passed over here while that release commits.
   */
  let endedUnread = false;
  const endIfGrantsUnread = () => {
    if (endedUnread || s.unacked.size === 0) return;
    let actionId: string | undefined;
    let oldest: { readonly epoch: number; firstBeatAt?: number; lastBeatAt?: number } | undefined;
    for (const [id, unacked] of s.unacked) {
      const revoked = s.revoked?.get(id);
      if (revoked?.reason === "CANCELLED" && revoked.epoch === unacked.epoch) continue;
      actionId = id;
      oldest = unacked;
      break;
    }
    if (actionId === undefined || oldest === undefined) return;
    const now = performance.now();
    if (
      oldest.firstBeatAt === undefined ||
      oldest.lastBeatAt === undefined ||
      now - oldest.lastBeatAt > 2 * deps.heartbeatIntervalMs
    ) {
      oldest.firstBeatAt = now;
    }
    oldest.lastBeatAt = now;
    const heartbeatingMs = now - oldest.firstBeatAt;
    if (heartbeatingMs <= deps.grantAckLimitMs) return;
    endedUnread = true;
    log.warn(
      {
        workerId: s.workerId,
        sessionId: s.sessionId,
        actionId,
        unacknowledged: s.unacked.size,
        heartbeatingMs,
      },
      "ending a stream that leaves its grants unacknowledged though it heartbeats: it reads nothing",
    );
    // Only a COLLECT_OUTPUTS revoke leaves a grant here (see above): its omission is no release.
    const cause =
      s.revoked?.get(actionId)?.epoch === oldest.epoch
        ? "this stream does not read what the server sends, or dropped a grant revoked (COLLECT_OUTPUTS) " +
          "before acknowledging it without the completion or release it needs"
        : "this stream does not read what the server sends";
    s.link.close(
      new LeaseholdError(
        Code.Unavailable,
        `the grant of action ${actionId} is not acknowledged (a GrantAck, a heartbeat listing it, or a report on ` +
          `it) though heartbeats kept coming for ${(heartbeatingMs / 1000).toFixed(1)} s after it: ${cause}. ` +
          "Reconnect; grants the hello does not list are sent again",
        {
          reason: "GRANTS_UNACKNOWLEDGED",
          metadata: { action_id: actionId, unacknowledged: String(s.unacked.size) },
        },
      ),
    );
  };
  return {
    sessionId: s.sessionId,
    heldAtOpen: s.held.size,
    receive(message) {
      if (s.ended) return;
      s.heardAt = performance.now();
      deps.heard(s);
      switch (message.type) {
        case "heartbeat": {
          const started = s.heardAt;
          s.lastBeat = message.sequence;
          if (deps.handover.active()) deps.handover.heartbeat(s, message.sequence);
          else {
            s.link.send({
              type: "heartbeat_ack",
              sequence: message.sequence,
              remainingMs: remainingMs(s),
              databaseUnreachable: deps.databaseUnreachable(),
            });
            deps.heartbeatAckSeconds.observe((performance.now() - started) / 1000);
          }
          let superseded = 0;
          let stray: LeaseToken[] | undefined;
          for (const token of message.held) {
            if (s.held.get(token.actionId) !== token.epoch) {
              // Bounded: a heartbeat listing 20,000 made-up leases drew 20,000 revokes, and a
              // batch of such heartbeats held the process for seconds. The rest wait for later ones.
              if (++superseded > MAX_SUPERSEDED_PER_HEARTBEAT) continue;
              stray ??= [];
              stray.push(token);
              s.link.send({
                type: "revoke",
                ...token,
                reason: "SUPERSEDED",
                message: `action ${token.actionId} epoch ${token.epoch} is not a lease of this session`,
              });
            } else if (s.unacked.size > 0) {
              // Listing a grant shows the worker has it, as a GrantAck does.
              hosted.acknowledged(s, token);
            }
          }
          if (stray) deps.strays(s, stray);
          s.lastHeld = message.held;
          if (s.revoked !== undefined) revokes.releaseOmitted(s, message.held);
          endIfGrantsUnread();
          return;
        }
        case "grant_ack": {
          const token = { actionId: message.actionId, epoch: message.epoch };
          if (s.revoked !== undefined) revokes.sawLease(s, token);
          if (s.held.get(token.actionId) === token.epoch) {
            hosted.acknowledged(s, token);
            reports.accept(s, message.reportId, token, "grant acknowledged");
          } else reports.fenced(s, message.reportId, token, "grant acknowledgement");
          return;
        }
        case "progress":
          if (s.revoked !== undefined) revokes.sawLease(s, message);
          hosted.acknowledged(s, message);
          return reports.progress(s, message);
        case "completion":
        case "release":
          hosted.acknowledged(s, message);
          return reports.finish(s, message);
        case "stop_grants":
          if (!s.grantsStopped) {
            s.grantsStopped = true;
            log.info(
              { workerId: s.workerId, sessionId: s.sessionId, reason: message.reason },
              "worker takes no more grants",
            );
          }
          return;
        case "goodbye":
          // No more grants; the reports sent before the goodbye are applied and answered first:
          // ended under them, the session would fence them unanswered, and finished work would
          // run again.
          hosted.remove(s);
          deps.handover.ended(s);
          goodbye = reports
            .answeredAll(s)
            .then(() =>
              untilApplied("end the session on goodbye", () =>
                endSession(db, clock, s.sessionId, s.streamToken, message.reason),
              ),
            )
            .then(
              ({ releasedActionIds }) => {
                log.info({ workerId: s.workerId, sessionId: s.sessionId }, "worker said goodbye");
                publishActions(releasedActionIds);
                deps.queueChanged();
                s.link.close();
              },
              (error: unknown) => {
                log.error({ err: error, sessionId: s.sessionId }, "could not end the session on goodbye");
                s.link.close(error instanceof Error ? error : undefined);
              },
            );
          return;
      }
    },
    heard() {
      if (s.ended) return;
      s.heardAt = performance.now();
      deps.heard(s);
    },
    writable() {
      hosted.writable(s);
    },
    async streamEnded(end) {
      if (goodbye) return goodbye;
      deps.handover.ended(s);
      if (s.ended) return;
      hosted.remove(s);
      // A worker that half-closes right after its last completion waits for its answer: without
      // one it would send the completion again on its next stream (answered as a repeat, or
      // FENCED if the session ended meanwhile), or treat the action as lost.
      if (end.answerFirst) await waitUnlessAborted(reports.answeredAll(s), end.signal);
      try {
        const rebalanced = end.rebalanced === true;
        const lost = await untilApplied("record a lost stream", () =>
          deps.markLost({
            sessionId: s.sessionId,
            streamToken: s.streamToken,
            agoMs: performance.now() - s.heardAt,
            rebalanced,
            ...(end.endedBy ? { endedBy: end.endedBy } : {}),
          }),
        );
        if (lost) {
          log.info(
            {
              workerId: s.workerId,
              cluster: s.cluster,
              sessionId: s.sessionId,
              deadline: lost.deadline,
              ...(rebalanced ? { reason: "REBALANCING" } : end.endedBy ? { reason: end.endedBy } : {}),
            },
            rebalanced
              ? "worker stream ended to rebalance (this server hosts more than its share); the worker reconnects elsewhere"
              : "worker stream lost",
          );
          feed.publish(EVENTS_TOPIC);
          deps.streamLost(lost.deadline.getTime(), lost.dbNow.getTime() - Date.now());
        }
      } catch (error) {
        // The deadline stands as last renewed; the reaper acts on it either way.
        log.warn(
          { err: error, workerId: s.workerId, sessionId: s.sessionId },
          "could not record a lost stream; its session stays connected until its deadline",
        );
      }
    },
  };
}

/**
 * Whether a session end that failed with `error` may work if tried again: the database lost or
 * refusing for now (a connection closed or reset, a shutdown or start, too many connections, a
 * read-only standby), a serialization failure, a deadlock or a cancelled statement. Anything
 * else (a bug in the statement) fails the same way every time: it is not retried.
 */
function endMayWorkLater(error: unknown): boolean {
  if (isTransientConnectError(error)) return true;
  const code = driverError(error)?.code;
  return code === "40001" || code === "40P01" || code === "57014";
}

/** `promise`, or undefined as soon as `signal` aborts. */
function waitUnlessAborted(promise: Promise<void>, signal: AbortSignal): Promise<void> {
  if (signal.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      signal.removeEventListener("abort", done);
      resolve();
    };
    signal.addEventListener("abort", done);
    void promise.then(done);
  });
}
