import { randomUUID } from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import { sql } from "drizzle-orm";
import type { Logger } from "pino";
import { parseListen, type ServerConfig } from "./config.js";
import { createMetrics, type Metrics, serveMetrics } from "./metrics.js";
import { createRpcServer } from "./rpc/server.js";
import { actionServiceBinding } from "./rpc/services/action-service.js";
import { clusterServiceBinding } from "./rpc/services/cluster-service.js";
import { eventServiceBinding } from "./rpc/services/event-service.js";
import { leaseServiceBinding, resourceServiceBinding } from "./rpc/services/scope-services.js";
import { type WorkerStreamLimits, workerServiceBinding } from "./rpc/services/worker-service.js";
import { createScopeLeaseService, type ScopeLeaseService } from "./scope/scope-lease-service.js";
import { type Clock, databaseClock } from "./store/clock.js";
import { type DatabaseOptions, type Db, openDatabase } from "./store/database.js";
import { queryRows, toNumber } from "./store/rows.js";
import { createActionService } from "./work/action-service.js";
import { createChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "./work/change-feed.js";
import { createPostgresBus } from "./work/cluster-bus.js";
import { createEventService } from "./work/event-service.js";
import { createLeaseManager, type LeaseManager, type LeaseManagerOptions } from "./work/lease-manager.js";

/** A running Leasehold server process. */
export interface LeaseholdServer extends AsyncDisposable {
  /** The port the gRPC server listens on. */
  readonly port: number;
  /** The port of `/metrics`, if served. */
  readonly metricsPort: number | undefined;
  /** This process's id, shown on the sessions it hosts. */
  readonly serverId: string;
  /** The work-lease machinery (tests drive its loops by hand with a fake clock). */
  readonly leases: LeaseManager;
  /** Scope leases (tests run their expiry by hand with a fake clock). */
  readonly scope: ScopeLeaseService;
  readonly metrics: Metrics;
  /**
   * Health NOT_SERVING, stop accepting calls, end open streams, flush
   * pending writes, close the database. Idempotent.
   */
  close(): Promise<void>;
}

/** Test seams; production uses the defaults. */
export interface ServerOverrides {
  /** Clock for lease arithmetic. Default: the database clock. */
  readonly clock?: Clock;
  /** Run the lease loops on timers. Default true. */
  readonly timers?: boolean;
  /** Observes every SQL statement (tests count them). */
  readonly onQuery?: DatabaseOptions["onQuery"];
  /** Wraps the handle every part of the server uses (tests inject faults such as a lost commit). */
  readonly wrapDb?: (db: Db) => Db;
  /** Flow control and stream limits; production uses the defaults (README, "Limits"). */
  readonly limits?: StreamLimits;
}

/** Flow control and stream limits, each defaulted where it is used. */
export interface StreamLimits
  extends Partial<WorkerStreamLimits>,
    Pick<LeaseManagerOptions, "grantWindow" | "grantHighWaterBytes"> {
  /** HTTP/2 streams one connection may hold open (`RpcServerOptions.maxConcurrentStreams`). */
  readonly maxConcurrentStreams?: number;
}

/**
 * The composition root: opens the database (migrating it), builds the
 * services and starts the gRPC server. Health turns SERVING once all of it is
 * up, after live sessions got their restart extension.
 */
export async function startServer(
  config: ServerConfig,
  log: Logger,
  overrides: ServerOverrides = {},
): Promise<LeaseholdServer> {
  const serverId = randomUUID();
  const clock = overrides.clock ?? databaseClock;
  const limits = overrides.limits ?? {};
  const database = await openDatabase({
    url: config.databaseUrl,
    dataDir: config.dataDir,
    ...(overrides.onQuery ? { onQuery: overrides.onQuery } : {}),
  });
  const cleanup: (() => Promise<void>)[] = [() => database.close()];
  const unwind = async () => {
    for (const fn of cleanup.reverse()) await fn().catch(() => {});
  };
  try {
    log.info(
      { driver: database.driver, dataDir: config.databaseUrl ? undefined : config.dataDir },
      "database ready",
    );
    const db = overrides.wrapDb ? overrides.wrapDb(database.db) : database.db;
    // The other processes on this database hear of every change over LISTEN/NOTIFY.
    // PGlite serves one process: there is nobody to tell.
    const bus = database.listen
      ? await createPostgresBus({ db, listen: database.listen, serverId, log })
      : undefined;
    if (bus) cleanup.push(() => bus.close());
    const feed = createChangeFeed(bus);
    let leases: LeaseManager | undefined;
    const metrics = createMetrics({
      hosted: () => leases?.stats() ?? { connectedWorkers: 0, leasesHeld: 0 },
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
    });
    const manager = createLeaseManager({
      db,
      clock,
      feed,
      log,
      metrics,
      serverId,
      gracePeriodMs: config.gracePeriodMs,
      heartbeatIntervalMs: config.heartbeatIntervalMs,
      maxSilenceMs: config.maxSilenceMs,
      partitionShare: config.partitionShare,
      dispatchPollMs: config.dispatchPollMs,
      ...(limits.grantWindow ? { grantWindow: limits.grantWindow } : {}),
      ...(limits.grantHighWaterBytes ? { grantHighWaterBytes: limits.grantHighWaterBytes } : {}),
      ...(bus ? { bus } : {}),
      timers: overrides.timers ?? true,
    });
    leases = manager;
    cleanup.push(() => manager.close());
    const actions = createActionService({
      db,
      clock,
      feed,
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
    cleanup.push(() => actions.close());
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
    cleanup.push(() => scope.close());
    await manager.start();
    // Leases whose TTL passed while no server ran are rolled back now, then every second.
    await scope.expireDue();
    if (overrides.timers ?? true) scope.start();

    let metricsPort: number | undefined;
    if (config.metricsListen) {
      const { host, port } = parseListen(config.metricsListen, "--metrics-listen");
      const served = await serveMetrics(metrics.registry, host, port);
      metricsPort = served.port;
      cleanup.push(() => served.close());
    }

    const rpc = await createRpcServer(config.listen, grpc.ServerCredentials.createInsecure(), {
      log,
      // Room for the largest file plus the rest of its request.
      maxReceiveMessageBytes: config.maxFileBytes + 1024 * 1024,
      ...(limits.maxConcurrentStreams ? { maxConcurrentStreams: limits.maxConcurrentStreams } : {}),
      services: [
        actionServiceBinding(actions),
        eventServiceBinding(events),
        workerServiceBinding(manager, log, { stalledStreamMs: config.gracePeriodMs, ...limits }),
        clusterServiceBinding({ db, clock, leases: manager, feed }),
        leaseServiceBinding(scope, events),
        resourceServiceBinding(scope),
      ],
    });
    cleanup.push(() => rpc.close());
    rpc.markServing();
    log.info({ port: rpc.port, listen: config.listen, metricsPort, serverId }, "leasehold serving");
    // PGlite runs in this process: it cannot become unreachable, only busy.
    if ((overrides.timers ?? true) && database.ping) {
      const watch = watchDatabase(database.ping, config.heartbeatIntervalMs, log, {
        lost: () => rpc.markNotServing(),
        back: () => {
          rpc.markServing();
          // Whatever was missed while it was gone: look again.
          feed.publish(QUEUE_TOPIC);
          feed.publish(EVENTS_TOPIC);
        },
      });
      cleanup.push(async () => watch.stop());
    }

    let closing: Promise<void> | undefined;
    const close = () => {
      closing ??= (async () => {
        // Reverse order of start: the front door first, the database last.
        await unwind();
        log.info("leasehold stopped");
      })();
      return closing;
    };
    return {
      port: rpc.port,
      metricsPort,
      serverId,
      leases: manager,
      scope,
      metrics,
      close,
      [Symbol.asyncDispose]: close,
    };
  } catch (error) {
    await unwind();
    throw error;
  }
}

/**
 * Checks the database every `everyMs`. While it cannot be reached (two
 * checks in a row fail or get no answer within `everyMs`) the process
 * reports NOT_SERVING (its heartbeat acks already stop extending:
 * they count down from the last persisted deadline, so agents self-fence in
 * time); when it answers again, SERVING. Both changes are logged once.
 */
function watchDatabase(
  ping: () => Promise<void>,
  everyMs: number,
  log: Logger,
  on: { lost(): void; back(): void },
): { stop(): void } {
  let healthy = true;
  let running = false;
  /** Consecutive failed checks: one slow answer under load is not an outage. */
  let failures = 0;
  const timer = setInterval(() => {
    if (running) return;
    running = true;
    let timeout: NodeJS.Timeout | undefined;
    Promise.race([
      ping(),
      new Promise((_, reject) => {
        timeout = setTimeout(() => reject(new Error(`no answer within ${everyMs}ms`)), everyMs);
        timeout.unref();
      }),
    ])
      .then(
        () => {
          failures = 0;
          if (!healthy) {
            healthy = true;
            log.info("database reachable again; serving");
            on.back();
          }
        },
        (error: unknown) => {
          failures += 1;
          if (healthy && failures >= 2) {
            healthy = false;
            log.error({ err: error }, "database unreachable; NOT_SERVING until it answers again");
            on.lost();
          }
        },
      )
      .finally(() => {
        clearTimeout(timeout);
        running = false;
      });
  }, everyMs);
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
