import { createServer, type Server } from "node:http";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { Counter, Gauge, Histogram, Registry } from "prom-client";
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
    help: "Clusters marked partitioned whose lease expiries are paused (SPEC rule 10; all processes).",
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
  // A timer every 10 ms; each sample is the time between two of its runs, so the
  // lateness is the sample less the 10 ms. Read and restarted at each scrape.
  const resolutionMs = 10;
  const delay = monitorEventLoopDelay({ resolution: resolutionMs });
  delay.enable();
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
      // NaN before the first sample.
      const seconds = (ns: number) =>
        delay.count > 0 ? Math.max(0, ns / 1e6 - resolutionMs) / 1e3 : Number.NaN;
      this.set({ quantile: "0.5" }, seconds(delay.percentile(50)));
      this.set({ quantile: "0.99" }, seconds(delay.percentile(99)));
      this.set({ quantile: "1" }, seconds(delay.max));
      delay.reset();
    },
  });
  return () => delay.disable();
}

/** Serves `GET /metrics` on its own HTTP port. */
export async function serveMetrics(
  registry: Registry,
  host: string,
  port: number,
): Promise<{ port: number; close(): Promise<void> }> {
  const server: Server = createServer((request, response) => {
    if (request.url !== "/metrics") {
      response.writeHead(404).end("only /metrics is served here\n");
      return;
    }
    registry.metrics().then(
      (text) => response.writeHead(200, { "content-type": registry.contentType }).end(text),
      (error: unknown) => response.writeHead(500).end(`metrics failed: ${String(error)}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  return {
    port: typeof address === "object" && address ? address.port : port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
