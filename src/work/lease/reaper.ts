import type { Logger } from "pino";
import { errorSummary } from "../../log-errors.js";
import type { Clock } from "../../store/clock.js";
import { refreshClusterHealth, refreshFadingClusterHealth } from "../../store/clusters.js";
import type { Db } from "../../store/database.js";
import { extendSessionsAfterOutage } from "../../store/queries/extend-sessions-on-start.js";
import {
  type KeepHosted,
  type ReapCause,
  type ReapResult,
  reapSessions,
} from "../../store/queries/reap-sessions.js";
import { type ChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "../change-feed.js";
import { failureLog } from "../failure-log.js";
import { type HostedSessions, REAPED_MESSAGE } from "./hosted.js";

/** Sessions reaped per statement. */
const REAP_BATCH = 500;

/**
 * How often a reaper looks at the clusters stored as not HEALTHY when it
 * knows of no expiry leaving their window sooner: one another process
 * degraded (its own reaper would record the recovery, unless it stopped).
 */
const HEALTH_RECHECK_MS = 10_000;

/**
 * The reaper: expires the leases of sessions past their deadline (any
 * process's), re-queues or fails their actions, and reports it.
 *
 * SPEC §6: failover within grace + 100 ms. The reaper is woken at the
 * earliest deadline this process knows of (one timer, re-armed), not on a
 * fixed tick: each reap returns the earliest live deadline in the database
 * (any process's sessions), and a stream lost here brings its deadline.
 * Deadlines only move later, so waking early costs one reap that finds
 * nothing; the fallback poll bounds the wait for what no deadline
 * announces (a valve that clears, a session past the maximum silence, a
 * reap that failed).
 */
export interface Reaper {
  /** Reaps until nothing is due, then plans the next wake-up. */
  reap(): Promise<void>;
  /**
   * Reports what a reap did, wherever it ran (the reaper, or a hello that
   * found its worker's previous session past its deadline): closes the
   * reaped sessions' streams hosted here, writes the documented line per
   * expiry, counts expiries, refreshes cluster health, and wakes watchers
   * and the dispatchers of every process for the re-queued actions.
   */
  report(result: ReapResult, cause?: ReapCause): Promise<void>;
  /**
   * Wakes the reaper at `atDbMs` (database clock; `dbOffsetMs` is the
   * database clock minus ours) if that is earlier than planned.
   */
  wakeAt(atDbMs: number, dbOffsetMs: number): void;
  /** Arms the fallback poll (with timers on). */
  start(): void;
  /** When the reaper is due next (database clock); undefined before the first plan. */
  next(): Date | undefined;
  /**
   * A statement of this process failed for want of the database (`source`:
   * the database watch's check, or the renewal): before its next reap, the
   * reaper gives every live session a grace period from now
   * (`extendSessionsAfterOutage`), so that an outage shorter than the grace
   * period expires nothing. Once per failure of a source, not once per failed
   * attempt: the source fails again only after it succeeded
   * ({@link databaseAnswered}). A check that keeps failing while the database
   * works for everything else (this process cannot open its check's
   * connection) would otherwise push every deadline in the cluster back on
   * each check, and nothing would expire before the maximum silence.
   */
  databaseFailed(source: DatabaseSource): void;
  /** The same source's statement succeeded: its next failure extends again. */
  databaseAnswered(source: DatabaseSource): void;
  stop(): void;
}

/** What tells the reaper the database failed: the database watch's check, or the renewal. */
export type DatabaseSource = "check" | "renewal";

export function createReaper(deps: {
  db: Db;
  clock: Clock;
  log: Logger;
  feed: ChangeFeed;
  hosted: HostedSessions;
  graceMs: number;
  heartbeatIntervalMs: number;
  maxSilenceMs: number;
  partitionShare: number;
  timersOn: boolean;
  expiries: { inc(n?: number): void };
  keepHosted: () => KeepHosted | undefined;
  /** Wakes the watchers of these actions (and of the event feed). */
  publishActions: (ids: Iterable<string>) => void;
}): Reaper {
  const { db, clock, log, feed, hosted } = deps;
  /** The fallback poll. */
  const pollMs = Math.min(1000, Math.max(100, deps.graceMs / 10));
  /** When the reaper is due (database clock, epoch ms); +∞ before the first plan. */
  let atDbMs = Number.POSITIVE_INFINITY;
  let timer: NodeJS.Timeout | undefined;
  let reaping = false;
  let again = false;
  const reaps = failureLog(log, {
    failed: "reaper failed; retrying on every poll",
    still: "reaper still failing",
    again: "reaper works again",
  });
  let stopped = false;
  /**
   * What failed for want of the database since the last reap, if anything:
   * extend before reaping (see `databaseFailed`). Named in the log, as a
   * busy process (a reap that waited too long to start) is not an outage.
   */
  let outage: string | undefined;
  /** The sources whose last statement failed: their next failures extend nothing more. */
  const failedSources = new Set<DatabaseSource>();
  /**
   * When (database clock, epoch ms) the stored health of the clusters stored
   * as not HEALTHY is due to be recomputed (refreshFadingClusterHealth): at
   * the first reap, then when the next of their expiries leaves the window.
   */
  let healthDueAtMs = Number.NEGATIVE_INFINITY;

  /** `replace` sets the plan after a reap; otherwise only an earlier time moves it. */
  function plan(at: number, dbOffsetMs: number, replace: boolean): void {
    if (!replace && at >= atDbMs) return;
    atDbMs = at;
    if (!deps.timersOn || stopped) return;
    if (timer) clearTimeout(timer);
    // One millisecond past: the reap takes sessions whose deadline is strictly before now.
    timer = setTimeout(run, Math.max(0, at - dbOffsetMs - Date.now() + 1));
    timer.unref();
  }

  function run(): void {
    timer = undefined;
    if (stopped) return;
    if (reaping) {
      again = true;
      return;
    }
    reaping = true;
    reap()
      .then(
        () => reaps.worked(),
        (error: unknown) => {
          reaps.failed(error);
          plan(Date.now() + pollMs, 0, true);
        },
      )
      .finally(() => {
        reaping = false;
        if (again) {
          again = false;
          plan(Date.now(), 0, false);
        }
      });
  }

  async function report(result: ReapResult, cause: ReapCause = "deadline"): Promise<void> {
    for (const { sessionId } of result.sessions) {
      const s = hosted.get(sessionId);
      if (s) hosted.end(s, "SESSION_REAPED", REAPED_MESSAGE);
    }
    for (const e of result.expired) {
      // The documented line (SPEC rule 3); operators grep for it. When the session's server
      // process went silent, the line says so: the worker was not what fell silent.
      const host = e.silentServer;
      log.warn(
        {
          actionId: e.actionId,
          workerId: e.workerId,
          cluster: e.cluster,
          epoch: e.epoch,
          state: e.state,
          sessionId: e.sessionId,
          cause: host ? "server_silent" : cause,
          ...(host && { serverId: host.serverId, serverAliveUntil: host.aliveUntil.toISOString() }),
        },
        `lease expired for action ${e.actionId} (worker ${e.workerId}, cluster ${e.cluster}, epoch ${e.epoch})` +
          (host
            ? `: its server process ${host.serverId} stopped renewing the session (its liveness mark ran out at ${host.aliveUntil.toISOString()}: it lost its database, hung or died) while the worker was connected to it`
            : ""),
      );
    }
    for (const p of result.partitions) {
      const counts = { cluster: p.cluster, lostSessions: p.lost, liveSessions: p.live };
      if (p.partitioned)
        log.warn(
          counts,
          `cluster ${p.cluster} is partitioned: ${p.lost} of ${p.live} sessions holding leases lost; lease expiries are paused`,
        );
      else log.info(counts, `cluster ${p.cluster} is no longer partitioned; lease expiries go on`);
    }
    if (result.partitions.length > 0) feed.publish(EVENTS_TOPIC);
    if (result.expired.length > 0) {
      deps.expiries.inc(result.expired.length);
      deps.publishActions(result.expired.map((e) => e.actionId));
      // Any process may host the worker that takes a re-queued action next.
      if (result.expired.some((e) => e.state === "QUEUED")) feed.publish(QUEUE_TOPIC);
      const clusters = [...new Set(result.expired.map((e) => e.cluster))];
      await refreshClusterHealth(db, clock, clusters).catch((error: unknown) =>
        log.warn({ err: error }, "could not refresh cluster health"),
      );
      // A cluster that got worse recovers when these expiries leave the window: plan for it.
      healthDueAtMs = Number.NEGATIVE_INFINITY;
    } else if (result.sessions.length > 0) {
      feed.publish(EVENTS_TOPIC);
    }
  }

  /**
   * Follows the health window of the clusters stored as not HEALTHY, as
   * `clusters list` computes it: their recovery gets its event when their
   * expiries leave the window, not at the next expiry. One statement over
   * those clusters only, when the next of their expiries leaves the window
   * (or every {@link HEALTH_RECHECK_MS}): nothing per heartbeat or per reap.
   */
  async function refreshFadingHealth(dbNowMs: number): Promise<void> {
    try {
      const { changed, next } = await refreshFadingClusterHealth(db, clock);
      for (const c of changed)
        log.info(c, `cluster ${c.cluster} is now ${c.health}: lease expiries left the health window`);
      if (changed.length > 0) feed.publish(EVENTS_TOPIC);
      healthDueAtMs = Math.min(next?.getTime() ?? Number.POSITIVE_INFINITY, dbNowMs + HEALTH_RECHECK_MS);
    } catch (error) {
      healthDueAtMs = dbNowMs + HEALTH_RECHECK_MS;
      log.warn({ err: error }, "could not refresh cluster health");
    }
  }

  async function reap(): Promise<void> {
    try {
      await reapAll();
    } catch (error) {
      outage ??= `a reap failed (${errorSummary(error)})`;
      throw error;
    }
  }

  /**
   * One periodic reap statement, in a transaction of its own, which fixes the
   * `now()` the statement judges deadlines by at the transaction's start;
   * none runs if starting it waited for the database longer than a
   * heartbeat interval. A reap sent just before the database hung (SIGSTOP,
   * a stalled disk) ran when it woke, by the `now()` of then: the renewals
   * stuck behind the same wait could not move the deadlines, and the
   * sessions of connected workers were reaped within the grace period (a 9 s
   * hang at a 10 s grace). Refused, it counts as a failure, and the next
   * reap extends every live session first, as after any outage. Once the
   * transaction has started, however long the statement takes, it judges by
   * a time the renewals had kept up with.
   */
  async function reapInTime(options: Parameters<typeof reapSessions>[2]): Promise<ReapResult> {
    const askedAt = performance.now();
    return db.transaction(async (t) => {
      const waitedMs = Math.round(performance.now() - askedAt);
      if (waitedMs > deps.heartbeatIntervalMs)
        throw new Error(
          `starting the reap waited ${waitedMs}ms (for the database, or for this process's own busy event loop), longer than a heartbeat interval: not reaping by deadlines the renewals could not keep up with`,
        );
      return reapSessions(t as unknown as Db, clock, options);
    });
  }

  async function reapAll(): Promise<void> {
    if (outage !== undefined) {
      const extended = await extendSessionsAfterOutage(db, clock, {
        graceMs: deps.graceMs,
        maxSilenceMs: deps.maxSilenceMs,
      });
      const cause = outage;
      outage = undefined;
      if (extended > 0)
        log.warn(
          { sessions: extended, cause },
          `since the last reap, ${cause}: live sessions get a grace period from now before any is reaped`,
        );
    }
    for (;;) {
      const result = await reapInTime({
        limit: REAP_BATCH,
        partitionShare: deps.partitionShare,
        maxSilenceMs: deps.maxSilenceMs,
        graceMs: deps.graceMs,
        keep: deps.keepHosted(),
      });
      await report(result);
      if (result.sessions.length < REAP_BATCH) {
        const dbNowMs = result.dbNow.getTime();
        if (dbNowMs >= healthDueAtMs) await refreshFadingHealth(dbNowMs);
        const next = Math.min(result.nextDeadline?.getTime() ?? Number.POSITIVE_INFINITY, dbNowMs + pollMs);
        plan(next, dbNowMs - Date.now(), true);
        return;
      }
    }
  }

  return {
    reap,
    report,
    wakeAt: (at, dbOffsetMs) => plan(at, dbOffsetMs, false),
    start: () => plan(Date.now() + pollMs, 0, true),
    next: () => (atDbMs === Number.POSITIVE_INFINITY ? undefined : new Date(atDbMs)),
    databaseFailed(source) {
      if (failedSources.has(source)) return;
      failedSources.add(source);
      outage ??= source === "check" ? "a database check failed" : "a renewal failed";
    },
    databaseAnswered(source) {
      failedSources.delete(source);
    },
    stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
    },
  };
}
