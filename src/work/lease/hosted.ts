import { SpanKind } from "@opentelemetry/api";
import { Code, LeaseholdError } from "../../errors.js";
import type { GrantRecord } from "../../store/queries/claim-actions.js";
import { type Tracing, traceParentOf } from "../../telemetry.js";
import type { JsonObject } from "../action.js";
import type { LeaseToken, RevokeReason, WorkerLink } from "../worker-messages.js";

/**
 * How a stream whose session another stream took over ends (ErrorInfo reason
 * SESSION_TAKEN_OVER), with what the worker must do (worker.proto, Connect);
 * `seenBy` says how this process learned of it, if not by the takeover's notice.
 */
export const takenOverMessage = (seenBy?: string): string =>
  `a newer stream of this worker id took the session over${seenBy ? ` (${seenBy})` : ""}; ` +
  "if this process did not open it, another process uses the same worker id: " +
  "stop all work at once and connect again no sooner than one grace period later";
/** How a stream whose session passed its deadline ends (ErrorInfo reason SESSION_REAPED), with what the worker must do. */
export const REAPED_MESSAGE =
  "this session passed its deadline and was reaped: its leases expired and may run elsewhere; " +
  "stop their work at once, report nothing more of them and do not list them in the next hello (it opens a new session)";

/** What a Drain says: the operator's reason, or that the worker is being drained when none was given. */
export function drainReason(reason: string): string {
  return reason === "" ? "the worker is being drained" : reason;
}

/** One worker stream this process hosts, and the leases its session holds. */
export interface Hosted {
  readonly sessionId: string;
  /** The token of this stream on the session row; fences every write made for it. */
  readonly streamToken: string;
  readonly workerId: string;
  readonly cluster: string;
  /**
   * The principal whose hello opened the stream: the actor of its reports.
   * The stream belongs to one session and the session to this principal
   * (checked at the hello), so its reports need no check of their own.
   */
  readonly principal: string;
  readonly capacity: number;
  readonly labels: Readonly<Record<string, string>>;
  /** Cluster and labels as one string: streams with the same key can take the same actions. */
  readonly groupKey: string;
  readonly link: WorkerLink;
  /** Leases this stream holds: action id → epoch. Changed only through {@link HostedSessions}. */
  readonly held: Map<string, number>;
  /** Stop requests (cancel, collect) already sent, as action:epoch:kind, so an audit sends each once. */
  readonly noticed: Set<string>;
  /** The held leases of the last heartbeat (or of the hello): what the worker last said it works on. */
  lastHeld: readonly LeaseToken[];
  /**
   * Leases asked to stop (cancel, collect outputs) and not yet let go, by
   * action id; undefined while there are none, so heartbeats do no work for
   * them.
   */
  revoked: Map<string, RevokedLease> | undefined;
  /**
   * An operator drains the worker (ClusterService.DrainWorker): no grants, and a Drain was sent.
   * Changed only through {@link HostedSessions.drain} and {@link HostedSessions.undrain}.
   */
  draining: boolean;
  /**
   * How many times `draining` changed on this stream: the audit applies what the database said
   * of the drain only if no drain or undrain came in while its statement ran (that one is newer).
   */
  drainChanges: number;
  /** The worker itself takes no more grants on this stream (StopGrants, or Hello.stop_grants). */
  grantsStopped: boolean;
  /**
   * The worker was heard with the stored deadline about to pass, and its new
   * one is not stored yet (Renewal.heard): no grants, which the reap at the
   * stale deadline would take back. Changed only through
   * {@link HostedSessions.awaitRenewal} and {@link HostedSessions.renewed}.
   */
  awaitingRenewal: boolean;
  /**
   * Grants sent and not acknowledged yet, oldest first: action id → epoch, and when the first
   * and the last heartbeat of the run read since it came (performance.now(); see `grantWindow`,
   * and the stream's limit on how long heartbeats may keep coming without acknowledging one).
   */
  readonly unacked: Map<string, { readonly epoch: number; firstBeatAt?: number; lastBeatAt?: number }>;
  /** A claim passed this stream over for its full outbound buffer; `writable` lets it in again. */
  blocked: boolean;
  /** performance.now() of the last message from the worker. */
  heardAt: number;
  /**
   * The sequence of the last heartbeat received on this stream: a renewal
   * that succeeds after failing answers it again, with the time it stored.
   */
  lastBeat?: bigint;
  /** Reports received and not answered yet (see `maxUnansweredReports`). */
  unanswered: number;
  /** The JSON text those reports hold (progress details and checkpoints; see `MAX_UNANSWERED_CHARS`). */
  unansweredChars: number;
  /** Whether this stream is not read because of them (metric `worker_streams_held_back`). */
  heldBack: boolean;
  /** The persisted deadline (database clock, epoch ms) and the database clock's offset from ours. */
  deadlineMs: number;
  dbOffsetMs: number;
  ended: boolean;
}

/** A lease this stream was asked to stop, waiting for the worker to let go (SPEC rule 9). */
export interface RevokedLease {
  readonly epoch: number;
  readonly reason: RevokeReason;
  /**
   * The worker showed it has the lease: listed it in its last heartbeat (or
   * hello) before the revoke, or in a heartbeat or report since. Until then
   * a heartbeat without it proves nothing: it may have been composed before
   * the grant arrived. Needed after COLLECT_OUTPUTS only (see
   * Revokes.releaseOmitted).
   */
  known: boolean;
  /** A release for it is being committed. */
  releasing: boolean;
}

/** The grant as the stream receives it. */
export type Grant = Omit<GrantRecord, "sessionId" | "workerId" | "cluster">;

/**
 * The streams this process hosts, and which of them may have room for
 * another grant. Every change to a stream's leases goes through here, so the
 * set of streams with room stays exact enough that a claim looks only at
 * those (not at every stream: SPEC §6 has 10,000 streams per process).
 */
export interface HostedSessions {
  get(sessionId: string): Hosted | undefined;
  /** Every hosted stream, for the once-a-tick passes. */
  values(): IterableIterator<Hosted>;
  readonly size: number;
  add(s: Hosted): void;
  /** The stream ended (goodbye, lost, reaped, taken over): no more grants, reports or renewals. */
  remove(s: Hosted): void;
  /**
   * Ends a stream whose session this process no longer holds: removes it and
   * closes it with ABORTED and `reason` (an ErrorInfo reason the worker
   * reconnects on).
   */
  end(s: Hosted, reason: string, message: string): void;
  /**
   * Sends a grant and records the lease as held and unacknowledged. A grant
   * already held is not sent again. With tracing, a traced action's grant
   * gets a span (a child of its submit span) whose context it carries.
   */
  sendGrant(s: Hosted, g: Grant): void;
  /** The W3C traceparent the grant of `actionId` carried to `s`, while `s` holds it. */
  traceOf(s: Hosted, actionId: string): string | undefined;
  /**
   * The lease (action, epoch) is no longer held by the stream: its slot is
   * free. `wake` false: the claim that would fill it is already under way
   * (the report that freed it was settled together with a claim).
   */
  letGo(s: Hosted, actionId: string, epoch: number, wake?: boolean): void;
  /** The worker has the grant (GrantAck, a report, or a heartbeat listing it). */
  acknowledged(s: Hosted, token: LeaseToken): void;
  /** The stream's outbound buffer fell under the high-water mark. */
  writable(s: Hosted): void;
  /** The session's stored deadline is about to pass and a renewal out of turn is owed: no grants until {@link renewed}. */
  awaitRenewal(s: Hosted): void;
  /** The owed renewal was stored: the stream takes grants again at once (a wake-up for the claimer). */
  renewed(s: Hosted): void;
  /** An operator drains the stream's worker: no grants from now on, and a Drain (again) with `reason`. */
  drain(s: Hosted, reason: string): void;
  /**
   * An operator ended the drain (ClusterService.UndrainWorker): the stream takes grants again at
   * once (a wake-up for the claimer). Nothing is sent: the next grant tells the worker.
   */
  undrain(s: Hosted): void;
  /**
   * How many more grants `s` may take now, counting `freeing` of its held
   * leases as already let go: free slots, within the grant window, none
   * while draining, after the worker stopped grants, while its outbound buffer is at the high-water mark,
   * or while a renewal of its deadline about to pass is owed.
   */
  room(s: Hosted, freeing?: number): number;
  /**
   * The streams that may have room, in the order they should be served
   * (longest waiting first within a group, the groups in turns), passing
   * over the groups `skipGroup` names. A stream found without room is
   * dropped from the set until something frees a slot of it.
   */
  roomy(skipGroup?: (groupKey: string) => boolean): IterableIterator<Hosted>;
  /** `s` was served: it goes to the back of the queue if it still has room. */
  served(s: Hosted): void;
  /** Called when a stream gains room (a wake-up for the claimer). */
  onRoom(fn: () => void): void;
}

export function createHostedSessions(limits: {
  grantWindow: number;
  grantHighWaterBytes: number;
  tracing: Tracing;
}): HostedSessions {
  const { grantWindow, grantHighWaterBytes, tracing } = limits;
  /** Held leases' grant span contexts, per stream: only traced actions, only while tracing. */
  const traces = new WeakMap<Hosted, Map<string, string>>();
  const byId = new Map<string, Hosted>();
  /**
   * Streams that may have room, by group (see {@link Hosted.groupKey}), so a
   * claim passes over a whole group whose queue it knows to be empty
   * without looking at each of its streams.
   */
  const withRoom = new Map<string, Set<Hosted>>();
  let roomListener = () => {};

  const mayHaveRoom = (s: Hosted, wake = true) => {
    if (s.ended) return;
    let group = withRoom.get(s.groupKey);
    if (!group) {
      group = new Set();
      withRoom.set(s.groupKey, group);
    }
    group.add(s);
    if (wake) roomListener();
  };
  const noRoom = (s: Hosted): boolean => {
    const group = withRoom.get(s.groupKey);
    if (!group?.delete(s)) return false;
    if (group.size === 0) withRoom.delete(s.groupKey);
    return true;
  };

  const remove = (s: Hosted) => {
    s.ended = true;
    noRoom(s);
    if (byId.get(s.sessionId) === s) byId.delete(s.sessionId);
  };

  const room = (s: Hosted, freeing = 0): number => {
    if (s.ended || s.draining || s.grantsStopped || s.awaitingRenewal) return 0;
    if (s.link.bufferedBytes() >= grantHighWaterBytes) {
      s.blocked = true;
      return 0;
    }
    return Math.min(s.capacity - s.held.size + freeing, grantWindow - s.unacked.size);
  };

  return {
    get: (id) => byId.get(id),
    values: () => byId.values(),
    get size() {
      return byId.size;
    },
    add(s) {
      byId.set(s.sessionId, s);
      mayHaveRoom(s);
    },
    remove,
    end(s, reason, message) {
      remove(s);
      s.link.close(new LeaseholdError(Code.Aborted, message, { reason }));
    },
    sendGrant(s, g) {
      if (s.held.get(g.actionId) === g.epoch) return;
      s.held.set(g.actionId, g.epoch);
      // Deleted first: a key set again keeps its old place, and the map is oldest first.
      s.unacked.delete(g.actionId);
      s.unacked.set(g.actionId, { epoch: g.epoch });
      let traceParent: string | undefined;
      if (tracing.enabled && g.traceParent) {
        const span = tracing.start(
          "leasehold.grant",
          g.traceParent,
          {
            "leasehold.action_id": g.actionId,
            "leasehold.epoch": g.epoch,
            "leasehold.attempt": g.attempt,
            "leasehold.worker_id": s.workerId,
            "leasehold.session_id": s.sessionId,
            "leasehold.cluster": s.cluster,
          },
          SpanKind.PRODUCER,
        );
        span.end();
        traceParent = traceParentOf(span);
        const held = traces.get(s) ?? new Map<string, string>();
        traces.set(s, held);
        held.set(g.actionId, traceParent);
      }
      s.link.send({
        type: "grant",
        actionId: g.actionId,
        epoch: g.epoch,
        attempt: g.attempt,
        payload: g.payload,
        runId: g.runId,
        checkpoint: g.checkpoint as JsonObject | null,
        traceParent,
      });
    },
    traceOf: (s, actionId) => traces.get(s)?.get(actionId),
    letGo(s, actionId, epoch, wake = true) {
      if (s.held.get(actionId) !== epoch) return;
      s.held.delete(actionId);
      traces.get(s)?.delete(actionId);
      // A lease that left `held` no longer waits for an ack.
      if (s.unacked.get(actionId)?.epoch === epoch) s.unacked.delete(actionId);
      mayHaveRoom(s, wake);
    },
    acknowledged(s, token) {
      if (s.unacked.get(token.actionId)?.epoch !== token.epoch) return;
      s.unacked.delete(token.actionId);
      if (s.unacked.size === grantWindow - 1) mayHaveRoom(s);
    },
    writable(s) {
      if (!s.blocked) return;
      s.blocked = false;
      mayHaveRoom(s);
    },
    awaitRenewal(s) {
      s.awaitingRenewal = true;
    },
    renewed(s) {
      if (!s.awaitingRenewal) return;
      s.awaitingRenewal = false;
      // A claim that found it waiting dropped it from the streams with room.
      mayHaveRoom(s);
    },
    drain(s, reason) {
      if (!s.draining) s.drainChanges += 1;
      s.draining = true;
      s.link.send({ type: "drain", reason: drainReason(reason) });
    },
    undrain(s) {
      if (!s.draining) return;
      s.draining = false;
      s.drainChanges += 1;
      // A claim that found the stream drained dropped it from the streams with room.
      mayHaveRoom(s);
    },
    room,
    *roomy(skipGroup) {
      for (const [key, group] of withRoom) {
        if (skipGroup?.(key)) continue;
        for (const s of group) {
          if (room(s) > 0) yield s;
          else group.delete(s);
        }
        if (group.size === 0) withRoom.delete(key);
      }
    },
    served(s) {
      if (!noRoom(s)) return;
      if (room(s) === 0) return;
      // To the back of its group, and the group to the back of the groups.
      mayHaveRoom(s, false);
      const group = withRoom.get(s.groupKey) as Set<Hosted>;
      withRoom.delete(s.groupKey);
      withRoom.set(s.groupKey, group);
    },
    onRoom(fn) {
      roomListener = fn;
    },
  };
}

/** Records the deadline the database stored for `s`, and the database clock's offset from ours. */
export function persistDeadline(s: Hosted, deadlineMs: number, dbOffsetMs: number): void {
  s.deadlineMs = deadlineMs;
  s.dbOffsetMs = dbOffsetMs;
}

/**
 * How far the database clock is ahead of this process's steady clock
 * (`performance.now()`), from the database's `now()` (`dbNowMs`) in a
 * statement this process sent at `sentAt`. `now()` was read somewhere
 * between the send and the answer: pairing it with the send puts the
 * database's time, as this process reckons it, never behind the real one,
 * however long the statement waited (a lock, a busy pool, a late event
 * loop), so an ack never promises more than the stored deadline gives.
 * Paired with the answer instead, a renewal that waited 20 s for a lock made
 * every ack promise 20 s too much: the agent kept working after another
 * process reaped its session and granted its actions again. Steady, not the
 * wall clock: the offset is kept until the session's next renewal, and a
 * wall clock that stepped back meanwhile would have done the same.
 */
export const dbOffsetMs = (dbNowMs: number, sentAt: number): number => dbNowMs - sentAt;

/** Milliseconds left until `s`'s stored deadline, by the database clock. */
export const remainingMs = (s: Hosted): number =>
  Math.max(0, Math.floor(s.deadlineMs - (performance.now() + s.dbOffsetMs)));
