import { randomUUID } from "node:crypto";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import type * as grpc from "@grpc/grpc-js";
import { sql } from "drizzle-orm";
import type { Logger } from "pino";
import type { Access } from "./auth/access.js";
import { parseListen, type ServerConfig } from "./config.js";
import { type ConsoleServer, serveConsole } from "./console/server.js";
import { Code, LeaseholdError } from "./errors.js";
import { ActionService } from "./gen/leasehold/v1/action_pb.js";
import { ClusterService } from "./gen/leasehold/v1/cluster_pb.js";
import { EventService } from "./gen/leasehold/v1/event_pb.js";
import { LeaseService } from "./gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "./gen/leasehold/v1/resource_pb.js";
import { WorkerService } from "./gen/leasehold/v1/worker_pb.js";
import {
  addBuildInfo,
  addLargeCallMetrics,
  addProcessMetrics,
  addUnaryCallMetrics,
  createCallMetrics,
  createMetrics,
  type Metrics,
  serveMetrics,
} from "./metrics.js";
import type { FastDecoders } from "./rpc/adapter.js";
import type { Authenticator } from "./rpc/authenticator.js";
import { createServerSecurity, type ServerSecurity } from "./rpc/security.js";
import { createRpcServer, refusalLogger } from "./rpc/server.js";
import { ACTION_FAST_DECODERS, actionServiceBinding } from "./rpc/services/action-service.js";
import { clusterServiceBinding } from "./rpc/services/cluster-service.js";
import { eventServiceBinding } from "./rpc/services/event-service.js";
import { leaseServiceBinding, resourceServiceBinding } from "./rpc/services/scope-services.js";
import {
  WORKER_FAST_DECODERS,
  type WorkerStreamLimits,
  workerServiceBinding,
} from "./rpc/services/worker-service.js";
import { createStartupGate } from "./rpc/startup-gate.js";
import { createScopeLeaseService, type ScopeLeaseService } from "./scope/scope-lease-service.js";
import { countActionsByCluster } from "./store/actions.js";
import { type Clock, databaseClock } from "./store/clock.js";
import { readClusterHealth } from "./store/clusters.js";
import {
  connectionShortfalls,
  type DatabaseOptions,
  type Db,
  isTransientConnectError,
  MIGRATION_LOCK_TIMEOUT_MS,
  openDatabaseWhenReachable,
  ReadOnlyDatabase,
  redactUrl,
  retryDelay,
  vacuumShortfalls,
} from "./store/database.js";
import { type DatabaseCheck, watchDatabase } from "./store/database-watch.js";
import { MigrationFailed } from "./store/migration-failed.js";
import { DatabaseNewerThanBuild } from "./store/newer-database.js";
import { extendAwaitedSessions } from "./store/queries/extend-sessions-on-start.js";
import { recordDatabaseOutage } from "./store/queries/record-database-outage.js";
import { queryRows, toDate, toNumber } from "./store/rows.js";
import { NO_TRACING, otlpTracing, type Tracing } from "./telemetry.js";
import { buildCommit, packageVersion } from "./version.js";
import { createActionService } from "./work/action-service.js";
import { createChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "./work/change-feed.js";
import { createPostgresBus } from "./work/cluster-bus.js";
import { createEventService } from "./work/event-service.js";
import { createHistoryKeeper, type HistoryKeeper } from "./work/history.js";
import { createLeaseManager, type LeaseManager, type LeaseManagerOptions } from "./work/lease-manager.js";

/** A running Leasehold server process. */
export interface LeaseholdServer extends AsyncDisposable {
  /** The port the gRPC server listens on. */
  readonly port: number;
  /** The port of `/metrics`, if served. */
  readonly metricsPort: number | undefined;
  /** The port of the web console, if served (`--console-listen`). */
  readonly consolePort: number | undefined;
  /** This process's id, shown on the sessions it hosts. */
  readonly serverId: string;
  /** The work-lease machinery (tests drive its loops by hand with a fake clock). */
  readonly leases: LeaseManager;
  /** Scope leases (tests run their expiry by hand with a fake clock). */
  readonly scope: ScopeLeaseService;
  /** Removal of history past --history-retention (tests run it by hand with a fake clock). */
  readonly history: HistoryKeeper;
  readonly metrics: Metrics;
  /** TLS and authentication of the port (tests rotate certificates through `security.tls.reload()`). */
  readonly security: ServerSecurity;
  /**
   * Health NOT_SERVING, stop accepting calls, end open streams, flush
   * pending writes, close the database. Idempotent.
   */
  close(): Promise<void>;
}

/** Test seams (production uses the defaults), and a way to stop a server still starting. */
export interface ServerOverrides {
  /** Where the console's page is (tests); default the built one in dist/. */
  readonly consoleStaticDir?: string;
  /** Clock for lease arithmetic. Default: the database clock. */
  readonly clock?: Clock;
  /** Run the lease loops on timers. Default true. */
  readonly timers?: boolean;
  /** Observes every SQL statement (tests count them). */
  readonly onQuery?: DatabaseOptions["onQuery"];
  /** Wraps the handle every part of the server uses (tests inject faults such as a lost commit). */
  readonly wrapDb?: (db: Db) => Db;
  /**
   * Aborting it while the server waits for its database stops the waiting:
   * `startServer` closes the port and rejects with the signal's reason.
   * Aborted later (the database answered), the start goes on but never marks
   * the port SERVING nor logs `leasehold serving`: the caller is to close it.
   */
  readonly signal?: AbortSignal;
  /** Flow control and stream limits; production uses the defaults (README, "Limits"). */
  readonly limits?: StreamLimits;
  /**
   * How long a graceful close waits to answer each worker stream's next
   * heartbeat with a deadline stored afresh before it ends the streams
   * (lease/handover.ts). Default 1.5 heartbeat intervals; 0 ends them at once.
   */
  readonly handOverMs?: number;
  /** How long a statement of the lease dispatcher may go unanswered before it is called hung; default 30 s. */
  readonly dispatchHangMs?: number;
  /**
   * The Access of each call from its metadata, in place of the configured
   * authentication (tests of handler-level checks that need no credentials).
   */
  readonly accessOf?: (metadata: grpc.Metadata) => Access;
  /** Called after every check of the database's health watch (PostgreSQL only; tests await checks). */
  readonly onDatabaseCheck?: (check: DatabaseCheck) => void;
  /** Spans go here instead of to `--otlp-endpoint` (tests pass an in-memory exporter's). */
  readonly tracing?: Tracing;
  /** How long a close waits for work in flight on the database; default {@link SHUTDOWN_WAIT_MS}. */
  readonly shutdownWaitMs?: number;
  /**
   * This process's server id (sessions' `server_id`, every log line's
   * `serverId`); default a new UUID. `serve` makes it before its logger, so
   * that its own lines (signals, grpc-js) carry it too.
   */
  readonly serverId?: string;
}

/**
 * How long a close waits, after the port is closed, for reports, grants and
 * submissions still waiting on the database, before it closes the database
 * (which gives its connections 5 s more).
 */
export const SHUTDOWN_WAIT_MS = 10_000;

/** Flow control and stream limits, each defaulted where it is used. */
export interface StreamLimits
  extends Partial<WorkerStreamLimits>,
    Pick<
      LeaseManagerOptions,
      "grantWindow" | "grantHighWaterBytes" | "fencedEventsWindowMs" | "grantAckLimitMs"
    > {
  /** HTTP/2 streams one connection may hold open (`RpcServerOptions.maxConcurrentStreams`). */
  readonly maxConcurrentStreams?: number;
  /** Connections the process takes at once (`RpcServerOptions.maxConnections`). */
  readonly maxConnections?: number;
  /** How long a connection with no call stays open (`RpcServerOptions.maxConnectionIdleMs`). */
  readonly maxConnectionIdleMs?: number;
  /** Memory request messages still arriving may hold (`RpcServerOptions.maxPartialRequestBytes`). */
  readonly maxPartialRequestBytes?: number;
  /** How long an arriving request message may stall (`RpcServerOptions.requestStallMs`). */
  readonly requestStallMs?: number;
  /** Unary calls served at once, and waiting (`RpcServerOptions.maxUnaryCalls`, `maxUnaryWaiting`). */
  readonly maxUnaryCalls?: number;
  readonly maxUnaryWaiting?: number;
}

/** Every service the port answers; bound before their implementations exist (see StartupGate). */
const SERVICES = [
  ActionService,
  EventService,
  WorkerService,
  ClusterService,
  LeaseService,
  ResourceService,
] as unknown as readonly GenService<GenServiceMethods>[];

/** Decoders tried first for some methods' requests, by service (see `FastDecoders`). */
const FAST_DECODERS: Readonly<Record<string, FastDecoders>> = {
  [ActionService.typeName]: ACTION_FAST_DECODERS,
  [WorkerService.typeName]: WORKER_FAST_DECODERS,
};

/**
 * The composition root. Startup order matters for SPEC rule 6: the gRPC port
 * is bound first (health NOT_SERVING, calls held by a {@link StartupGate}),
 * then the database is opened (waiting with backoff while PostgreSQL cannot
 * be reached yet, failing at once on a configuration error), migrated, the
 * services built, and live sessions get their restart extension: so the
 * extension counts from a moment agents could already connect. Health turns
 * SERVING, and held calls proceed, once all of it is up.
 */
export async function startServer(
  config: ServerConfig,
  rootLog: Logger,
  overrides: ServerOverrides = {},
): Promise<LeaseholdServer> {
  const serverId = overrides.serverId ?? randomUUID();
  // Every line of this server names it: with several replicas in one log stream, a line is
  // joined to its process (and to sessions' server_id) by it. A logger that binds it already
  // (serve's root logger) is used as it is, not to write the key twice.
  const log = rootLog.bindings().serverId === serverId ? rootLog : rootLog.child({ serverId });
  const clock = overrides.clock ?? databaseClock;
  const limits = overrides.limits ?? {};
  const timers = overrides.timers ?? true;
  const gate = createStartupGate();
  // Certificates, tokens and policy are read before anything else: a bad file stops the start.
  const security = createServerSecurity(config, log);
  const authenticator: Authenticator | undefined = overrides.accessOf
    ? { authenticate: (call) => (overrides.accessOf as (m: grpc.Metadata) => Access)(call.metadata) }
    : security.authenticator;
  // Made once: the calls are counted from the first, and across a start done again behind the port.
  const callMetrics = createCallMetrics();
  const rpc = await createRpcServer(config.listen, security.credentials, {
    log,
    calls: callMetrics.calls,
    connections: callMetrics.connections,
    maxConnectionsPerAddress: config.maxConnectionsPerAddress,
    ...(limits.maxConnections ? { maxConnections: limits.maxConnections } : {}),
    authenticator,
    tls: security.tls?.material,
    reflection: config.auth.reflection,
    // Room for the largest file plus the rest of its request.
    maxReceiveMessageBytes: config.maxFileBytes + 1024 * 1024,
    ...(limits.maxConcurrentStreams ? { maxConcurrentStreams: limits.maxConcurrentStreams } : {}),
    ...(limits.maxConnectionIdleMs ? { maxConnectionIdleMs: limits.maxConnectionIdleMs } : {}),
    ...(limits.maxPartialRequestBytes ? { maxPartialRequestBytes: limits.maxPartialRequestBytes } : {}),
    ...(limits.requestStallMs ? { requestStallMs: limits.requestStallMs } : {}),
    maxUnaryCalls: limits.maxUnaryCalls ?? config.maxUnaryCalls,
    ...(limits.maxUnaryWaiting !== undefined ? { maxUnaryWaiting: limits.maxUnaryWaiting } : {}),
    // The deferred bindings are what grpc-js registers: each carries its service's decoders.
    services: SERVICES.map((service) => ({
      ...gate.defer(service),
      fastDecoders: FAST_DECODERS[service.typeName],
    })),
  }).catch((error: unknown) => {
    security.close();
    throw isListenError(error) ? listenFailure("--listen", config.listen, error) : error;
  });
  addLargeCallMetrics(callMetrics.registry, rpc.largeCalls);
  addUnaryCallMetrics(callMetrics.registry, rpc.unaryCalls);
  // Bound before the database is opened too: a port another process holds is a usage error at
  // once, not once PostgreSQL answers (never, while it is down). Until then it serves the calls'
  // metrics and the process's; the start behind the port adds the rest.
  let metricsServer: Awaited<ReturnType<typeof serveMetrics>> | undefined;
  let stopSampling: (() => void) | undefined;
  if (config.metricsListen) {
    const { host, port } = parseListen(config.metricsListen, "--metrics-listen");
    stopSampling = addProcessMetrics(callMetrics.registry);
    addBuildInfo(callMetrics.registry, packageVersion(), buildCommit());
    // A name that does not resolve, or an address not of this machine: a usage error naming the
    // flag, as a port in use is (serveMetrics names it).
    metricsServer = await serveMetrics(callMetrics.registry, host, port).catch(async (error: unknown) => {
      stopSampling?.();
      gate.close(
        new LeaseholdError(Code.Unavailable, "the server stopped before it was ready; retry", {
          reason: "SHUTTING_DOWN",
        }),
      );
      await rpc.close();
      security.close();
      throw error instanceof LeaseholdError
        ? error
        : listenFailure("--metrics-listen", config.metricsListen as string, error);
    });
  }
  log.info(
    {
      port: rpc.port,
      listen: config.listen,
      metricsPort: metricsServer?.port,
      tls: Boolean(config.tls),
      auth: config.auth.enabled,
    },
    "listening; NOT_SERVING until ready",
  );
  return startBehindPort(
    {
      config,
      log,
      overrides,
      serverId,
      clock,
      limits,
      timers,
      gate,
      security,
      authenticator,
      rpc,
      callMetrics,
      metricsServer,
      closeFront: async () => {
        await metricsServer?.close();
        stopSampling?.();
        security.close();
      },
    },
    1,
  );
}

/** What {@link startBehindPort} starts behind: the bound port and what was read before binding it. */
interface Front {
  readonly config: ServerConfig;
  readonly log: Logger;
  readonly overrides: ServerOverrides;
  readonly serverId: string;
  readonly clock: Clock;
  readonly limits: StreamLimits;
  readonly timers: boolean;
  readonly gate: ReturnType<typeof createStartupGate>;
  readonly security: ServerSecurity;
  /** The port's authentication, which the console shares. */
  readonly authenticator: Authenticator | undefined;
  readonly rpc: Awaited<ReturnType<typeof createRpcServer>>;
  /** The port's call counts, served with the rest of the metrics. */
  readonly callMetrics: ReturnType<typeof createCallMetrics>;
  /** `/metrics`, if served: bound with the port, given the whole registry once it is made. */
  readonly metricsServer: Awaited<ReturnType<typeof serveMetrics>> | undefined;
  /** Closes what was opened with the port, but the port: `/metrics` and the security. */
  closeFront(): Promise<void>;
}

/**
 * Everything behind the bound port: the database, the services, the loops.
 * PostgreSQL can go away after it was opened and before the start is over
 * (restarted just then): the start then undoes what it built behind the
 * port, keeps the port (calls still wait at the gate), and starts again with
 * the same backoff as the first wait, rather than exiting; only an error that
 * is not the database being unreachable ends it.
 */
async function startBehindPort(front: Front, attempt: number): Promise<LeaseholdServer> {
  const { config, log, overrides, serverId, clock, limits, timers, gate, security, authenticator, rpc } =
    front;
  // Everything behind the port, closed in reverse order after the port.
  const cleanup: (() => Promise<void>)[] = [front.closeFront];
  const unwind = async () => {
    for (const fn of cleanup.reverse()) await fn().catch(() => {});
  };
  /**
   * A close step that waits for the database (reports and submissions in
   * flight): a shutdown gives such steps {@link SHUTDOWN_WAIT_MS} in all, then
   * goes on without them. A database that stopped answering (frozen, or cut
   * off without a reset) held SIGTERM for as long as it lasted, and a
   * supervisor saw a process that would not exit. What was not committed is
   * lost to nobody: agents send unanswered reports again, clients retry.
   */
  let settleBy = Number.POSITIVE_INFINITY;
  const waitsForDatabase = (what: string, fn: () => Promise<void>) => async () => {
    if (settleBy === Number.POSITIVE_INFINITY) return fn();
    let timer: NodeJS.Timeout | undefined;
    const gaveUp = await Promise.race([
      fn().then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), Math.max(0, settleBy - performance.now()));
      }),
    ]).finally(() => clearTimeout(timer));
    if (gaveUp)
      log.warn(
        { waitedMs: overrides.shutdownWaitMs ?? SHUTDOWN_WAIT_MS },
        `stopping without waiting longer for ${what}: the database has not answered; agents send unanswered reports again`,
      );
  };
  try {
    const tracing =
      overrides.tracing ??
      (config.otlpEndpoint
        ? await otlpTracing(config.otlpEndpoint, log, { instanceId: serverId, version: packageVersion() })
        : NO_TRACING);
    cleanup.push(() => tracing.close());
    const database = await openDatabaseWhenReachable(
      {
        url: config.databaseUrl,
        dataDir: config.dataDir,
        poolSize: config.databasePoolSize,
        processId: serverId,
        ...(overrides.signal ? { signal: overrides.signal } : {}),
        ...(overrides.onQuery ? { onQuery: overrides.onQuery } : {}),
        onMigrating: (pending) => {
          log.info(
            { migrations: pending },
            `applying ${pending.length} migration${pending.length === 1 ? "" : "s"}: ${pending.join(", ")}`,
          );
        },
        onMigrated: (applied, ms) => {
          log.info(
            { migrations: applied, ms: Math.round(ms) },
            `applied ${applied.length} migration${applied.length === 1 ? "" : "s"} in ${(ms / 1000).toFixed(1)} s`,
          );
        },
        onMigrationLockWait: ({ tries, waitedMs, retryInMs, holders }) => {
          gate.block("migrating the database: waiting for a table lock");
          log.warn(
            { tries, waitedMs, retryInMs, holders },
            `migrating the database: a table stayed locked for ${MIGRATION_LOCK_TIMEOUT_MS} ms, so the migration rolled back to let the other processes' statements through; trying again in ${retryInMs} ms. ${holders.length > 0 ? `Sessions holding the lock it waited for, longest first: ${holders.map((h) => `pid ${h.pid} (${h.applicationName || "no application_name"}, ${h.state}, transaction ${Math.round(h.transactionMs / 1000)} s: ${h.query})`).join("; ")}` : "No session was seen holding the lock it waited for"}`,
          );
        },
      },
      {
        ...(overrides.signal ? { signal: overrides.signal } : {}),
        // One line when an outage starts and one when it ends, not one per attempt.
        onWaiting: (error) => {
          gate.block(errorText(error));
          log.warn(
            { err: error, database: redactUrl(config.databaseUrl ?? "") },
            "database not reachable; waiting for it (health NOT_SERVING, calls UNAVAILABLE)",
          );
        },
        onRetry: (error, attempt) => {
          // Calls name the latest attempt's cause, not the first one's (shutting down, then refused).
          gate.block(errorText(error));
          log.debug({ err: error, attempt }, "database still not reachable");
        },
        onReachable: (attempts, waitedMs) => {
          gate.unblock();
          log.info({ attempts, waitedMs }, "database reachable; starting");
        },
      },
    ).catch((error: unknown) => {
      // A database a newer build migrated, or one that refused a migration: their messages say
      // what to do; the URL is right.
      throw overrides.signal?.aborted ||
        !config.databaseUrl ||
        error instanceof DatabaseNewerThanBuild ||
        error instanceof MigrationFailed
        ? error
        : openFailure(config.databaseUrl, error);
    });
    cleanup.push(() => database.close());
    // Calls wait for the rest of the start again, not refused for a lock the migrations got since.
    gate.unblock();
    log.info(
      { driver: database.driver, dataDir: config.databaseUrl ? undefined : config.dataDir },
      "database ready",
    );
    if (database.driver === "postgres") {
      void warnOfConnectionLimits(database.db, config.databasePoolSize, log);
      void warnOfNoVacuum(database.db, log);
    }
    // The renewal's connection is wrapped too, first: a test that keeps the handle it is given
    // keeps the main one.
    const renewalDb =
      database.renewalDb && overrides.wrapDb ? overrides.wrapDb(database.renewalDb) : database.renewalDb;
    const db = overrides.wrapDb ? overrides.wrapDb(database.db) : database.db;
    // The other processes on this database hear of every change over LISTEN/NOTIFY.
    // PGlite serves one process: there is nobody to tell.
    const bus = database.listen
      ? await createPostgresBus({ db, listen: database.listen, serverId, log })
      : undefined;
    if (bus) cleanup.push(waitsForDatabase("the notices to other processes in flight", () => bus.close()));
    const feed = createChangeFeed(bus);
    let leases: LeaseManager | undefined;
    const metrics = createMetrics(
      {
        hosted: () =>
          leases?.stats() ?? { connectedWorkers: 0, leasesHeld: 0, streamsHeldBack: 0, dispatchWaitingMs: 0 },
        databaseUp: () => !databaseUnreachable,
        inGrace: async () => {
          const [row] = await queryRows<{ n: unknown }>(
            db,
            sql`select count(*) as n from sessions where ended_at is null and stream_lost_at is not null`,
          );
          return toNumber(row?.n ?? 0);
        },
        pausedClusters: async () => {
          const [row] = await queryRows<{ n: unknown }>(
            db,
            sql`select count(*) as n from clusters where partitioned_at is not null and expiries_resumed_at is null`,
          );
          return toNumber(row?.n ?? 0);
        },
        actions: () => countActionsByCluster(db),
        clusterHealth: () => readClusterHealth(db),
      },
      front.callMetrics.registry,
    );
    // Set by the database watch below: health is NOT_SERVING while it lasts, and heartbeat acks
    // say so until a renewal answers (lease-manager.ts, ackSaysUnreachable; worker.proto).
    let databaseUnreachable = false;
    let closing: Promise<void> | undefined;
    /**
     * What finds the database lost: the watch's checks, a renewal that hangs on
     * its connection (lease-manager.ts, renewalHung), or both. It is back once
     * neither does.
     */
    const lostBy = new Set<"checks" | "renewal">();
    /** Since when, and why, while it lasts: recorded as an event once the database answers again. */
    let outage: { since: Date; cause: string; readOnly: boolean } | undefined;
    const databaseLost = (by: "checks" | "renewal", cause: Error, message: string) => {
      const first = lostBy.size === 0;
      lostBy.add(by);
      if (!first) return;
      log.error({ err: cause }, message);
      outage = {
        since: new Date(),
        cause: cause.message.slice(0, 1000),
        readOnly: cause instanceof ReadOnlyDatabase,
      };
      databaseUnreachable = true;
      rpc.markNotServing();
      gate.pause(cause.message);
    };
    const databaseBack = (by: "checks" | "renewal") => {
      if (!lostBy.delete(by) || lostBy.size > 0) return;
      log.info("database reachable again; serving");
      databaseUnreachable = false;
      if (outage) {
        const { since, cause, readOnly } = outage;
        outage = undefined;
        recordDatabaseOutage(db, { serverId, since, until: new Date(), cause, readOnly }).then(
          () => feed.publish(EVENTS_TOPIC),
          (error: unknown) => log.warn({ err: error }, "could not record the database outage as an event"),
        );
      }
      gate.resume();
      if (!closing && !overrides.signal?.aborted) rpc.markServing();
      // Whatever was missed while it was gone: look again.
      feed.publish(QUEUE_TOPIC);
      feed.publish(EVENTS_TOPIC);
    };
    const abandonRenewalConnection = database.abandonRenewalConnection;
    const manager = createLeaseManager({
      ...(overrides.dispatchHangMs ? { dispatchHangMs: overrides.dispatchHangMs } : {}),
      databaseUnreachable: () => databaseUnreachable,
      // A renewal that hangs is a database lost (PostgreSQL; PGlite runs in this process).
      ...(timers && abandonRenewalConnection && database.ping
        ? {
            renewalHung: {
              hung: (cause: Error) => {
                // Not queued behind it: the next renewal runs on a fresh connection.
                abandonRenewalConnection();
                databaseLost(
                  "renewal",
                  cause,
                  "database unreachable: a renewal got no answer; NOT_SERVING, and renewing on a fresh connection",
                );
              },
              back: () => databaseBack("renewal"),
            },
          }
        : {}),
      db,
      ...(renewalDb ? { renewalDb } : {}),
      clock,
      feed,
      log,
      metrics,
      serverId,
      gracePeriodMs: config.gracePeriodMs,
      heartbeatIntervalMs: config.heartbeatIntervalMs,
      maxSilenceMs: config.maxSilenceMs,
      workerRetentionMs: config.workerRetentionMs,
      rebalanceMs: config.rebalanceIntervalMs,
      partitionShare: config.partitionShare,
      dispatchPollMs: config.dispatchPollMs,
      alone: database.driver === "pglite",
      ...(limits.grantWindow ? { grantWindow: limits.grantWindow } : {}),
      ...(limits.grantHighWaterBytes ? { grantHighWaterBytes: limits.grantHighWaterBytes } : {}),
      ...(limits.fencedEventsWindowMs ? { fencedEventsWindowMs: limits.fencedEventsWindowMs } : {}),
      ...(limits.grantAckLimitMs ? { grantAckLimitMs: limits.grantAckLimitMs } : {}),
      ...(bus ? { bus } : {}),
      timers,
      tracing,
    });
    leases = manager;
    cleanup.push(waitsForDatabase("the reports, grants and renewals in flight", () => manager.close()));
    const actions = createActionService({
      db,
      clock,
      feed,
      submitted: metrics.submitted,
      hostedGrants: () => ({ serverId, grantsStopped: manager.grantsStopped() }),
      onCancelRequested: (action) => {
        if (action.sessionId) {
          manager.revoke(
            action.sessionId,
            { actionId: action.id, epoch: action.epoch },
            "CANCELLED",
            action.failureReason,
          );
        }
      },
    });
    cleanup.push(waitsForDatabase("the submissions in flight", () => actions.close()));
    const events = createEventService({ db, feed });
    const scope = createScopeLeaseService({
      db,
      clock,
      feed,
      log,
      holders: manager,
      limits: {
        defaultTtlMs: config.leaseDefaultTtlMs,
        maxTtlMs: config.leaseMaxTtlMs,
        maxFileBytes: config.maxFileBytes,
      },
    });
    cleanup.push(waitsForDatabase("the scope lease expiries in flight", () => scope.close()));
    // The restart extension (rule 6): now + grace, where now is after the bind above.
    const [started] = await queryRows<{ now: unknown }>(db, sql`select ${clock.now()} as now`);
    await manager.start();
    // Leases whose TTL passed while no server ran are rolled back now, then every second.
    await scope.expireDue();
    if (timers) scope.start();
    const history = createHistoryKeeper({
      db,
      clock,
      log,
      retentionMs: config.historyRetentionMs,
      removed: metrics.historyRemoved,
    });
    cleanup.push(async () => history.close());
    if (timers) history.start();

    if (front.metricsServer) {
      const served = front.metricsServer;
      served.use(metrics.registry);
      // Its gauges read this start's database: a start done again serves the port's metrics meanwhile.
      cleanup.push(async () => served.use(front.callMetrics.registry));
    }

    const hellos = countHellos(manager);
    // The API every client reads; the console serves the same implementations but the agents' stream.
    const api = [
      actionServiceBinding(actions, tracing, log),
      eventServiceBinding(events),
      clusterServiceBinding({ db, clock, leases: manager, feed, log }),
      leaseServiceBinding(scope, events),
      resourceServiceBinding(scope),
    ];
    gate.open([
      ...api,
      workerServiceBinding(hellos.counted, log, {
        stalledStreamMs: Math.round(config.gracePeriodMs / 2),
        ...limits,
      }),
    ]);

    let consoleServer: ConsoleServer | undefined;
    if (config.consoleListen) {
      const { host, port } = parseListen(config.consoleListen, "--console-listen");
      consoleServer = await serveConsole({
        host,
        port,
        services: api,
        log: log.child({ component: "console" }),
        authenticator,
        onRefused: refusalLogger(log),
        streams: rpc.streams,
        tls: security.tls?.material,
        maxRequestBytes: config.maxFileBytes + 1024 * 1024,
        // Request bodies still arriving share the port's budget and stall rule.
        requestBodies: rpc.partialRequests,
        // One peer address's connections are bounded across both ports (--max-connections-per-address).
        connections: rpc.connections,
        ...(limits.requestStallMs ? { requestStallMs: limits.requestStallMs } : {}),
        ...(overrides.consoleStaticDir ? { staticDir: overrides.consoleStaticDir } : {}),
      }).catch((error: unknown) => {
        throw listenFailure("--console-listen", config.consoleListen as string, error);
      });
      cleanup.push((consoleServer as ConsoleServer).close);
    }
    // A stop asked for while it started (SIGTERM once the database answered) wins: the caller
    // closes what this returns at once, and health never says SERVING of a process that is stopping.
    const stopAsked = () => overrides.signal?.aborted === true;
    if (!databaseUnreachable && !stopAsked()) rpc.markServing();
    if (stopAsked()) log.info("started as a stop was asked for; not serving");
    else
      log.info(
        {
          port: rpc.port,
          listen: config.listen,
          metricsPort: front.metricsServer?.port,
          console: consoleServer?.url,
          version: packageVersion(),
          commit: buildCommit(),
        },
        "leasehold serving",
      );
    // PGlite runs in this process: it cannot become unreachable, only busy.
    if (timers && database.ping) {
      // The rule that tells an outage from a busy process is in database-watch.ts.
      const watch = watchDatabase(database.ping, {
        everyMs: config.heartbeatIntervalMs,
        lost: (cause) =>
          databaseLost(
            "checks",
            cause,
            cause instanceof ReadOnlyDatabase
              ? "database unreachable for writes (read-only); NOT_SERVING until it takes writes again"
              : "database unreachable; NOT_SERVING until it answers again",
          ),
        back: () => databaseBack("checks"),
        checked: (check, startedAtMs) => {
          // Even one failed check: the deadlines stored meanwhile may be stale (see databaseChecked).
          manager.databaseChecked(check.ok, !check.ok && check.kind === "timeout" ? startedAtMs : undefined);
          // While it lasts, calls are refused naming what the latest check met, not the first one
          // (a database shutting down, then stopped: the connection is refused by then).
          if (!check.ok && databaseUnreachable) gate.pause(check.cause.message);
          overrides.onDatabaseCheck?.(check);
        },
      });
      cleanup.push(async () => watch.stop());
    }

    if (timers) {
      const takeBack = keepExtendingWhileTakingBack({
        db,
        clock,
        since: toDate(started?.now),
        graceMs: config.gracePeriodMs,
        maxSilenceMs: config.maxSilenceMs,
        recentHellos: hellos.recent,
        log,
      });
      cleanup.push(async () => takeBack.stop());
    }

    const close = () => {
      closing ??= (async () => {
        // While the streams are open: every worker's deadline is made to count a whole grace
        // period from its last heartbeat here, so that a restart shorter than that re-runs nothing.
        // NOT_SERVING first: agents looking for a server go to another one meanwhile.
        rpc.markNotServing();
        const handOverMs = overrides.handOverMs ?? Math.round(1.5 * config.heartbeatIntervalMs);
        const started = performance.now();
        try {
          const { handedOver, streams } = await manager.handOver(handOverMs);
          if (streams > 0) {
            log.info(
              { handedOver, streams, ms: Math.round(performance.now() - started) },
              databaseUnreachable && handedOver === 0
                ? `handed over none of ${streams} worker streams: the database is unreachable, so no deadline could be stored afresh`
                : `handed over ${handedOver} of ${streams} worker streams`,
            );
          }
        } catch (error) {
          log.warn({ err: error }, "the handover failed; ending the worker streams as they are");
        }
        // Reverse order of start, except that the front door closes first
        // (it was bound first only so that agents can reconnect early).
        await rpc.close();
        settleBy = performance.now() + (overrides.shutdownWaitMs ?? SHUTDOWN_WAIT_MS);
        await unwind();
        log.info("leasehold stopped");
      })();
      return closing;
    };
    return {
      port: rpc.port,
      metricsPort: front.metricsServer?.port,
      consolePort: consoleServer?.port,
      serverId,
      leases: manager,
      scope,
      history,
      metrics,
      security,
      close,
      [Symbol.asyncDispose]: close,
    };
  } catch (error) {
    if (config.databaseUrl && !overrides.signal?.aborted && isTransientConnectError(error)) {
      // This attempt's part only: the port and its security stay.
      for (const fn of cleanup.splice(1).reverse()) await fn().catch(() => {});
      log.warn({ err: error, attempt }, "database lost while starting; starting again behind the open port");
      // The first wait's backoff; an abort ends the wait, and the start below.
      await retryDelay(attempt, overrides.signal).catch(() => {});
      if (!overrides.signal?.aborted) return startBehindPort(front, attempt + 1);
    }
    // Stopped while it waited to start again: that is why it stops, not the lost database.
    const reason = overrides.signal?.aborted ? overrides.signal.reason : error;
    gate.close(
      new LeaseholdError(Code.Unavailable, "the server stopped before it was ready; retry", {
        reason: "SHUTTING_DOWN",
      }),
    );
    await rpc.close();
    await unwind();
    throw reason;
  }
}

/** Whether `error` is a port that could not be bound, as Node (and createRpcServer) report it. */
function isListenError(error: unknown): boolean {
  return (error as { syscall?: unknown } | null)?.syscall === "listen";
}

/**
 * A port that could not be bound, named by its flag (address in use, not an
 * address of this machine): a usage error, like a flag's malformed address.
 */
function listenFailure(option: string, address: string, error: unknown): LeaseholdError {
  const why =
    (error as { code?: unknown } | null)?.code === "EADDRINUSE"
      ? "address already in use (another process listens there); choose another port, or stop that process"
      : errorText(error);
  return LeaseholdError.invalidArgument(option, `cannot listen on ${address}: ${why}`);
}

/** An error's message with its code, e.g. `connect ECONNREFUSED 127.0.0.1:5432 (ECONNREFUSED)`. */
function errorText(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" && !message.includes(code) ? `${message} (${code})` : message;
}

/** A permanent error opening the database: what failed, where, and that waiting will not fix it. */
function openFailure(url: string, error: unknown): LeaseholdError {
  return new LeaseholdError(
    Code.FailedPrecondition,
    `cannot use the database at ${redactUrl(url)}: ${errorText(error)}; check --database-url (not retrying: this is not an outage)`,
    { cause: error },
  );
}

/**
 * The lease manager with its `open` counted. `recent()` says how many hellos
 * this process accepted since the last call, plus those accepted before it
 * and not answered yet: hellos that arrive together are answered within
 * milliseconds (one transaction for all), so a reconnect storm shows in what
 * arrived between two looks, not in what waits at one instant.
 */
function countHellos(manager: LeaseManager): { counted: LeaseManager; recent(): number } {
  let waiting = 0;
  let arrived = 0;
  const open: LeaseManager["open"] = async (hello, link, principal, mayRunIn) => {
    waiting += 1;
    arrived += 1;
    try {
      return await manager.open(hello, link, principal, mayRunIn);
    } finally {
      waiting -= 1;
    }
  };
  // A proxy, not a copy: whatever else the manager has (getters, methods using `this`) stays its own.
  const counted = new Proxy(manager, {
    get(target, property) {
      if (property === "open") return open;
      const value: unknown = Reflect.get(target, property, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return {
    counted,
    recent: () => {
      const n = Math.max(waiting, arrived);
      arrived = 0;
      return n;
    },
  };
}

/**
 * Taking agents back after a restart (SPEC rule 6, for large fleets). The
 * extension at start gives every live session until now + grace; thousands of
 * agents that reconnect at once within that grace may still wait longer than
 * it for their hello to be served (hellos arriving together share a
 * transaction, but the process also answers the heartbeats of the agents
 * already back), and a session whose hello is served after its
 * deadline is reaped (or kept only while the mass-disconnect valve holds,
 * which lets go once half the cluster is back). So, every grace/2 after the
 * process serves, while hellos keep coming to this process (one arrived since
 * the last look, or one is still waiting), the sessions not heard from since
 * it started get now + grace again. It stops for good at the first look
 * with no hello since the last, or with no session left to extend: from
 * then on a session whose agent has not come back expires at its deadline as
 * usual. The maximum silence still caps
 * it (sessions silent longer get nothing), so a dead worker's leases are held
 * at most that long even through a storm that never ends.
 */
function keepExtendingWhileTakingBack(deps: {
  db: Db;
  clock: Clock;
  since: Date;
  graceMs: number;
  maxSilenceMs: number;
  /** Hellos accepted since the last call, or still waiting. */
  recentHellos: () => number;
  log: Logger;
}): { stop(): void } {
  let rounds = 0;
  let extended = 0;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const finish = () => {
    if (rounds > 0) {
      deps.log.info(
        { rounds, extended },
        "agents taken back after the restart; sessions not back expire as usual",
      );
    }
  };
  const look = async () => {
    if (stopped) return;
    const hellos = deps.recentHellos();
    if (hellos === 0) return finish();
    try {
      const n = await extendAwaitedSessions(deps.db, deps.clock, deps.since, deps);
      // Nobody left to wait for (all back, or silent past the maximum), or nobody to take back at
      // all (a fresh database, whose first agents' hellos come here too): nothing to log.
      if (n === 0) return finish();
      rounds += 1;
      extended += n;
      if (rounds === 1) {
        deps.log.info(
          { hellosSinceLastLook: hellos, sessions: n, graceMs: deps.graceMs },
          "still taking agents back after the restart; extended the sessions not back yet",
        );
      }
    } catch (error) {
      deps.log.warn({ err: error }, "could not extend the sessions not back yet; trying again");
    }
    if (!stopped) {
      timer = setTimeout(look, deps.graceMs / 2);
      timer.unref();
    }
  };
  timer = setTimeout(look, deps.graceMs / 2);
  timer.unref();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/** Warns when PostgreSQL will not vacuum Leasehold's tables ({@link vacuumShortfalls}). */
async function warnOfNoVacuum(db: Db, log: Logger): Promise<void> {
  try {
    const found = await vacuumShortfalls(db);
    if (found.length > 0)
      log.warn(
        { found },
        `PostgreSQL will not vacuum Leasehold's tables (${found.join("; ")}): rows removed past --history-retention and every update leave dead row versions, so the database's files grow without bound; turn autovacuum on, or run VACUUM (ANALYZE) on a schedule (README, PostgreSQL requirements)`,
      );
  } catch (error) {
    log.debug({ err: error }, "could not read the database's vacuum settings");
  }
}

/**
 * Warns when the database lets this process open fewer connections than it
 * may use ({@link connectionShortfalls}).
 */
async function warnOfConnectionLimits(db: Db, poolSize: number, log: Logger): Promise<void> {
  try {
    for (const { limit, needed, what } of await connectionShortfalls(db, poolSize))
      log.warn(
        { limit, needed, poolSize },
        `the database allows ${limit} connections (${what}), fewer than this process may open (${needed}: --database-pool-size ${poolSize} and 3 of its own), before any other process's: calls will fail under load with "the database accepts no connection now"; raise the limit, or lower --database-pool-size`,
      );
  } catch (error) {
    log.debug({ err: error }, "could not read the database's connection limits");
  }
}
