import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import { createBatcher } from "../store/batcher.js";
import type { Clock } from "../store/clock.js";
import type { Db } from "../store/database.js";
import { checkOnce } from "../store/database-watch.js";
import { extendSessionsOnStart } from "../store/queries/extend-sessions-on-start.js";
import { FORGET_BATCH, forgetWorkers } from "../store/queries/forget-workers.js";
import { type LostStream, markStreamsLost, type StreamLoss } from "../store/queries/mark-stream-lost.js";
import type { HeldGrant, HelloInput } from "../store/queries/open-session.js";
import { forgetServer, markServerAlive } from "../store/queries/server-liveness.js";
import { readStreamSpread } from "../store/queries/stream-spread.js";
import { setWorkerDraining, setWorkerUndrained } from "../store/workers.js";
import { NO_TRACING, type Tracing } from "../telemetry.js";
import { actionTopic, type ChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "./change-feed.js";
import type { ClusterBus } from "./cluster-bus.js";
import { createAudit } from "./lease/audit.js";
import { createDispatcher, DISPATCH_HANG_MS } from "./lease/dispatch.js";
import { createLoops } from "./lease/every.js";
import { createHandover } from "./lease/handover.js";
import { createHelloOpener } from "./lease/hellos.js";
import {
  createHostedSessions,
  dbOffsetMs,
  drainReason,
  type Hosted,
  persistDeadline,
  remainingMs,
  takenOverMessage,
} from "./lease/hosted.js";
import { createReaper } from "./lease/reaper.js";
import { createRebalancer } from "./lease/rebalance.js";
import { createRegressionCheck } from "./lease/regressions.js";
import { createRenewal } from "./lease/renewal.js";
import { createReports, type ReportKind, type ReportResult } from "./lease/reports.js";
import { createRevokes } from "./lease/revokes.js";
import { createStreamHandle, type SessionHandle } from "./lease/stream.js";
import type { LeaseToken, RevokeReason, WorkerLink } from "./worker-messages.js";

/** Counters the lease manager reports; prom-client's Counter and Histogram fit. */
export interface LeaseMetrics {
  readonly grants: { inc(n?: number): void };
  readonly expiries: { inc(n?: number): void };
  readonly fencedReports: { inc(n?: number): void };
  /** Releases accepted that their workers made on their self-fence (ReleaseReport.self_fenced). */
  readonly selfFencedReleases?: { inc(n?: number): void };
  readonly reports: { inc(labels: { kind: ReportKind; result: ReportResult }): void };
  readonly heartbeatAckSeconds: { observe(seconds: number): void };
  /** Worker streams this process ended to spread them over the others (lease/rebalance.ts). */
  readonly streamsMoved?: { inc(n?: number): void };
  /** Listed leases that proved the database went back in time (lease/regressions.ts). */
  readonly epochRegressions?: { inc(n?: number): void };
}

/** Options of {@link createLeaseManager}. */
export interface LeaseManagerOptions {
  /** Spans for grants and reports of traced actions; default none. */
  readonly tracing?: Tracing;
  readonly db: Db;
  /** Where sessions are renewed (Database.renewalDb); default `db`. */
  readonly renewalDb?: Db;
  /**
   * PostgreSQL: what to do when a renewal hangs: one of its statements gets
   * no answer for {@link renewalHangMs} of time this process's event loop was
   * free to hear one (as the database watch judges a check,
   * store/database-watch.ts). `hung` with why, for every statement that hangs
   * (the server reports its database lost, as the watch does, and drops the
   * renewal's connection for a fresh one, on which the failed renewal is
   * tried again a quarter interval later), then `back` once a renewal is
   * stored again, or finds no stream left to renew. Meanwhile heartbeat acks
   * say database_unreachable. None: a renewal may wait as long as it takes
   * (PGlite, which runs in this process).
   */
  readonly renewalHung?: { hung(cause: Error): void; back(): void };
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
  /** See `ServerConfig.workerRetentionMs`; default 0, every worker is kept. */
  readonly workerRetentionMs?: number;
  /** The mass-disconnect valve's share (SPEC rule 10); see `ServerConfig.partitionShare`. Default 0.5. */
  readonly partitionShare?: number;
  /** How often to look for queued actions nobody woke this process for. Default 1 s. */
  readonly dispatchPollMs?: number;
  /**
   * How long a statement of the lease dispatcher may go unanswered
   * (lease/dispatch.ts, `hangMs`). Default half the grace period, 1 s to 30 s.
   */
  readonly dispatchHangMs?: number;
  /**
   * The only process on its database (PGlite, whose data directory is
   * locked): at start every live session's stream is known gone with the
   * process before, and is recorded lost at once, not after the staleness
   * bound. Default false: on PostgreSQL other processes may host streams.
   */
  readonly alone?: boolean;
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
   * The window of a stream's budget of fenced-report events (lease/fenced-events.ts).
   * Default 10 s (`FENCED_WINDOW_MS` there).
   */
  readonly fencedEventsWindowMs?: number;
  /**
   * How long heartbeats may keep coming after a grant without acknowledging it before the stream
   * is ended (GRANTS_UNACKNOWLEDGED), in ms. Default: the grace period.
   */
  readonly grantAckLimitMs?: number;
  /**
   * The other processes sharing the database: revokes, drains, undrains and
   * takeovers for streams this process does not host go through it.
   * Default: none.
   */
  readonly bus?: ClusterBus;
  /**
   * Whether this process cannot reach its database now (its health is
   * NOT_SERVING): heartbeat acks say so. Default: never.
   */
  readonly databaseUnreachable?: () => boolean;
  /**
   * How often this process looks at how the worker sessions are spread
   * over the processes on its database, and moves what is over its share
   * (lease/rebalance.ts). Only with a `bus`; 0 turns it off. Default 30 s.
   */
  readonly rebalanceMs?: number;
  /**
   * Run the renewal, reap and dispatch loops on timers. Default true; tests
   * with a fake clock turn it off and call `tick` themselves.
   */
  readonly timers?: boolean;
}

export type { SessionHandle } from "./lease/stream.js";

/** Snapshot of what this process hosts, for metrics. */
export interface HostedStats {
  readonly connectedWorkers: number;
  readonly leasesHeld: number;
  /** Streams not read while too many of their reports are unanswered. */
  readonly streamsHeldBack: number;
  /** How long the lease dispatcher's oldest statement in flight has waited (Dispatcher.waitingMs). */
  readonly dispatchWaitingMs: number;
}

/**
 * The work-lease protocol of one server process (SPEC §2). It wires the
 * stages of `./lease/` (hellos, streams, hosted sessions, dispatch, reports,
 * revokes, renewal, reaper, audit); docs/architecture.md follows one action
 * through them.
 */
export interface LeaseManager extends AsyncDisposable {
  /**
   * Opens or resumes a session for a validated hello sent by `principal`
   * (the caller the rpc layer authenticated). A session this would resume or
   * take over that another principal opened is refused with PERMISSION_DENIED
   * (reason SESSION_OWNED_BY_OTHER) and left untouched, its stream included.
   * `mayRunIn` says in which clusters the principal may run the hello's
   * worker id: a hello moving a worker out of a cluster it may not run it in
   * is refused with PERMISSION_DENIED, and touches nothing there.
   */
  open(
    hello: HelloInput,
    link: WorkerLink,
    principal: string,
    mayRunIn: (cluster: string) => boolean,
  ): Promise<SessionHandle>;
  /** Extends live sessions for the restart (rule 6) and starts the loops. */
  start(): Promise<void>;
  /**
   * The first step of a graceful close, while the streams are still open:
   * answers each hosted stream's next heartbeat with a deadline stored
   * afresh, so that its worker's leases outlast a restart (see
   * lease/handover.ts). Resolves when every stream was answered so or ended,
   * or after `timeoutMs`.
   */
  handOver(timeoutMs: number): Promise<{ readonly handedOver: number; readonly streams: number }>;
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
   * `actor` is who asked, recorded on the event. Only a worker with a live
   * session can be drained (the drain ends with the session).
   */
  drain(workerId: string, reason: string, actor: string): Promise<"draining" | "no session" | "not found">;
  /**
   * Ends a worker's drain (ClusterService.UndrainWorker): its session is
   * granted work again at once, on whichever process hosts its stream.
   * `reason` and `actor` go in the event; "not draining" changes nothing.
   */
  undrain(
    workerId: string,
    reason: string,
    actor: string,
  ): Promise<"undrained" | "not draining" | "no session" | "not found">;
  /**
   * When the reaper is due next (database clock): the earliest session
   * deadline this process knows of, or sooner for its fallback poll. With
   * timers on, one timer is armed for it. Undefined until the first reap or
   * lost stream when the loops are driven by hand.
   */
  nextReap(): Date | undefined;
  /**
   * A check of the database watch: after a failed one the reaper extends
   * every live session before it reaps again, so that an outage shorter than
   * the grace period expires nothing. Checks that keep failing extend once;
   * a failure after a check that succeeded extends again. It also tells the
   * acks, with the renewals, whether the database answered last (see
   * `ackSaysUnreachable`). `atMs`: performance.now() when the check showed
   * it, default now; for a check that waited in vain, when it began (the
   * database may have come back while it waited on a dead connection).
   */
  databaseChecked(ok: boolean, atMs?: number): void;
  /** One round of each loop, for tests that drive time by hand. */
  readonly tick: {
    /** Resolves `false` when no stream was hosted, so nothing was written. */
    renew(): Promise<boolean>;
    reap(): Promise<void>;
    audit(): Promise<void>;
    dispatch(): Promise<void>;
    /** Forgets the workers and sessions past the retention (`forgetWorkers`). */
    forget(): Promise<void>;
    /** Resolves once the claims and settlements already asked for are done (none is run). */
    settled(): Promise<void>;
    /** Resolves once the looks at stray leases for a database gone back in time are done. */
    regressions(): Promise<void>;
  };
  stats(): HostedStats;
  /**
   * The hosted sessions whose worker takes no more grants (StopGrants, or
   * Hello.stop_grants): held by the stream only, not in the database.
   */
  grantsStopped(): string[];
}

const HOUR_MS = 3_600_000;

/** Default of `LeaseManagerOptions.grantWindow`. */
export const DEFAULT_GRANT_WINDOW = 32;
/** Default of `LeaseManagerOptions.grantHighWaterBytes`: 1 MiB. */
export const DEFAULT_GRANT_HIGH_WATER_BYTES = 1024 * 1024;

/** Default of `LeaseManagerOptions.rebalanceMs`. */
export const DEFAULT_REBALANCE_MS = 30_000;

export function createLeaseManager(options: LeaseManagerOptions): LeaseManager {
  const { db, clock, feed, log, metrics, serverId } = options;
  const graceMs = options.gracePeriodMs;
  const maxSilenceMs = options.maxSilenceMs ?? 10 * graceMs;
  // Well above a healthy peer's renewal lag (up to two ticks): a session not renewed for this long
  // has lost its stream, whatever its row says (a crashed process, a half-open connection).
  const staleMs = Math.max(4 * options.heartbeatIntervalMs, graceMs / 2);
  /**
   * How long one liveness mark counts (marked every heartbeat interval): three
   * ticks, so a process late by a tick or two (a busy event loop, a slow
   * statement) still counts, and one that hangs stops counting soon.
   */
  const aliveForMs = Math.max(3 * options.heartbeatIntervalMs, 3000);
  const partitionShare = options.partitionShare ?? 0.5;
  const grantWindow = options.grantWindow ?? DEFAULT_GRANT_WINDOW;
  const grantHighWaterBytes = options.grantHighWaterBytes ?? DEFAULT_GRANT_HIGH_WATER_BYTES;
  const tracing = options.tracing ?? NO_TRACING;
  const hosted = createHostedSessions({ grantWindow, grantHighWaterBytes, tracing });
  const loops = createLoops(log);
  const timersOn = options.timers ?? true;
  const bus = options.bus;
  let closed = false;
  // Asked once: the lines of every grant, report and revoke cost nothing at the default level.
  const debug = log.isLevelEnabled("debug");

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
    // While the in-doubt look waits, this process grants nothing: give it up well within a grace
    // period, so that a failover does not wait out 30 s on it (at least 1 s: it is a read).
    hangMs: options.dispatchHangMs ?? Math.min(DISPATCH_HANG_MS, Math.max(1000, graceMs / 2)),
    granted(grants) {
      metrics.grants.inc(grants.length);
      if (debug) {
        for (const g of grants) {
          log.debug(
            {
              actionId: g.actionId,
              epoch: g.epoch,
              attempt: g.attempt,
              workerId: g.workerId,
              sessionId: g.sessionId,
            },
            "lease granted",
          );
        }
      }
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
    ...(metrics.selfFencedReleases ? { selfFencedReleases: metrics.selfFencedReleases } : {}),
    answered: metrics.reports,
    tracing,
    debug,
    ...(options.fencedEventsWindowMs ? { fencedEventsWindowMs: options.fencedEventsWindowMs } : {}),
    // As the acks say (worker.proto, RejectReason UNAVAILABLE): a report is not held for a
    // database that hangs. Looked at as often as a failed renewal is tried again.
    databaseLost: () => ackSaysUnreachable(),
    checkEveryMs: Math.max(1, Math.round(options.heartbeatIntervalMs / 4)),
  });
  const revokes = createRevokes({ log, hosted, settle: reports.settle, publishActions, debug });
  /** Ends a lease on the server's side: revoked here, and on the process hosting it if another. */
  const endedEverywhere = (sessionId: string, token: LeaseToken, reason: RevokeReason, message: string) => {
    revokes.revoke(sessionId, token, reason, message, true);
    bus?.send({ kind: "revoke", sessionId, ...token, reason, message, ended: true });
  };
  const regressions = createRegressionCheck({
    db,
    clock,
    log,
    ...(metrics.epochRegressions ? { regressions: metrics.epochRegressions } : {}),
    publishActions,
  });

  // ---- sessions ------------------------------------------------------------------------------------

  const closeTakenOver = (s: Hosted) => hosted.end(s, "SESSION_TAKEN_OVER", takenOverMessage());

  const hellos = createHelloOpener({
    db,
    clock,
    log,
    serverId,
    limits: { graceMs, partitionShare, maxSilenceMs },
    keepHosted: () => renewal.keepHosted(),
  });

  async function open(
    hello: HelloInput,
    link: WorkerLink,
    principal: string,
    mayRunIn: (cluster: string) => boolean,
  ): Promise<SessionHandle> {
    if (closed) throw new LeaseholdError(Code.Unavailable, "the server is shutting down; reconnect");
    const sentAt = performance.now();
    const opened = await hellos.open(hello, principal, mayRunIn);
    // The worker's previous session expired with this hello: reported as the reaper reports.
    if (opened.reaped) void reaper.report(opened.reaped, opened.reapCause);
    const previous = hosted.get(opened.sessionId);
    // Takeover (rule 8): the older stream is closed, here or on the process hosting it.
    if (previous) closeTakenOver(previous);
    else if (opened.tookOver)
      bus?.send({ kind: "takeover", sessionId: opened.sessionId, streamToken: opened.streamToken });
    rebalancer.opened(hello.workerId);
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
      drainChanges: 0,
      grantsStopped: hello.stopGrants === true,
      awaitingRenewal: false,
      unacked: new Map(),
      blocked: false,
      heardAt: performance.now(),
      unanswered: 0,
      unansweredChars: 0,
      heldBack: false,
      deadlineMs: 0,
      dbOffsetMs: 0,
      ended: false,
    };
    // Listed leases that are not the session's may prove that the database went back in time
    // (lease/regressions.ts). Looked at before the stream is hosted, so that no grant reaches it
    // meanwhile: granted the listed action again at the listed epoch, the worker would run it
    // twice under one token, and the database would see no collision (the attempt is its own).
    // A lease of this session the look ended is neither resumed nor sent again.
    let { resumedLeases, unlistedLeases } = opened;
    if (opened.revokedLeases.length > 0) {
      const ended = new Set(
        (await regressions.check(s, opened.revokedLeases)).flatMap((r) =>
          r.collided?.sessionId === s.sessionId ? [`${r.actionId}:${r.collided.epoch}`] : [],
        ),
      );
      if (ended.size > 0) {
        const kept = (l: HeldGrant) => !ended.has(`${l.actionId}:${l.epoch}`);
        resumedLeases = resumedLeases.filter(kept);
        unlistedLeases = unlistedLeases.filter(kept);
      }
    }
    persistDeadline(s, opened.deadline.getTime(), dbOffsetMs(opened.dbNow.getTime(), sentAt));
    for (const l of resumedLeases) s.held.set(l.actionId, l.epoch);
    link.send({
      type: "welcome",
      sessionId: s.sessionId,
      heartbeatIntervalMs: options.heartbeatIntervalMs,
      gracePeriodMs: graceMs,
      resumed: resumedLeases.map((l) => ({ actionId: l.actionId, epoch: l.epoch })),
      revoked: opened.revokedLeases,
      sessionResumed: opened.resumed,
      serverId,
    });
    // Grants the worker never received (it did not list them) are sent again, same epoch.
    for (const l of unlistedLeases) hosted.sendGrant(s, l);
    hosted.add(s);
    for (const l of [...resumedLeases, ...unlistedLeases]) {
      const token = { actionId: l.actionId, epoch: l.epoch };
      if (l.cancelRequested) revokes.revoke(s.sessionId, token, "CANCELLED", "action cancelled", false);
      else if (l.stopReason === "COLLECT_OUTPUTS")
        revokes.revoke(s.sessionId, token, "COLLECT_OUTPUTS", "save the outputs, then stop", false);
    }
    if (s.draining) link.send({ type: "drain", reason: drainReason(opened.drainReason) });
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
    publishActions([...resumedLeases, ...opened.revokedLeases].map((l) => l.actionId));
    // Room, not a queue change: an expired earlier session re-queues through reportReap.
    dispatcher.wakeForRoom();

    return createStreamHandle(
      {
        db,
        clock,
        log,
        feed,
        hosted,
        reports,
        revokes,
        heartbeatAckSeconds: metrics.heartbeatAckSeconds,
        databaseUnreachable: ackSaysUnreachable,
        handover,
        publishActions,
        queueChanged: scheduleDispatch,
        heard: (heard) => renewal.heard(heard),
        markLost: (lost) => lostStreams.add(lost),
        streamLost: (deadline, dbOffsetMs) => reaper.wakeAt(deadline, dbOffsetMs),
        strays: (stream, stray) => void regressions.check(stream, stray),
        endRetry: { forMs: maxSilenceMs, stopped: () => closed },
        grantAckLimitMs: options.grantAckLimitMs ?? graceMs,
        heartbeatIntervalMs: options.heartbeatIntervalMs,
      },
      s,
    );
  }

  /** Streams that ended, recorded together (a closing process or a network blip ends thousands at once). */
  const lostStreams = createBatcher<LostStream, StreamLoss | undefined>(
    (batch) => markStreamsLost(db, clock, batch, graceMs),
    { maxBatch: 1000 },
  );

  // ---- loops ---------------------------------------------------------------------------------------

  const renewal = createRenewal({
    db: options.renewalDb ?? db,
    clock,
    hosted,
    graceMs,
    heartbeatIntervalMs: options.heartbeatIntervalMs,
    serverId,
    // A skip the next tick makes up for costs nothing: said at debug. One whose stored deadline
    // comes near before a tick renews it is said, each time, with its session and worker.
    onHeld: (held) => {
      for (const h of held) {
        const fields = {
          sessionId: h.sessionId,
          workerId: h.workerId,
          skips: h.skips,
          deadlineInMs: h.remainingMs,
        };
        if (h.atRisk)
          log.warn(
            fields,
            `renewal skipped the session of worker ${h.workerId} ${h.skips === 1 ? "on a tick" : `on ${h.skips} ticks in a row`}: another transaction kept its row locked; its stored deadline passes in ${h.remainingMs} ms unless a renewal gets through`,
          );
        else
          log.debug(
            fields,
            "renewal skipped a session whose row another transaction kept locked; the next tick renews it",
          );
      }
    },
    // A closing process answers heartbeats through its handover instead. This ack carries a
    // deadline just stored: it says the database answers (answered, below, ran first).
    reack: (s) => {
      if (s.lastBeat === undefined || handover.active()) return;
      s.link.send({
        type: "heartbeat_ack",
        sequence: s.lastBeat,
        remainingMs: remainingMs(s),
        databaseUnreachable: ackSaysUnreachable(),
      });
    },
    answered: (ok) => {
      noteAnswer(ok, performance.now());
      // Stored again: said before the acks it sends again go out, which must say the database
      // answers (worker.proto, HeartbeatAck.database_unreachable: "that ack included").
      if (ok) renewalStored();
    },
    ...(options.renewalHung ? { sent: (statement: Promise<unknown>) => watchForHang(statement) } : {}),
    owedFailed: (error, streams) =>
      log.warn(
        { err: error, streams },
        "could not store at once the deadlines of workers heard just before them; the next renewal tries again, and this process reaps none of them meanwhile",
      ),
  });
  /** The watch's verdict (health NOT_SERVING): it changes only at its checks. */
  const databaseUnreachable = options.databaseUnreachable ?? (() => false);
  /**
   * What the latest round trip to the database showed (a renewal, or a check
   * of the watch: `databaseChecked`), and when (performance.now()).
   */
  let lastAnswer = { atMs: Number.NEGATIVE_INFINITY, ok: true };
  const noteAnswer = (ok: boolean, atMs: number) => {
    if (atMs >= lastAnswer.atMs) lastAnswer = { atMs, ok };
    if (ok) reports.databaseAnswered();
  };
  /**
   * What acks say (HeartbeatAck.database_unreachable): the watch's verdict,
   * until a renewal answers. A renewal stored while the watch still waits for
   * its next check would otherwise come in an ack saying the database is
   * gone, and send the agents away from a server that renews them again; the
   * next failed check (the database still flapping) says so again. And from
   * a renewal that hangs until one is stored again, whatever the checks say.
   */
  const ackSaysUnreachable = () => renewalHangs || (databaseUnreachable() && !lastAnswer.ok);
  /**
   * A renewal statement got no answer for renewalHangMs, and no renewal has
   * been stored since: the deadlines stored count down, whatever the watch's
   * checks (on connections of their own) answer.
   */
  let renewalHangs = false;
  /** A renewal was stored (on a fresh connection), or none is left to store: the hang is over. */
  const renewalStored = () => {
    if (!renewalHangs) return;
    renewalHangs = false;
    options.renewalHung?.back();
  };
  const rebalancer = createRebalancer({
    hosted,
    log,
    spread: () => readStreamSpread(db, serverId),
    paused: () => closed || databaseUnreachable(),
    moved: metrics.streamsMoved ?? { inc() {} },
  });
  const handover = createHandover({
    log,
    hosted,
    renewal,
    databaseUnreachable: ackSaysUnreachable,
    heartbeatAckSeconds: metrics.heartbeatAckSeconds,
  });
  const reaper = createReaper({
    db,
    clock,
    log,
    feed,
    hosted,
    graceMs,
    heartbeatIntervalMs: options.heartbeatIntervalMs,
    maxSilenceMs,
    partitionShare,
    timersOn,
    expiries: metrics.expiries,
    keepHosted: () => renewal.keepHosted(),
    publishActions,
  });
  const audit = createAudit({
    db,
    hosted,
    revoke: revokes.revoke,
    reporting: (actionId) => reports.inFlight(actionId),
  });
  /**
   * A renewal; one that fails tells the reaper that the stored deadlines may be stale. One with
   * no stream to renew wrote nothing and proves nothing (`false`, see Loops.every).
   */
  const renew = async (): Promise<boolean> => {
    const started = performance.now();
    // A stalled database (a lock on sessions), a hung backend: the renewal waits, and the
    // deadlines stored count down meanwhile. Said as soon as it has waited half the grace
    // period, not when (if ever) it ends, or the agents' self-fences look unexplained. The
    // time includes this process's own lateness (a saturated event loop), which the line
    // cannot tell apart.
    let warned = false;
    const halfGrace = setTimeout(() => {
      warned = true;
      log.warn(
        { waitingMs: Math.round(performance.now() - started), graceMs },
        "a renewal has been waiting for more than half the grace period (for the database, or for this process's own busy event loop): stored deadlines lag by as much, and agents may self-fence",
      );
    }, graceMs / 2);
    halfGrace.unref();
    try {
      const renewed = await renewal.renew();
      // No stream is left to renew (one hang must not keep a process NOT_SERVING that hosts
      // nobody: the watch still judges the database itself). One stored said so already
      // (answered, above), before the acks it sent again.
      if (renewed === false) {
        renewalStored();
        return false;
      }
      reaper.databaseAnswered("renewal");
      return true;
    } catch (error) {
      reaper.databaseFailed("renewal");
      throw error;
    } finally {
      clearTimeout(halfGrace);
      if (warned)
        log.info({ waitedMs: Math.round(performance.now() - started) }, "the slow renewal has ended");
    }
  };
  /**
   * A renewal statement that gets no answer is a database this process has
   * lost, though its watch's checks (on a connection of their own) answer: it
   * renews none of its streams, which other processes reap at their stored
   * deadlines. Judged as the watch judges a check (checkOnce: time the event
   * loop was busy does not count), so a busy process is not taken for a hung
   * database; and statement by statement, so a slow renewal that goes on
   * answering (several chunks, renewed again after a stall) is not either.
   */
  const watchForHang = (running: Promise<unknown>) => {
    const limitMs = renewalHangMs(graceMs, options.heartbeatIntervalMs);
    void checkOnce(() => running.then(() => undefined), limitMs).result.then((check) => {
      if (check.ok || check.kind !== "timeout" || closed) return;
      renewalHangs = true;
      noteAnswer(false, performance.now());
      options.renewalHung?.hung(
        new Error(
          `a renewal of the sessions' deadlines got no answer on its connection (${check.cause.message})`,
        ),
      );
    });
  };

  /** Forgets the workers and sessions past their retention, a batch at a time. */
  const forget = async () => {
    const retentionMs = options.workerRetentionMs ?? 0;
    if (retentionMs === 0) return;
    const total = { workers: 0, sessions: 0 };
    for (;;) {
      const batch = await forgetWorkers(db, clock, retentionMs);
      total.workers += batch.workers;
      total.sessions += batch.sessions;
      if (batch.workers < FORGET_BATCH && batch.sessions < FORGET_BATCH) break;
    }
    if (total.workers + total.sessions > 0)
      log.info({ ...total, retentionMs }, "forgot workers and sessions past --worker-retention");
  };

  async function start(): Promise<void> {
    const extended = await extendSessionsOnStart(db, clock, {
      graceMs,
      maxSilenceMs,
      // A starting process never detaches another process's live streams; alone, there are none.
      staleMs: options.alone ? 0 : staleMs,
    });
    if (extended > 0) log.info({ sessions: extended, graceMs }, "extended live sessions for the restart");
    if (timersOn) {
      // A renewal that failed (the database gone) is tried again at a quarter of the interval: the
      // agents' guarantee counts down meanwhile, and a database back sooner is used sooner.
      loops.every(options.heartbeatIntervalMs, "session renewal", renew, {
        retryMs: Math.max(1, Math.round(options.heartbeatIntervalMs / 4)),
      });
      reaper.start();
      if (bus) {
        // Every tick, one statement: the other processes count this one in their spread for
        // the next few ticks (a hung process stops counting; store/queries/stream-spread.ts).
        const markAlive = () => markServerAlive(options.renewalDb ?? db, serverId, aliveForMs);
        await markAlive().catch((error: unknown) =>
          log.warn(
            { err: error },
            "could not mark this process alive for the others; retrying on every tick",
          ),
        );
        loops.every(options.heartbeatIntervalMs, "marking this process alive", markAlive, {
          phaseMs: Math.round((options.heartbeatIntervalMs * 3) / 4),
        });
      }
      // The loops tick at different phases of the interval: with 10,000 streams the renewal and
      // the audit each hold the event loop for milliseconds, and heartbeat acks wait behind them.
      const pollMs = options.dispatchPollMs ?? 1000;
      // A poll for actions queued by other processes or waiting out a retry backoff.
      loops.every(
        pollMs,
        "dispatch poll",
        async () => {
          dispatcher.watch();
          scheduleDispatch();
        },
        {
          phaseMs: Math.round(pollMs / 4),
        },
      );
      // Housekeeping: hourly, or four times per retention if that is shorter.
      if (options.workerRetentionMs) {
        const everyMs = Math.min(HOUR_MS, Math.max(options.workerRetentionMs / 4, 15_000));
        loops.every(everyMs, "forgetting old workers", forget, {
          phaseMs: Math.round(everyMs / 2),
          soonMs: Math.min(everyMs, 60_000),
        });
      }
      // Only notices from other processes can be lost; alone there is nothing to catch up on.
      if (bus) loops.every(pollMs, "lease audit", audit, { phaseMs: Math.round(pollMs / 2) });
      // Alone (no bus) there is nowhere to move a stream to.
      const rebalanceMs = options.rebalanceMs ?? DEFAULT_REBALANCE_MS;
      if (bus && rebalanceMs > 0)
        loops.every(rebalanceMs, "spreading worker streams", rebalancer.run, {
          // Not in step with the other processes, which would all move their streams at once.
          phaseMs: Math.round(rebalanceMs * Math.random()),
        });
    }
  }

  function drainHosted(workerId: string, reason: string): void {
    for (const s of hosted.values()) if (s.workerId === workerId) hosted.drain(s, reason);
  }
  function undrainHosted(workerId: string): void {
    for (const s of hosted.values()) if (s.workerId === workerId) hosted.undrain(s);
  }

  // What other processes ask of the streams this one hosts.
  const offBus = bus?.subscribe((m) => {
    if (m.kind === "revoke") {
      revokes.revoke(m.sessionId, { actionId: m.actionId, epoch: m.epoch }, m.reason, m.message, m.ended);
    } else if (m.kind === "drain") {
      drainHosted(m.workerId, m.reason);
    } else if (m.kind === "undrain") {
      undrainHosted(m.workerId);
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
      loops.stop();
      reaper.stop();
      await Promise.all([
        dispatcher.idle(),
        reports.close(),
        hellos.close(),
        lostStreams.close(),
        regressions.idle(),
      ]);
      // Reports that waited for their action's turn reached the dispatcher only now.
      await dispatcher.idle();
      // Record what this process heard last, so the sessions' grace counts from it.
      await renewal.renew().catch((error: unknown) => log.warn({ err: error }, "final renewal failed"));
      // The other processes stop counting this one at once, not a few ticks later.
      if (bus && timersOn)
        await forgetServer(db, serverId).catch((error: unknown) =>
          log.debug({ err: error }, "could not remove this process's liveness mark"),
        );
    })();
    return closing;
  };

  return {
    open,
    start,
    // Without the database, a renewal cannot store anything: nothing to wait for.
    handOver: (timeoutMs) => handover.run(databaseUnreachable() ? 0 : timeoutMs),
    close,
    [Symbol.asyncDispose]: close,
    // Sent here and to the other processes either way: this process may still
    // host a stream the session has already left for another process.
    revoke(sessionId, token, reason, message) {
      revokes.revoke(sessionId, token, reason, message, false);
      bus?.send({ kind: "revoke", sessionId, ...token, reason, message, ended: false });
    },
    ended: endedEverywhere,
    async drain(workerId, reason, actor) {
      const outcome = await setWorkerDraining(db, workerId, reason, actor);
      if (outcome !== "draining") return outcome;
      drainHosted(workerId, reason);
      bus?.send({ kind: "drain", workerId, reason });
      feed.publish(EVENTS_TOPIC);
      return outcome;
    },
    async undrain(workerId, reason, actor) {
      const outcome = await setWorkerUndrained(db, workerId, reason, actor);
      if (outcome !== "undrained" && outcome !== "not draining") return outcome;
      // "not draining" too: the processes' notices carry no order, so one that hosts the stream
      // may have applied a drain after the undrain that followed it. Lifting it again is
      // harmless, and an operator's undrain that finds nothing to change repairs that.
      undrainHosted(workerId);
      bus?.send({ kind: "undrain", workerId });
      if (outcome === "undrained") feed.publish(EVENTS_TOPIC);
      return outcome;
    },
    nextReap: () => reaper.next(),
    databaseChecked(ok, atMs = performance.now()) {
      noteAnswer(ok, atMs);
      if (ok) reaper.databaseAnswered("check");
      else reaper.databaseFailed("check");
    },
    tick: {
      renew,
      reap: () => reaper.reap(),
      audit,
      forget,
      dispatch: async () => {
        dispatcher.watch();
        scheduleDispatch();
        await dispatcher.idle();
      },
      settled: () => dispatcher.idle(),
      regressions: () => regressions.idle(),
    },
    stats() {
      let leasesHeld = 0;
      let streamsHeldBack = 0;
      for (const s of hosted.values()) {
        leasesHeld += s.held.size;
        if (s.heldBack) streamsHeldBack++;
      }
      return {
        connectedWorkers: hosted.size,
        leasesHeld,
        streamsHeldBack,
        dispatchWaitingMs: dispatcher.waitingMs(),
      };
    },
    grantsStopped() {
      const ids: string[] = [];
      for (const s of hosted.values()) if (s.grantsStopped && !s.ended) ids.push(s.sessionId);
      return ids;
    },
  };
}

/**
 * How long a renewal statement may go unanswered before the process takes its
 * database as lost (LeaseManagerOptions.renewalHung): two heartbeat intervals,
 * as many as the database watch's checks in a row (store/database-watch.ts),
 * so that agents hear of it as early as they would of an outage; less when the
 * grace period leaves less room. The deadlines stored last count from
 * heartbeats up to an interval older than that renewal, which ran up to an
 * interval before the one that hangs, and the renewal tried again on a fresh
 * connection a quarter interval after the verdict must land before them:
 * grace − 2¼ intervals, and never less than half an interval (a statement
 * may wait a quarter interval for a row lock before it renews the others).
 * With the defaults (10 s, 2 s): 4 s; with a grace of three intervals, the
 * least allowed: 0.75 interval.
 */
export function renewalHangMs(graceMs: number, heartbeatIntervalMs: number): number {
  return Math.max(
    heartbeatIntervalMs / 2,
    Math.min(2 * heartbeatIntervalMs, graceMs - 2.25 * heartbeatIntervalMs),
  );
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
