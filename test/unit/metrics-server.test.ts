import { createServer } from "node:net";
import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { serveMetrics } from "../../src/metrics.js";

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
});
