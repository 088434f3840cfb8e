import { createServer, type Server } from "node:http";
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import { Code, LeaseholdError } from "./errors.js";
import type { HostedStats, LeaseMetrics } from "./work/lease-manager.js";

/** The Prometheus metrics of one server process, in a registry of its own. */
export interface Metrics extends LeaseMetrics {
  readonly registry: Registry;
}

/**
 * Creates the metrics. Gauges are read when scraped: `hosted` gives what this
 * process holds, `inGrace` and `pausedClusters` ask the database.
 */
export function createMetrics(sources: {
  hosted: () => HostedStats;
  inGrace: () => Promise<number>;
  pausedClusters: () => Promise<number>;
}): Metrics {
  const registry = new Registry();
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
    name: `${prefix}sessions_in_grace`,
    help: "Worker sessions whose stream is lost and whose deadline has not passed (all processes).",
    registers: [registry],
    async collect() {
      this.set(await sources.inGrace());
    },
  });
  new Gauge({
    name: `${prefix}clusters_expiries_paused`,
    help: "Clusters marked partitioned whose lease expiries are paused (the mass-disconnect valve, --partition-share; all processes).",
    registers: [registry],
    async collect() {
      this.set(await sources.pausedClusters());
    },
  });
  return {
    registry,
    grants: new Counter({
      name: `${prefix}grants_total`,
      help: "Work leases granted.",
      registers: [registry],
    }),
    expiries: new Counter({
      name: `${prefix}lease_expiries_total`,
      help: "Work leases expired at their session's deadline.",
      registers: [registry],
    }),
    fencedReports: new Counter({
      name: `${prefix}fenced_reports_total`,
      help: "Worker reports rejected because their (action, epoch) was not the current lease.",
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
 * The process's own health, under the names Prometheus client libraries use:
 * CPU, resident memory, and how late the event loop ran since the last
 * scrape (`nodejs_eventloop_delay_seconds`, quantiles 0.5, 0.99 and 1). A
 * loop that runs late delays every heartbeat ack; this tells it apart from
 * a slow network or a slow client. Returns a function that stops sampling.
 */
export function addProcessMetrics(registry: Registry): () => void {
  const late = createLatenessSampler(10);
  new Gauge({
    name: "process_cpu_seconds_total",
    help: "User and system CPU time spent by this process, in seconds.",
    registers: [registry],
    collect() {
      const { user, system } = process.cpuUsage();
      this.set((user + system) / 1e6);
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
  new Gauge({
    name: "nodejs_eventloop_delay_seconds",
    help: "How late the event loop ran since the last scrape (10 ms sampling), by quantile.",
    labelNames: ["quantile"],
    registers: [registry],
    collect() {
      const window = late.take();
      this.set({ quantile: "0.5" }, window.quantile(0.5) / 1e3);
      this.set({ quantile: "0.99" }, window.quantile(0.99) / 1e3);
      this.set({ quantile: "1" }, window.quantile(1) / 1e3);
    },
  });
  return () => late.stop();
}

/**
 * How late a timer due every `intervalMs` ran, in ms, one sample per run,
 * kept until {@link take} (the newest 30,000 at most: five minutes). Node's
 * `monitorEventLoopDelay` was not used: its reset also forgets when it last
 * ran, so a stall that began right after a scrape went unrecorded.
 */
export function createLatenessSampler(intervalMs: number): {
  /** The samples since the last call, as a window to read quantiles of (NaN when empty). */
  take(): { quantile(q: number): number };
  stop(): void;
} {
  const samples = new Float64Array(30_000);
  let count = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    samples[count % samples.length] = Math.max(0, now - last - intervalMs);
    count++;
    last = now;
  }, intervalMs);
  timer.unref();
  return {
    take() {
      const sorted = samples.slice(0, Math.min(count, samples.length)).sort();
      count = 0;
      return {
        quantile: (q) => sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)] ?? Number.NaN,
      };
    },
    stop: () => clearInterval(timer),
  };
}

/** Serves `GET /metrics` on its own HTTP port. */
export async function serveMetrics(
  registry: Registry,
  host: string,
  port: number,
): Promise<{ port: number; close(): Promise<void> }> {
  const server: Server = createServer((request, response) => {
    // A query string (a scraper's parameters) changes nothing.
    if ((request.url ?? "").split("?")[0] !== "/metrics") {
      response.writeHead(404).end("only /metrics is served here\n");
      return;
    }
    registry.metrics().then(
      (text) => response.writeHead(200, { "content-type": registry.contentType }).end(text),
      (error: unknown) => response.writeHead(500).end(`metrics failed: ${String(error)}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) =>
      reject(
        error.code === "EADDRINUSE" || error.code === "EACCES"
          ? new LeaseholdError(
              Code.FailedPrecondition,
              `--metrics-listen: cannot listen on ${host}:${port} (${error.code === "EADDRINUSE" ? "another process uses it" : "not allowed"}); choose another address, or --metrics-listen off`,
            )
          : error,
      ),
    );
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === "object" && address ? address.port : port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
