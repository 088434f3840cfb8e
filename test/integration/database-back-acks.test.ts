import { afterEach, describe, expect, it } from "vitest";
import { type CuttableProxy, cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const ms = (d: { seconds: bigint; nanos: number } | undefined) =>
  Number(d?.seconds ?? 0n) * 1000 + (d?.nanos ?? 0) / 1e6;

/**
 * HeartbeatAck.database_unreachable once the database answers again: the
 * database watch (health) decides at its next check, up to an interval later,
 * but an ack that carries a renewal stored meanwhile must not say the
 * database is gone. PostgreSQL only: PGlite has no watch.
 */
describe.runIf(runsPostgresTests())("heartbeat acks when the database comes back", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  const until = async (done: () => boolean, what: string) => {
    const by = Date.now() + 20_000;
    while (!done()) {
      if (Date.now() > by) throw new Error(`timed out waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  };

  it("say it answers on the ack of the first renewal stored, before the watch's next check, and not after it fails again", async () => {
    const store = await freshPostgresDatabase();
    cleanups.push(() => store.drop());
    const url = new URL(store.url as string);
    const proxy: CuttableProxy = await cuttableProxy(url.hostname, Number(url.port || 5432));
    cleanups.push(() => proxy.close());
    url.host = `127.0.0.1:${proxy.port}`;
    /** The watch's checks, in order. */
    const checks: boolean[] = [];
    const server: TestServer = await startTestServer({
      store: { ...store, url: url.toString() },
      // Checks every 5 s; a failed renewal is tried again every 1.25 s, well before a busy
      // machine could delay it to the next check.
      config: { gracePeriod: "20s", heartbeatInterval: "5s" },
      overrides: { onDatabaseCheck: (check) => checks.push(check.ok) },
    });
    cleanups.push(() => server.stop());
    const w: TestWorker = await connectWorker(server.address, {
      workerId: "w1",
      cluster: "east",
      capacity: 1,
    });
    cleanups.push(() => w.drop());
    expect((await w.heartbeat(1)).databaseUnreachable).toBe(false);

    proxy.cut();
    await until(
      () => server.logs.some((l) => String(l.msg).startsWith("database unreachable")),
      "the outage to be noticed",
    );
    const sentAt = performance.now();
    expect((await w.heartbeat(2)).databaseUnreachable).toBe(true);
    // Back just after a failed check: the next check is an interval away, the renewal's retry a
    // quarter of one, and its ack of heartbeat 2 comes first.
    const failed = checks.length;
    await until(() => checks.length > failed, "a check");
    proxy.restore();
    const again = await w.next("heartbeatAck", (a) => a.sequence === 2n);
    expect(checks.slice(failed).includes(true), "the watch saw the database before the renewal did").toBe(
      false,
    );
    // A deadline stored afresh from heartbeat 2: a whole grace period (20 s) from when it was
    // heard, less a margin for the clocks' readings.
    expect(ms(again.remaining)).toBeGreaterThan(20_000 - (performance.now() - sentAt) - 1_000);
    expect(again.databaseUnreachable).toBe(false);
    expect((await w.heartbeat(3)).databaseUnreachable).toBe(false);

    // Gone again before the watch saw it back: its next failed check says so again.
    proxy.cut();
    const flapped = checks.length;
    await until(() => checks.length > flapped, "a check");
    expect(checks.slice(flapped)).not.toContain(true);
    expect((await w.heartbeat(4)).databaseUnreachable).toBe(true);

    proxy.restore();
    await until(() => checks.at(-1) === true, "a check that succeeds");
    expect((await w.heartbeat(5)).databaseUnreachable).toBe(false);
  }, 90_000);
});
