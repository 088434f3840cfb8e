import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { parseServerConfig } from "../../src/config.js";
import { startServer } from "../../src/server.js";
import { freshStore } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";

describe("a stop asked for while the server starts", () => {
  it("wins once the database answered: the port never turns SERVING and `leasehold serving` is never logged", async () => {
    await using store = await freshStore();
    const config = parseServerConfig({
      listen: "127.0.0.1:0",
      databaseUrl: store.url,
      dataDir: store.dataDir,
      metricsListen: "off",
    });
    // What `leasehold serve` does on SIGTERM before the start is over: abort the start's signal.
    // Here at the line a tester's script sent it on, after the database answered.
    const stop = new AbortController();
    const logs: Record<string, unknown>[] = [];
    const log = pino(
      {},
      {
        write(line: string) {
          const parsed = JSON.parse(line) as Record<string, unknown>;
          logs.push(parsed);
          if (parsed.msg === "database ready") stop.abort(new Error("SIGTERM"));
        },
      },
    );
    const server = await startServer(config, log, { handOverMs: 0, signal: stop.signal });
    const health = healthClient(`127.0.0.1:${server.port}`);
    try {
      expect(await health.check()).toBe("NOT_SERVING");
      expect(logs.map((l) => l.msg)).not.toContain("leasehold serving");
      expect(logs.map((l) => l.msg)).toContain("started as a stop was asked for; not serving");
    } finally {
      health.close();
      await server.close();
    }
  });
});
