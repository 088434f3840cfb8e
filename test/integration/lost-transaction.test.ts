import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Database, IDLE_TRANSACTION_TIMEOUT_MS, openDatabase } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";

// PGlite serves one process: no other process can be lost while holding its locks.
describe.runIf(runsPostgresTests())("a process lost in the middle of a transaction", () => {
  let store: TestStore;
  const opened: Database[] = [];
  beforeAll(async () => {
    store = await freshPostgresDatabase();
  });
  afterAll(async () => {
    for (const database of opened) await database.close();
    await store?.drop();
  });

  const open = async () => {
    const database = await openDatabase({ url: store.url, dataDir: "" });
    opened.push(database);
    return database;
  };

  it("holds its row locks for a few seconds at most, not until TCP gives up", async () => {
    const lost = await open();
    const other = await open();
    const [settings] = await queryRows<{ idle: string; keepalive: string; tcp: boolean }>(
      other.db,
      sql`select current_setting('idle_in_transaction_session_timeout') as idle,
                 current_setting('tcp_keepalives_idle') as keepalive,
                 inet_client_addr() is not null as tcp`,
    );
    expect(settings?.idle).toBe(`${IDLE_TRANSACTION_TIMEOUT_MS / 1000}s`);
    // Keepalives apply to TCP only: over a Unix socket PostgreSQL reports 0.
    if (settings?.tcp) expect(settings.keepalive).toBe("30");
    await other.db.execute(sql`insert into clusters (name) values ('locked')`);

    // The lost process locked the row, then stopped between two statements: it never commits.
    const rowLocked = deferred();
    const never = deferred();
    const stuck = lost.db
      .transaction(async (t) => {
        await t.execute(sql`select name from clusters where name = 'locked' for update`);
        rowLocked.resolve();
        await never.promise;
        await t.execute(sql`select 1`);
      })
      .then(
        () => "committed",
        (error: unknown) => (error as { code?: string }).code ?? String(error),
      );
    await rowLocked.promise;

    // Another process's statement on that row waits for the lock, then gets it once PostgreSQL
    // has ended the idle transaction.
    const started = performance.now();
    await other.db.execute(
      sql`update clusters set health_reason = 'after the lost one' where name = 'locked'`,
    );
    expect(performance.now() - started).toBeGreaterThan(IDLE_TRANSACTION_TIMEOUT_MS / 2);
    never.resolve();
    // The lost transaction committed nothing: its next statement finds the session ended (25P03).
    expect(await stuck).not.toBe("committed");
  }, 30_000);
});
