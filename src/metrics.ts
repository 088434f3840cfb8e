import { createServer, type Server } from "node:http";
import { Counter, Gauge, Histogram, type MetricValueWithName, Registry, Summary } from "prom-client";
import { LeaseholdError } from "./errors.js";
import type { CallKind, CallObserver } from "./rpc/adapter.js";
import type { ConnectionObserver } from "./rpc/connection-limits.js";
import {
  type ClusterHealth,
  DEGRADED_WORKERS,
  HEALTH_WINDOW_MS,
  UNHEALTHY_WORKERS,
} from "./store/clusters.js";
import type { HostedStats, LeaseMetrics } from "./work/lease-manager.js";

/** The Prometheus metrics of one server process, in a registry of its own. */
export interface Metrics extends LeaseMetrics {
  readonly registry: Registry;
  /** Actions submitted through ActionService: created, or an earlier one answered (a repeated request id). */
  readonly submitted: { inc(labels: { result: "created" | "existing" }, n?: number): void };
  /** Records --history-retention removed, by what they were. */
  readonly historyRemoved: {
    inc(labels: { record: "action" | "scope_lease" | "event" | "cluster" }, n: number): void;
  };
}

/** Queued and leased actions of one cluster, as the database counts them. */
export interface ClusterCounts {
  readonly cluster: string;
  readonly queued: number;
  readonly leased: number;
}

const CLUSTER_HEALTHS: readonly ClusterHealth[] = ["HEALTHY", "DEGRADED", "UNHEALTHY", "PARTITIONED"];

/** How long a scrape waits for each gauge read from the database. */
export const DATABASE_GAUGE_MS = 2_000;

/**
 * `read()`, or undefined when the database fails it or does not answer it
 * within {@link DATABASE_GAUGE_MS}: the scrape goes on without it. A scrape
 * during an outage failed as a whole (HTTP 500), or hung while the database
 * did, and lost every metric of the process exactly when they matter.
 */
async function fromDatabase<T>(read: () => Promise<T>): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), DATABASE_GAUGE_MS);
  });
  try {
    return await Promise.race([read(), late]);
  } catch {
    return undefined;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Creates the metrics. Gauges are read when scraped: `hosted` gives what this
 * process holds, `databaseUp` what it last found of its database, `inGrace`,
 * `pausedClusters` and `actions` ask the database.
 * `base` holds metrics that outlive this set (the gRPC calls', made once per
 * process, before the database is open): they are served with it.
 */
export function createMetrics(
  sources: {
    hosted: () => HostedStats;
    /** Whether this process's last database check found the database answering (the one behind health). */
    databaseUp: () => boolean;
    inGrace: () => Promise<number>;
    pausedClusters: () => Promise<number>;
    actions: () => Promise<readonly ClusterCounts[]>;
    /** Each cluster's stored health (PARTITIONED while the valve holds). */
    clusterHealth: () => Promise<readonly { cluster: string; health: ClusterHealth }[]>;
  },
  base?: Registry,
): Metrics {
  const registry = base ? Registry.merge([base]) : new Registry();
  const prefix = "leasehold_";
  new Gauge({
    name: `${prefix}connected_workers`,
    help: "Workers with an open stream to this process.",
    registers: [registry],
    collect() {
      this.set(sources.hosted().connectedWorkers);
    },
  });
  new Gauge({
    name: `${prefix}leases_held`,
    help: "Work leases held by the workers connected to this process.",
    registers: [registry],
    collect() {
      this.set(sources.hosted().leasesHeld);
    },
  });
  new Gauge({
    name: `${prefix}worker_streams_held_back`,
    help: "Worker streams this process is not reading while too many of their reports are unanswered (a worker reporting faster than its reports commit; worker.proto).",
    registers: [registry],
    collect() {
      this.set(sources.hosted().streamsHeldBack);
    },
  });
  new Gauge({
    name: `${prefix}dispatch_waiting_seconds`,
    help: "How long the lease dispatcher's oldest statement in flight has waited for its answer, 0 if none. It takes milliseconds; while one waits, the completions and releases it settles get no answer and their slots no grant (an error is logged past 30 s).",
    registers: [registry],
    collect() {
      this.set(sources.hosted().dispatchWaitingMs / 1000);
    },
  });
  new Gauge({
    name: `${prefix}database_up`,
    help: "1 while this process finds its database answering, 0 while it does not (it is then NOT_SERVING, and its acks say database_unreachable). Read without asking the database: the gauges that do are NaN meanwhile.",
    registers: [registry],
    collect() {
      this.set(sources.databaseUp() ? 1 : 0);
    },
  });
  new Gauge({
    name: `${prefix}sessions_in_grace`,
    help: "Worker sessions whose stream is lost and whose deadline has not passed (all processes).",
    registers: [registry],
    async collect() {
      this.set((await fromDatabase(sources.inGrace)) ?? Number.NaN);
    },
  });
  new Gauge({
    name: `${prefix}clusters_expiries_paused`,
    help: "Clusters marked partitioned whose lease expiries are paused (the mass-disconnect valve, --partition-share; all processes).",
    registers: [registry],
    async collect() {
      this.set((await fromDatabase(sources.pausedClusters)) ?? Number.NaN);
    },
  });
  new Gauge({
    name: `${prefix}actions`,
    help: "Actions queued (waiting for a worker, including those waiting out a retry backoff) and leased, by cluster (all processes).",
    labelNames: ["cluster", "state"],
    registers: [registry],
    async collect() {
      const counts = (await fromDatabase(sources.actions)) ?? [];
      // A cluster with nothing left drops out instead of keeping its last value.
      this.reset();
      for (const c of counts) {
        this.set({ cluster: c.cluster, state: "QUEUED" }, c.queued);
        this.set({ cluster: c.cluster, state: "LEASED" }, c.leased);
      }
    },
  });
  new Gauge({
    name: `${prefix}cluster_health`,
    help: `Each cluster's health, one series per health (HEALTHY, DEGRADED, UNHEALTHY, PARTITIONED): 1 for the one it is in, 0 for the others. DEGRADED from ${DEGRADED_WORKERS} and UNHEALTHY from ${UNHEALTHY_WORKERS} workers with lease expiries in the last ${HEALTH_WINDOW_MS / 60_000} minutes, as \`clusters list\` counts them (the reapers follow the window within a second or so); PARTITIONED while the mass-disconnect valve holds (all processes).`,
    labelNames: ["cluster", "health"],
    registers: [registry],
    async collect() {
      const clusters = (await fromDatabase(sources.clusterHealth)) ?? [];
      // A cluster deleted drops out instead of keeping its last value.
      this.reset();
      for (const c of clusters)
        for (const health of CLUSTER_HEALTHS)
          this.set({ cluster: c.cluster, health }, c.health === health ? 1 : 0);
    },
  });
  return {
    registry,
    submitted: new Counter({
      name: `${prefix}actions_submitted_total`,
      help: "Actions submitted to this process: result created, or existing (a repeated request_id answered with its earlier action).",
      labelNames: ["result"],
      registers: [registry],
    }),
    reports: countedOnce(
      new Counter({
        name: `${prefix}reports_total`,
        help: "Worker reports answered by this process, by kind (succeeded, failed, released, progress) and result (accepted, fenced, unavailable: the database could not take it).",
        labelNames: ["kind", "result"],
        registers: [registry],
      }),
    ),
    historyRemoved: new Counter({
      name: `${prefix}history_removed_total`,
      help: "Records removed past --history-retention by this process: record action (with its attempts), scope_lease, event (every event removed, those of removed actions and leases included), or cluster (a cluster nothing was left of).",
      labelNames: ["record"],
      registers: [registry],
    }),
    grants: new Counter({
      name: `${prefix}grants_total`,
      help: "Work leases granted.",
      registers: [registry],
    }),
    expiries: new Counter({
      name: `${prefix}lease_expiries_total`,
      help: "Work leases expired with their session, reaped by this process: at its deadline (the worker, or its server process, went silent), or early because a new process of the worker connected while the session's stream was gone (its lease_expired event says cause: restarted; the counter has no labels).",
      registers: [registry],
    }),
    selfFencedReleases: new Counter({
      name: `${prefix}self_fenced_releases_total`,
      help: "Work leases given back by workers that stopped the work on their self-fence (no heartbeat ack before the lease's guaranteed time ran out): work that runs again because a server or its database was out of reach, not counted as expiries.",
      registers: [registry],
    }),
    fencedReports: new Counter({
      name: `${prefix}fenced_reports_total`,
      help: "Worker reports rejected because their (action, epoch) was not the current lease.",
      registers: [registry],
    }),
    streamsMoved: new Counter({
      name: `${prefix}worker_streams_moved_total`,
      help: "Worker streams this process ended (UNAVAILABLE, reason REBALANCING) because it hosted more than its share of the live worker sessions of the server processes on its database.",
      registers: [registry],
    }),
    epochRegressions: new Counter({
      name: `${prefix}epoch_regressions_total`,
      help: "Leases workers listed (in a hello or a heartbeat) at an epoch above the action's stored one, or at the stored one granted to another worker: proof that the database went back in time (restored from an older backup, or a standby promoted after losing commits) without `leasehold db restored`. Each is logged as an error, recorded as an epoch_regression event, and a queued action's epoch raised; a lease the database holds in its place is named, and left to its holder (`leasehold db restored` ends it).",
      registers: [registry],
    }),
    heartbeatAckSeconds: new Histogram({
      name: `${prefix}heartbeat_ack_seconds`,
      help: "Time from receiving a heartbeat to queuing its ack.",
      buckets: [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1],
      registers: [registry],
    }),
  };
}

/**
 * A counter whose children are looked up once per label pair: a report is
 * counted on the hot path, where prom-client would hash the labels each time.
 */
function countedOnce<K extends string, R extends string>(
  counter: Counter<"kind" | "result">,
): { inc(labels: { kind: K; result: R }): void } {
  const children = new Map<string, { inc(): void }>();
  return {
    inc({ kind, result }) {
      const key = `${kind} ${result}`;
      let child = children.get(key);
      if (!child) {
        child = counter.labels({ kind, result });
        children.set(key, child);
      }
      child.inc();
    },
  };
}

/** gRPC status codes as grpc-go's `codes.Code` names them, which dashboards for gRPC servers expect. */
const CODE_NAMES = [
  "OK",
  "Canceled",
  "Unknown",
  "InvalidArgument",
  "DeadlineExceeded",
  "NotFound",
  "AlreadyExists",
  "PermissionDenied",
  "ResourceExhausted",
  "FailedPrecondition",
  "Aborted",
  "OutOfRange",
  "Unimplemented",
  "Internal",
  "Unavailable",
  "DataLoss",
  "Unauthenticated",
];

/**
 * Counts of the calls of Leasehold's services under the names of
 * go-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`
 * by code, `grpc_server_handling_seconds` for unary calls), in a registry of
 * their own: the rpc server exists before the rest of the metrics, and keeps
 * its counts while the rest is built again (a restart behind the port).
 * Health checks and reflection are not counted.
 */
export function createCallMetrics(): {
  readonly registry: Registry;
  readonly calls: CallObserver;
  readonly connections: ConnectionObserver;
} {
  const registry = new Registry();
  const open = new Gauge({
    name: "leasehold_connections_open",
    help: "Client connections open to the gRPC port and the console port of this process.",
    registers: [registry],
  });
  const refused = new Counter({
    name: "leasehold_connections_refused_total",
    help: "Client connections closed as they were accepted: reason per_address (the peer address held --max-connections-per-address) or total (the process held all it takes).",
    labelNames: ["reason"],
    registers: [registry],
  });
  const labelNames = ["grpc_type", "grpc_service", "grpc_method"] as const;
  const started = new Counter({
    name: "grpc_server_started_total",
    help: "Calls started on the server (streams count when they open).",
    labelNames,
    registers: [registry],
  });
  const handled = new Counter({
    name: "grpc_server_handled_total",
    help: "Calls completed on the server, by status code (streams count when they end).",
    labelNames: [...labelNames, "grpc_code"],
    registers: [registry],
  });
  const seconds = new Histogram({
    name: "grpc_server_handling_seconds",
    help: "Time from a unary call's arrival to its answer, in seconds.",
    labelNames,
    buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  const types: Record<CallKind, string> = {
    unary: "unary",
    server_streaming: "server_stream",
    bidi_streaming: "bidi_stream",
  };
  return {
    registry,
    connections: {
      opened: () => open.inc(),
      closed: () => open.dec(),
      refused: (reason) => refused.inc({ reason }),
    },
    calls: {
      method(kind, service, method) {
        const labels = { grpc_type: types[kind], grpc_service: service, grpc_method: method };
        const start = started.labels(labels);
        const time = kind === "unary" ? seconds.labels(labels) : undefined;
        // One child per code seen, made once: a call then costs no label hashing.
        const byCode = new Map<number, { inc(): void }>();
        return {
          started: () => start.inc(),
          ended(code, elapsedSeconds) {
            let child = byCode.get(code);
            if (!child) {
              child = handled.labels({ ...labels, grpc_code: CODE_NAMES[code] ?? String(code) });
              byCode.set(code, child);
            }
            child.inc();
            time?.observe(elapsedSeconds);
          },
        };
      },
    },
  };
}

/**
 * `leasehold_large_calls`: unary calls of 256 KiB or more being served
 * (`state="running"`) and waiting their turn (`state="waiting"`); see
 * rpc/large-calls.ts. Calls that keep waiting mean clients send large
 * requests faster than the process serves them.
 */
export function addLargeCallMetrics(
  registry: Registry,
  largeCalls: { readonly counts: { readonly running: number; readonly waiting: number } },
): void {
  new Gauge({
    name: "leasehold_large_calls",
    help: "Unary calls with requests of 256 KiB or more, served one at a time: running, or waiting their turn.",
    labelNames: ["state"],
    registers: [registry],
    collect() {
      const { running, waiting } = largeCalls.counts;
      this.set({ state: "running" }, running);
      this.set({ state: "waiting" }, waiting);
    },
  });
}

/**
 * `leasehold_unary_calls`: unary calls being served (`state="running"`) and
 * waiting for a turn (`state="waiting"`), against the process's bound (see
 * rpc/unary-calls.ts); `leasehold_unary_calls_refused_total`: calls answered
 * RESOURCE_EXHAUSTED (UNARY_CALLS_OVER_LIMIT) because as many waited as may.
 * Refusals while no one floods the server mean clients send more calls at
 * once than it serves: raise `--max-unary-calls`, or have them send fewer.
 */
export function addUnaryCallMetrics(
  registry: Registry,
  unaryCalls: {
    readonly counts: { readonly running: number; readonly waiting: number };
    readonly refused: number;
  },
): void {
  new Gauge({
    name: "leasehold_unary_calls",
    help: "Unary calls (not worker streams) being served at once, bounded by --max-unary-calls: running, or waiting their turn.",
    labelNames: ["state"],
    registers: [registry],
    collect() {
      const { running, waiting } = unaryCalls.counts;
      this.set({ state: "running" }, running);
      this.set({ state: "waiting" }, waiting);
    },
  });
  new Counter({
    name: "leasehold_unary_calls_refused_total",
    help: "Unary calls refused RESOURCE_EXHAUSTED (UNARY_CALLS_OVER_LIMIT): the process served --max-unary-calls and as many waited as may.",
    registers: [registry],
    collect() {
      this.reset();
      this.inc(unaryCalls.refused);
    },
  });
}

/**
 * The process's own health, under the names Prometheus client libraries use:
 * CPU, resident memory, and how late the event loop ran since the last
 * scrape (`nodejs_eventloop_delay_seconds`, a summary: quantiles 0.5, 0.99 and 1
 * of the window since the last scrape, `_sum` and `_count` since the start). A
 * loop that runs late delays every heartbeat ack; this tells it apart from
 * a slow network or a slow client. Returns a function that stops sampling.
 */
export function addProcessMetrics(registry: Registry): () => void {
  const late = createLatenessSampler(10);
  // A counter, as the name's `_total` says (rate() on it): raised by what was spent since the last scrape.
  let cpuCounted = 0;
  new Counter({
    name: "process_cpu_seconds_total",
    help: "User and system CPU time spent by this process, in seconds.",
    registers: [registry],
    collect() {
      const { user, system } = process.cpuUsage();
      const spent = (user + system) / 1e6;
      if (spent > cpuCounted) this.inc(spent - cpuCounted);
      cpuCounted = Math.max(cpuCounted, spent);
    },
  });
  new Gauge({
    name: "process_resident_memory_bytes",
    help: "Resident memory of this process, in bytes.",
    registers: [registry],
    collect() {
      this.set(process.memoryUsage.rss());
    },
  });
  // The JavaScript heap, under prom-client's default names: a resident size that grows could be the
  // heap (a leak: nodejs_heap_size_used_bytes grows across collections) or memory outside it.
  const heap = (name: string, help: string, read: (m: NodeJS.MemoryUsage) => number) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read(process.memoryUsage()));
      },
    });
  heap("nodejs_heap_size_used_bytes", "JavaScript heap in use, in bytes.", (m) => m.heapUsed);
  heap("nodejs_heap_size_total_bytes", "JavaScript heap allocated, in bytes.", (m) => m.heapTotal);
  heap(
    "nodejs_external_memory_bytes",
    "Memory of objects outside the JavaScript heap that it holds (Buffers and the like), in bytes.",
    (m) => m.external,
  );
  // A summary, not a gauge: Prometheus reserves the `quantile` label for summaries (a gauge with it
  // is refused by some tools and misread by others). prom-client's Summary computes its quantiles from
  // what is observed; this one reads the sampler's window, so `get` is its own.
  registry.registerMetric(
    new (class extends Summary {
      override async get() {
        const window = late.take();
        const name = "nodejs_eventloop_delay_seconds";
        const values: MetricValueWithName<string>[] = [0.5, 0.99, 1].map((q) => ({
          labels: { quantile: q },
          value: window.quantile(q) / 1e3,
        }));
        values.push({ metricName: `${name}_sum`, labels: {}, value: window.totalMs / 1e3 });
        values.push({ metricName: `${name}_count`, labels: {}, value: window.totalCount });
        return { ...(await super.get()), values };
      }
    })({
      name: "nodejs_eventloop_delay_seconds",
      help: "How late the event loop ran (10 ms sampling): quantiles since the last scrape; _sum and _count since the start.",
      percentiles: [0.5, 0.99, 1],
      registers: [],
    }),
  );
  return () => late.stop();
}

/**
 * `leasehold_build_info{version,commit} 1`: which build this process runs, to
 * tell the processes of a rolling upgrade apart (and join on it in queries).
 * The version is the package's, the same in every build of a release; the
 * commit (version.ts, buildCommit) tells builds apart.
 */
export function addBuildInfo(registry: Registry, version: string, commit: string): void {
  new Gauge({
    name: "leasehold_build_info",
    help: "Always 1; version is the leasehold package version this process runs, commit the commit it was built from (unknown when built outside a git checkout; -dirty with local changes).",
    labelNames: ["version", "commit"],
    registers: [registry],
  }).set({ version, commit }, 1);
}

/**
 * How late a timer due every `intervalMs` ran, in ms, one sample per run,
 * kept until {@link take} (the newest 30,000 at most: five minutes). Node's
 * `monitorEventLoopDelay` was not used: its reset also forgets when it last
 * ran, so a stall that began right after a scrape went unrecorded.
 */
export function createLatenessSampler(intervalMs: number): {
  /**
   * The samples since the last call, as a window to read quantiles of (NaN
   * when empty), with the sum and count of every sample since the start.
   */
  take(): { quantile(q: number): number; readonly totalMs: number; readonly totalCount: number };
  stop(): void;
} {
  const samples = new Float64Array(30_000);
  let count = 0;
  let totalMs = 0;
  let totalCount = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    const lateMs = Math.max(0, now - last - intervalMs);
    samples[count % samples.length] = lateMs;
    count++;
    totalMs += lateMs;
    totalCount++;
    last = now;
  }, intervalMs);
  timer.unref();
  return {
    take() {
      const sorted = samples.slice(0, Math.min(count, samples.length)).sort();
      count = 0;
      return {
        quantile: (q) => sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)] ?? Number.NaN,
        totalMs,
        totalCount,
      };
    },
    stop: () => clearInterval(timer),
  };
}

/**
 * `text` with the samples prom-client writes as `Nan` written `NaN`, as the
 * Prometheus text format spells it (a gauge the database did not answer).
 */
function withPrometheusNaN(text: string): string {
  return text.replace(/^([^#\n][^\n]* )Nan$/gm, "$1NaN");
}

/**
 * Serves `GET /metrics` of `registry` on its own HTTP port; `use` serves
 * another registry from then on (the server binds the port before the
 * database opens, and has the metrics that read it only after).
 */
export async function serveMetrics(
  registry: Registry,
  host: string,
  port: number,
): Promise<{ port: number; use(registry: Registry): void; close(): Promise<void> }> {
  let served = registry;
  const server: Server = createServer((request, response) => {
    // A query string (a scraper's parameters) changes nothing.
    if ((request.url ?? "").split("?")[0] !== "/metrics") {
      response.writeHead(404).end("only /metrics is served here\n");
      return;
    }
    const scraped = served;
    scraped.metrics().then(
      (text) => response.writeHead(200, { "content-type": scraped.contentType }).end(withPrometheusNaN(text)),
      (error: unknown) => response.writeHead(500).end(`metrics failed: ${String(error)}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) =>
      reject(
        error.code === "EADDRINUSE" || error.code === "EACCES"
          ? LeaseholdError.invalidArgument(
              "--metrics-listen",
              `cannot listen on ${host}:${port} (${error.code === "EADDRINUSE" ? "another process uses it" : "not allowed"}); choose another address, or --metrics-listen off`,
            )
          : error,
      ),
    );
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === "object" && address ? address.port : port,
    use: (next) => {
      served = next;
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
