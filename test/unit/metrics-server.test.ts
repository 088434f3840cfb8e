import { createServer } from "node:net";
import { Gauge, Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { addProcessMetrics, createCallMetrics, serveMetrics } from "../../src/metrics.js";

describe("the metrics endpoint", () => {
  it("serves /metrics with a query string, and names --metrics-listen when its address is taken", async () => {
    const served = await serveMetrics(new Registry(), "127.0.0.1", 0);
    try {
      const response = await fetch(`http://127.0.0.1:${served.port}/metrics?debug=1`);
      expect(response.status).toBe(200);
      expect((await fetch(`http://127.0.0.1:${served.port}/other`)).status).toBe(404);
    } finally {
      await served.close();
    }
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
    const port = (taken.address() as { port: number }).port;
    try {
      await expect(serveMetrics(new Registry(), "127.0.0.1", port)).rejects.toThrow(
        `--metrics-listen: cannot listen on 127.0.0.1:${port} (another process uses it); choose another address, or --metrics-listen off`,
      );
    } finally {
      taken.close();
    }
  });

  it("writes NaN as the Prometheus text format spells it, types the CPU time a counter, and says the console's connections count", async () => {
    const { registry } = createCallMetrics();
    const stopSampling = addProcessMetrics(registry);
    new Gauge({
      name: "unanswered",
      help: "A gauge the database did not answer.",
      registers: [registry],
    }).set(Number.NaN);
    const served = await serveMetrics(registry, "127.0.0.1", 0);
    try {
      const lines = (await (await fetch(`http://127.0.0.1:${served.port}/metrics`)).text()).split("\n");
      expect(lines).toContain("unanswered NaN");
      expect(lines.filter((line) => / Nan$/.test(line))).toEqual([]);
      expect(lines).toContain("# TYPE process_cpu_seconds_total counter");
      expect(lines.find((line) => line.startsWith("# HELP leasehold_connections_open "))).toMatch(
        /gRPC port and the console/,
      );
    } finally {
      await served.close();
      stopSampling();
    }
  });

  it("exports the event loop's lateness as a summary, the type Prometheus reserves the quantile label for", async () => {
    const registry = new Registry();
    const stopSampling = addProcessMetrics(registry);
    const served = await serveMetrics(registry, "127.0.0.1", 0);
    try {
      // Wait for the sampler's first samples (every 10 ms), not a fixed time.
      const scrape = async () =>
        (await (await fetch(`http://127.0.0.1:${served.port}/metrics`)).text()).split("\n");
      let lines = await scrape();
      while (!lines.some((line) => /^nodejs_eventloop_delay_seconds_count [1-9]/.test(line))) {
        await new Promise((resolve) => setImmediate(resolve));
        lines = await scrape();
      }
      expect(lines).toContain("# TYPE nodejs_eventloop_delay_seconds summary");
      for (const quantile of ["0.5", "0.99", "1"])
        expect(
          lines.some((line) => line.startsWith(`nodejs_eventloop_delay_seconds{quantile="${quantile}"} `)),
        ).toBe(true);
      expect(lines.some((line) => /^nodejs_eventloop_delay_seconds_sum \d/.test(line))).toBe(true);
    } finally {
      await served.close();
      stopSampling();
    }
  });

  it("exports the JavaScript heap beside resident memory, to tell a leak from churn", async () => {
    const registry = new Registry();
    const stopSampling = addProcessMetrics(registry);
    try {
      const text = await registry.metrics();
      const value = (name: string) => Number(new RegExp(`^${name} (\\d+)$`, "m").exec(text)?.[1]);
      const used = value("nodejs_heap_size_used_bytes");
      const total = value("nodejs_heap_size_total_bytes");
      expect(used).toBeGreaterThan(0);
      expect(total).toBeGreaterThanOrEqual(used);
      expect(value("nodejs_external_memory_bytes")).toBeGreaterThan(0);
      expect(value("process_resident_memory_bytes")).toBeGreaterThan(total);
    } finally {
      stopSampling();
    }
  });
});
