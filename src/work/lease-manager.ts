import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import { createBatcher } from "../store/batcher.js";
import type { Clock } from "../store/clock.js";
import type { Db } from "../store/database.js";
import { endSession } from "../store/queries/end-session.js";
import { extendSessionsOnStart } from "../store/queries/extend-sessions-on-start.js";
import { markStreamLost } from "../store/queries/mark-stream-lost.js";
import { type HelloInput, type OpenedSession, openSession } from "../store/queries/open-session.js";
import { type BatchOutcome, type HelloOfBatch, openSessions } from "../store/queries/open-sessions.js";
import { setWorkerDraining } from "../store/workers.js";
import { NO_TRACING, type Tracing } from "../telemetry.js";
import { actionTopic, type ChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "./change-feed.js";
import type { ClusterBus } from "./cluster-bus.js";
import { createGate } from "./gate.js";
import { createAudit } from "./lease/audit.js";
import { createDispatcher } from "./lease/dispatch.js";
import { createHostedSessions, type Hosted, persistDeadline, remainingMs } from "./lease/hosted.js";
import { createReaper } from "./lease/reaper.js";
import { createRenewal } from "./lease/renewal.js";
import { createReports } from "./lease/reports.js";
import type { LeaseToken, RevokeReason, WorkerLink, WorkerMessage } from "./worker-messages.js";

/** Counters the lease manager reports; prom-client's Counter and Histogram fit. */
export interface LeaseMetrics {
  readonly grants: { inc(n?: number): void };
  readonly expiries: { inc(n?: number): void };
  readonly fencedReports: { inc(n?: number): void };
  readonly heartbeatAckSeconds: { observe(seconds: number): void };
}

/** Options of {@link createLeaseManager}. */
export interface LeaseManagerOptions {
  /** Spans for grants and reports of traced actions; default none. */
  readonly tracing?: Tracing;
  readonly db: Db;
  readonly clock: Clock;
  readonly feed: ChangeFeed;
  readonly log: Logger;
  readonly metrics: LeaseMetrics;
  /** This process's id, written on the sessions it hosts. */
  readonly serverId: string;
  readonly gracePeriodMs: number;
  readonly heartbeatIntervalMs: number;
  /** Sessions silent longer than this get no restart extension (SPEC rule 6). Default 10 × grace. */
  readonly maxSilenceMs?: number;
  /** The mass-disconnect valve's share (SPEC rule 10); see `ServerConfig.partitionShare`. Default 0.5. */
  readonly partitionShare?: number;
  /** How often to look for queued actions nobody woke this process for. Default 1 s. */
  readonly dispatchPollMs?: number;
  /**
   * Most grants one stream may hold unacknowledged (no GrantAck, nor any
   * report on the lease, yet): a worker that stops reading or acknowledging
   * gets no more than this. Default {@link DEFAULT_GRANT_WINDOW}.
   */
  readonly grantWindow?: number;
  /**
   * No grants go to a stream while this many bytes or more wait in its
   * outbound buffer (its worker reads slowly or not at all); they go to
   * other workers. Default {@link DEFAULT_GRANT_HIGH_WATER_BYTES}.
   */
  readonly grantHighWaterBytes?: number;
  /**
   * The other processes sharing the database: revokes, drains and takeovers
   * for streams this process does not host go through it. Default: none.
   */
  readonly bus?: ClusterBus;
  /**
   * Run the renewal, reap and dispatch loops on timers. Default true; tests
   * with a fake clock turn it off and call `tick` themselves.
   */
  readonly timers?: boolean;
}

/** A worker's open stream, as the rpc layer drives it. */
export interface SessionHandle {
  readonly sessionId: string;
  /** Handles one message from the worker. Never throws; replies go through the link. */
  receive(message: WorkerMessage): void;
  /** The stream ended. With a goodbye the session ended too; otherwise the session enters grace. */
  streamEnded(): Promise<void>;
  /** The stream's outbound buffer fell under the grant high-water mark: grants may go on. */
  writable(): void;
}

/** Snapshot of what this process hosts, for metrics. */
export interface HostedStats {
  readonly connectedWorkers: number;
  readonly leasesHeld: number;
}

/** The work-lease protocol of one server process (SPEC §2). */
export interface LeaseManager extends AsyncDisposable {
  /**
   * Opens or resumes a session for a validated hello sent by `principal`
   * (the caller the rpc layer authenticated). A session this would resume or
   * take over that another principal opened is refused with PERMISSION_DENIED
   * (reason SESSION_OWNED_BY_OTHER) and left untouched, its stream included.
   */
  open(hello: HelloInput, link: WorkerLink, principal: string): Promise<SessionHandle>;
  /** Extends live sessions for the restart (rule 6) and starts the loops. */
  start(): Promise<void>;
  /** Stops the loops and flushes pending reports. Open streams are ended by the rpc server. */
  close(): Promise<void>;
  /** Sends a revoke to the session holding a lease, if this process hosts it. */
  revoke(sessionId: string, token: LeaseToken, reason: RevokeReason, message: string): void;
  /**
   * Tells the holder that a lease ended on the server (the action was
   * finished without it, e.g. its scope lease rolled back) and frees the slot.
   */
  ended(sessionId: string, token: LeaseToken, reason: RevokeReason, message: string): void;
  /**
   * Stops new grants to a worker and asks it to finish (ClusterService.DrainWorker);
   * `actor` is who asked, recorded on the event.
   */
  drain(workerId: string, reason: string, actor: string): Promise<boolean>;
  /**
   * When the reaper is due next (database clock): the earliest session
   * deadline this process knows of, or sooner for its fallback poll. With
   * timers on, one timer is armed for it. Undefined until the first reap or
   * lost stream when the loops are driven by hand.
   */
  nextReap(): Date | undefined;
  /**
   * The database failed to answer this process (a check of the database
   * watch): the reaper extends every live session before it reaps again, so
   * that an outage shorter than the grace period expires nothing.
   */
  databaseFailed(): void;
  /** One round of each loop, for tests that drive time by hand. */
  readonly tick: {
    renew(): Promise<void>;
    reap(): Promise<void>;
    audit(): Promise<void>;
    dispatch(): Promise<void>;
    /** Resolves once the claims and settlements already asked for are done (none is run). */
    settled(): Promise<void>;
  };
  stats(): HostedStats;
}

/** Hellos opened one transaction each at once, outside the batches (see `open` in the lease manager). */
const ALONE_AT_ONCE = 8;

/** Default of `LeaseManagerOptions.grantWindow`. */
export const DEFAULT_GRANT_WINDOW = 32;
/** Default of `LeaseManagerOptions.grantHighWaterBytes`: 1 MiB. */
export const DEFAULT_GRANT_HIGH_WATER_BYTES = 1024 * 1024;

export function createLeaseManager(options: LeaseManagerOptions): LeaseManager {
  const { db, clock, feed, log, metrics, serverId } = options;
  const graceMs = options.gracePeriodMs;
  const maxSilenceMs = options.maxSilenceMs ?? 10 * graceMs;
  const partitionShare = options.partitionShare ?? 0.5;
  const grantWindow = options.grantWindow ?? DEFAULT_GRANT_WINDOW;
  const grantHighWaterBytes = options.grantHighWaterBytes ?? DEFAULT_GRANT_HIGH_WATER_BYTES;
  const tracing = options.tracing ?? NO_TRACING;
  const hosted = createHostedSessions({ grantWindow, grantHighWaterBytes, tracing });
  const timers: NodeJS.Timeout[] = [];
  const timersOn = options.timers ?? true;
  const bus = options.bus;
  let closed = false;

  const publishActions = (ids: Iterable<string>) => {
    for (const id of ids) feed.publish(actionTopic(id));
    feed.publish(EVENTS_TOPIC);
  };

  const dispatcher = createDispatcher({
    db,
    clock,
    log,
    hosted,
    graceMs,
    granted(grants) {
      metrics.grants.inc(grants.length);
      publishActions(grants.map((g) => g.actionId));
    },
    stopped: () => closed,
  });
  const scheduleDispatch = () => dispatcher.wake();
  hosted.onRoom(() => dispatcher.wakeForRoom());
  const offQueue = feed.subscribe(QUEUE_TOPIC, scheduleDispatch);

  const reports = createReports({
    db,
    clock,
    log,
    feed,
    hosted,
    dispatcher,
    publishActions,
    fencedReports: metrics.fencedReports,
    tracing,
  });

  // ---- revoked leases let go by omission (SPEC rule 9) -------------------------------------------

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
      known: lists(s.lastHeld, token.actionId, token.epoch),
      releasing: false,
    });
  }

  /**
   * SPEC rule 9: a revoked lease the worker no longer lists in its heartbeat's
   * held leases counts as released, exactly as if it had sent a ReleaseReport
   * (same group commit, fenced on action, epoch and session; a cancelled
   * action becomes CANCELLED). Only leases already asked to stop count, and
   * only once the worker showed it had the lease (see {@link RevokedLease}):
   * a grant still on its way is never mistaken for a release. A report the
   * worker sent before this heartbeat is applied first (same batcher, in
   * order), so a completion that raced the revoke keeps its result. Runs only
   * while the session has a revoked lease pending.
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
      if (!r.known) continue;
      r.releasing = true;
      const token = { actionId, epoch: r.epoch };
      dispatcher.settle(
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

  // ---- sessions ------------------------------------------------------------------------------------

  const closeTakenOver = (s: Hosted) =>
    hosted.end(s, "SESSION_TAKEN_OVER", "a newer stream of this worker took the session over");

  /** One hello the common way, or the way of a batch that failed as a whole. */
  const openAlone = (b: HelloOfBatch) =>
    openSession(
      db,
      clock,
      serverId,
      { graceMs, partitionShare, maxSilenceMs },
      b.hello,
      b.principal,
      renewal.keepHosted(),
    );
  /**
   * Hellos a batch leaves alone, opened at most {@link ALONE_AT_ONCE} at a time
   * (each holds a pooled connection) and outside the batches, so that the
   * hellos a batch opened are answered at once and the next batch goes on.
   */
  const aloneGate = createGate(ALONE_AT_ONCE);
  const alone = async (b: HelloOfBatch): Promise<OpenedSession | Error> => {
    const release = await aloneGate.enter();
    try {
      return await openAlone(b);
    } catch (error) {
      return error as Error;
    } finally {
      release();
    }
  };
  /**
   * Hellos arriving while a batch is being opened are opened together in the
   * next (group commit, as for reports): thousands of workers reconnecting at
   * once cost a few transactions, not one each. A hello left alone resolves
   * with the promise of its own transaction.
   */
  type Opened = OpenedSession | Error;
  const opens = createBatcher<HelloOfBatch, Opened | Promise<Opened>>(async (batch) => {
    let outcomes: BatchOutcome[];
    try {
      outcomes = await openSessions(db, clock, serverId, graceMs, batch);
    } catch (error) {
      // A deadlock with another process or a race for a new worker's first session: each hello
      // goes alone, and fails alone if it must.
      if (batch.length === 1) throw error;
      log.warn({ err: error, hellos: batch.length }, "a batch of hellos failed; opening them one by one");
      outcomes = batch.map(() => ({ alone: true }));
    }
    return outcomes.map((outcome, i) => {
      if ("opened" in outcome) return outcome.opened;
      if ("refused" in outcome) return outcome.refused;
      return alone(batch[i] as HelloOfBatch);
    });
  });

  async function open(hello: HelloInput, link: WorkerLink, principal: string): Promise<SessionHandle> {
    if (closed) throw new LeaseholdError(Code.Unavailable, "the server is shutting down; reconnect");
    const opened = await opens.add({ hello, principal });
    if (opened instanceof Error) throw opened;
    // The worker's previous session expired with this hello: reported as the reaper reports.
    if (opened.reaped) void reaper.report(opened.reaped);
    const previous = hosted.get(opened.sessionId);
    // Takeover (rule 8): the older stream is closed, here or on the process hosting it.
    if (previous) closeTakenOver(previous);
    else if (opened.tookOver)
      bus?.send({ kind: "takeover", sessionId: opened.sessionId, streamToken: opened.streamToken });
    const s: Hosted = {
      sessionId: opened.sessionId,
      streamToken: opened.streamToken,
      workerId: hello.workerId,
      cluster: hello.cluster,
      principal,
      capacity: hello.capacity,
      labels: hello.labels,
      groupKey: groupKeyOf(hello.cluster, hello.labels),
      link,
      held: new Map(),
      noticed: new Set(),
      lastHeld: hello.heldLeases,
      revoked: undefined,
      draining: opened.draining,
      unacked: new Map(),
      blocked: false,
      heardAt: performance.now(),
      deadlineMs: 0,
      dbOffsetMs: 0,
      ended: false,
    };
    persistDeadline(s, opened.deadline, opened.dbNow);
    for (const l of opened.resumedLeases) s.held.set(l.actionId, l.epoch);
    link.send({
      type: "welcome",
      sessionId: s.sessionId,
      heartbeatIntervalMs: options.heartbeatIntervalMs,
      gracePeriodMs: graceMs,
      resumed: opened.resumedLeases.map((l) => ({ actionId: l.actionId, epoch: l.epoch })),
      revoked: opened.revokedLeases,
      sessionResumed: opened.resumed,
      serverId,
    });
    // Grants the worker never received (it did not list them) are sent again, same epoch.
    for (const l of opened.unlistedLeases) hosted.sendGrant(s, l);
    hosted.add(s);
    for (const l of [...opened.resumedLeases, ...opened.unlistedLeases]) {
      const token = { actionId: l.actionId, epoch: l.epoch };
      if (l.cancelRequested) revokeHosted(s.sessionId, token, "CANCELLED", "action cancelled", false);
      else if (l.stopReason === "COLLECT_OUTPUTS")
        revokeHosted(s.sessionId, token, "COLLECT_OUTPUTS", "save the outputs, then stop", false);
    }
    if (s.draining) link.send({ type: "drain", reason: "the worker is being drained" });
    log.info(
      {
        workerId: s.workerId,
        cluster: s.cluster,
        sessionId: s.sessionId,
        resumed: opened.resumed,
        tookOver: opened.tookOver,
      },
      opened.resumed ? "worker session resumed" : "worker session started",
    );
    publishActions([...opened.resumedLeases, ...opened.revokedLeases].map((l) => l.actionId));
    // Room, not a queue change: an expired earlier session re-queues through reportReap.
    dispatcher.wakeForRoom();

    // Set on goodbye: the stream ends only after the session's end has committed, so the
    // worker's close returns with the session already over.
    let goodbye: Promise<void> | undefined;
    return {
      sessionId: s.sessionId,
      receive(message) {
        if (s.ended) return;
        s.heardAt = performance.now();
        switch (message.type) {
          case "heartbeat": {
            const started = s.heardAt;
            s.link.send({ type: "heartbeat_ack", sequence: message.sequence, remainingMs: remainingMs(s) });
            for (const token of message.held) {
              if (s.held.get(token.actionId) !== token.epoch) {
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
            s.lastHeld = message.held;
            if (s.revoked !== undefined) releaseOmitted(s, message.held);
            metrics.heartbeatAckSeconds.observe((performance.now() - started) / 1000);
            return;
          }
          case "grant_ack": {
            const token = { actionId: message.actionId, epoch: message.epoch };
            if (s.revoked !== undefined) sawLease(s, token);
            if (s.held.get(token.actionId) === token.epoch) {
              hosted.acknowledged(s, token);
              reports.accept(s, message.reportId, token, "grant acknowledged");
            } else reports.fenced(s, message.reportId, token, "grant acknowledgement");
            return;
          }
          case "progress":
            if (s.revoked !== undefined) sawLease(s, message);
            hosted.acknowledged(s, message);
            return reports.progress(s, message);
          case "completion":
          case "release":
            hosted.acknowledged(s, message);
            return reports.finish(s, message);
          case "goodbye":
            hosted.remove(s);
            goodbye = endSession(db, clock, s.sessionId, s.streamToken, message.reason).then(
              ({ releasedActionIds }) => {
                log.info({ workerId: s.workerId, sessionId: s.sessionId }, "worker said goodbye");
                publishActions(releasedActionIds);
                scheduleDispatch();
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
      writable() {
        hosted.writable(s);
      },
      async streamEnded() {
        if (goodbye) return goodbye;
        if (s.ended) return;
        hosted.remove(s);
        try {
          const lost = await markStreamLost(
            db,
            clock,
            s.streamToken,
            s.sessionId,
            performance.now() - s.heardAt,
            graceMs,
          );
          if (lost) {
            log.info(
              { workerId: s.workerId, sessionId: s.sessionId, deadline: lost.deadline },
              "worker stream lost",
            );
            feed.publish(EVENTS_TOPIC);
            reaper.wakeAt(lost.deadline.getTime(), lost.dbNow.getTime() - Date.now());
          }
        } catch (error) {
          // The deadline stands as last renewed; the reaper acts on it either way.
          log.warn({ err: error, sessionId: s.sessionId }, "could not record a lost stream");
        }
      },
    };
  }

  // ---- loops ---------------------------------------------------------------------------------------

  const renewal = createRenewal({
    db,
    clock,
    hosted,
    graceMs,
    heartbeatIntervalMs: options.heartbeatIntervalMs,
    serverId,
  });
  const reaper = createReaper({
    db,
    clock,
    log,
    feed,
    hosted,
    graceMs,
    maxSilenceMs,
    partitionShare,
    timersOn,
    expiries: metrics.expiries,
    keepHosted: () => renewal.keepHosted(),
    publishActions,
  });
  const audit = createAudit({ db, hosted, revoke: (...args) => revokeHosted(...args) });
  /** A renewal; one that fails tells the reaper that the stored deadlines may be stale. */
  const renew = async () => {
    try {
      await renewal.renew();
    } catch (error) {
      reaper.databaseFailed();
      throw error;
    }
  };

  /**
   * Runs `fn` every `ms`, never overlapping itself. A failure is logged once
   * (not on every tick of a database outage), and so is the recovery.
   */
  function every(ms: number, name: string, fn: () => Promise<void>): void {
    let running = false;
    let failing = false;
    const timer = setInterval(() => {
      if (running || closed) return;
      running = true;
      fn()
        .then(
          () => {
            if (failing) log.info(`${name} works again`);
            failing = false;
          },
          (error: unknown) => {
            if (failing) log.debug({ err: error }, `${name} still failing`);
            else log.warn({ err: error }, `${name} failed; retrying on every tick`);
            failing = true;
          },
        )
        .finally(() => {
          running = false;
        });
    }, ms);
    timer.unref();
    timers.push(timer);
  }

  async function start(): Promise<void> {
    const extended = await extendSessionsOnStart(db, clock, {
      graceMs,
      maxSilenceMs,
      // Well above a healthy peer's renewal lag (up to two ticks), so a
      // starting process never detaches another process's live streams.
      staleMs: Math.max(4 * options.heartbeatIntervalMs, graceMs / 2),
    });
    if (extended > 0) log.info({ sessions: extended, graceMs }, "extended live sessions for the restart");
    if (timersOn) {
      every(options.heartbeatIntervalMs, "session renewal", renew);
      reaper.start();
      // A poll for actions queued by other processes or waiting out a retry backoff.
      every(options.dispatchPollMs ?? 1000, "dispatch poll", async () => scheduleDispatch());
      // Only notices from other processes can be lost; alone there is nothing to catch up on.
      if (bus) every(options.dispatchPollMs ?? 1000, "lease audit", audit);
    }
  }

  /** Sends a revoke if this process hosts the stream holding the lease. */
  function revokeHosted(
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
    s.link.send({ type: "revoke", ...token, reason, message });
  }

  function drainHosted(workerId: string, reason: string): void {
    for (const s of hosted.values()) {
      if (s.workerId === workerId) {
        s.draining = true;
        s.link.send({ type: "drain", reason });
      }
    }
  }

  // What other processes ask of the streams this one hosts.
  const offBus = bus?.subscribe((m) => {
    if (m.kind === "revoke") {
      revokeHosted(m.sessionId, { actionId: m.actionId, epoch: m.epoch }, m.reason, m.message, m.ended);
    } else if (m.kind === "drain") {
      drainHosted(m.workerId, m.reason);
    } else if (m.kind === "takeover") {
      const s = hosted.get(m.sessionId);
      // Tokens are UUIDv7, ordered by creation: a late notice never closes a newer stream.
      if (s && s.streamToken < m.streamToken) closeTakenOver(s);
    }
  });

  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      closed = true;
      offQueue();
      offBus?.();
      for (const t of timers) clearInterval(t);
      reaper.stop();
      await Promise.all([dispatcher.idle(), reports.close(), opens.close()]);
      // Record what this process heard last, so the sessions' grace counts from it.
      await renewal.renew().catch((error: unknown) => log.warn({ err: error }, "final renewal failed"));
    })();
    return closing;
  };

  return {
    open,
    start,
    close,
    [Symbol.asyncDispose]: close,
    // Sent here and to the other processes either way: this process may still
    // host a stream the session has already left for another process.
    revoke(sessionId, token, reason, message) {
      revokeHosted(sessionId, token, reason, message, false);
      bus?.send({ kind: "revoke", sessionId, ...token, reason, message, ended: false });
    },
    ended(sessionId, token, reason, message) {
      revokeHosted(sessionId, token, reason, message, true);
      bus?.send({ kind: "revoke", sessionId, ...token, reason, message, ended: true });
    },
    async drain(workerId, reason, actor) {
      const found = await setWorkerDraining(db, workerId, reason, actor);
      if (!found) return false;
      drainHosted(workerId, reason);
      bus?.send({ kind: "drain", workerId, reason });
      feed.publish(EVENTS_TOPIC);
      return true;
    },
    nextReap: () => reaper.next(),
    databaseFailed: () => reaper.databaseFailed(),
    tick: {
      renew,
      reap: () => reaper.reap(),
      audit,
      dispatch: async () => {
        scheduleDispatch();
        await dispatcher.idle();
      },
      settled: () => dispatcher.idle(),
    },
    stats() {
      let leasesHeld = 0;
      for (const s of hosted.values()) leasesHeld += s.held.size;
      return { connectedWorkers: hosted.size, leasesHeld };
    },
  };
}

/** Streams with the same key can take the same actions: same cluster, same labels. */
function groupKeyOf(cluster: string, labels: Readonly<Record<string, string>>): string {
  const keys = Object.keys(labels).sort();
  return JSON.stringify([cluster, ...keys.map((k) => [k, labels[k]])]);
}

/** Whether a worker's labels carry every selector label with the same value. */
export function matches(
  labels: Readonly<Record<string, string>>,
  selector: Readonly<Record<string, string>>,
): boolean {
  for (const key in selector) if (labels[key] !== selector[key]) return false;
  return true;
}
