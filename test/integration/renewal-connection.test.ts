import { sql } from "drizzle-orm";
import postgres from "postgres";
import { afterEach, describe, expect, it } from "vitest";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/** The pool's size (database.ts): this many client statements take every pooled connection. */
const POOL_SIZE = 10;

// PGlite has one connection for everything: only PostgreSQL has a pool to fill.
describe.runIf(runsPostgresTests())("session renewal on PostgreSQL", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("renews on a connection of its own while client calls hold every pooled connection", async () => {
    const store: TestStore = await freshPostgresDatabase();
    cleanups.push(() => store.drop());
    let db: Db | undefined;
    const t: TestServer = await startTestServer({
      store,
      config: { heartbeatInterval: "2s", gracePeriod: "10s" },
      overrides: { timers: false, wrapDb: (d) => (db = d) },
    });
    cleanups.push(() => t.stop());
    const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
    cleanups.push(() => w.drop());
    const deadlineMs = sql`select (extract(epoch from deadline) * 1000)::float8 as ms from sessions where id = ${w.welcome.sessionId}`;
    const [before] = await queryRows<{ ms: number }>(db as Db, deadlineMs);

    // A lock held elsewhere, and as many statements waiting for it as the pool has connections.
    const holder = postgres(store.url as string, { max: 1, onnotice: () => {} });
    cleanups.push(() => holder.end());
    await holder`select pg_advisory_lock(4242)`;
    // Started now (a drizzle query runs when it is awaited).
    const waiting = Array.from({ length: POOL_SIZE }, () =>
      Promise.resolve((db as Db).execute(sql`select pg_advisory_xact_lock(4242)`)),
    );
    for (;;) {
      const [row] = await holder<{ n: number }[]>`
        select count(*)::int as n from pg_stat_activity
        where datname = current_database() and wait_event_type = 'Lock'`;
      if (row?.n === POOL_SIZE) break;
      await new Promise<void>((resolve) => setImmediate(resolve));
    }

    // On the pool it would wait behind them for as long as the lock is held.
    await t.server.leases.tick.renew();
    // Read on the holder's connection: the server's pool is still full.
    const [after] = await holder<{ ms: number }[]>`
      select (extract(epoch from deadline) * 1000)::float8 as ms from sessions where id = ${w.welcome.sessionId}`;
    expect(after?.ms).toBeGreaterThan(before?.ms ?? Number.POSITIVE_INFINITY);

    await holder`select pg_advisory_unlock(4242)`;
    await Promise.all(waiting);
  });
});
