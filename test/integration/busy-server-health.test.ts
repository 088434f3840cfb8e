import { describe, expect, it } from "vitest";
import type { DatabaseCheck } from "../../src/store/database-watch.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { startTestServer } from "../helpers/server.js";

/** Keeps this thread (the server's event loop, in this process) busy for `ms`. */
function blockEventLoop(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until) {
    // busy, as a loop saturated by thousands of streams is
  }
}

const UNREACHABLE = "database unreachable; NOT_SERVING until it answers again";

// PostgreSQL (every run but CI's PGlite pass): PGlite runs in this process and has no health watch.
describe.runIf(runsPostgresTests())(
  "a server whose event loop is overloaded while PostgreSQL is fine",
  () => {
    it("stays SERVING and logs no outage when its loop is blocked longer than the check's timeout", async () => {
      await using store = await freshPostgresDatabase();
      const checks: DatabaseCheck[] = [];
      let wake: (() => void) | undefined;
      const checksAtLeast = async (n: number) => {
        while (checks.length < n) await new Promise<void>((resolve) => (wake = resolve));
      };
      await using t = await startTestServer({
        store,
        config: { heartbeatInterval: "250ms", gracePeriod: "10s" },
        overrides: {
          onDatabaseCheck: (check) => {
            checks.push(check);
            wake?.();
          },
        },
      });
      const health = healthClient(t.address);
      try {
        expect(await health.check()).toBe("SERVING");
        await checksAtLeast(1);
        // Six times the timeout, three times over, with one loop turn (and its I/O) between.
        for (let i = 0; i < 3; i++) {
          blockEventLoop(1500);
          await new Promise((resolve) => setImmediate(resolve));
        }
        await checksAtLeast(checks.length + 3);
        expect(checks.filter((c) => !c.ok)).toEqual([]);
        expect(await health.check()).toBe("SERVING");
        expect(t.logs.filter((l) => l.msg === UNREACHABLE)).toEqual([]);
      } finally {
        health.close();
      }
    });
  },
);
