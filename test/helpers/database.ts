import { randomBytes } from "node:crypto";
import { cpSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { sql } from "drizzle-orm";
import postgres from "postgres";
import { afterAll, beforeAll, inject } from "vitest";
import { type Database, type Db, openDatabase } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { scratchDir } from "./scratch.js";

/** Where a test's server keeps its state: a fresh PostgreSQL database or a fresh PGlite directory. */
export interface TestStore extends AsyncDisposable {
  /** `DATABASE_URL` for the server, or undefined for PGlite. */
  readonly url: string | undefined;
  /** PGlite data directory (unused with a URL). */
  readonly dataDir: string;
  /** Drops the database or deletes the directory. */
  drop(): Promise<void>;
}

/**
 * A brand-new PostgreSQL database on the test server (one per test file or
 * test): empty, or with `migrated` a copy of the run's migrated template
 * (about a tenth of the time migrating takes, which the suite paid hundreds
 * of times).
 */
export async function freshPostgresDatabase(options: { migrated?: boolean } = {}): Promise<TestStore> {
  const adminUrl = inject("postgresAdminUrl");
  const name = `leasehold_test_${inject("postgresRun")}_${randomBytes(6).toString("hex")}`;
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(
      options.migrated
        ? `create database ${name} template ${inject("postgresTemplate")}`
        : `create database ${name}`,
    );
  } finally {
    await admin.end();
  }
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  const drop = async () => {
    const a = postgres(adminUrl, { max: 1, onnotice: () => {} });
    try {
      await a.unsafe(`drop database if exists ${name} with (force)`);
    } finally {
      await a.end();
    }
  };
  return { url: url.toString(), dataDir: "", drop, [Symbol.asyncDispose]: drop };
}

/** A brand-new PGlite data directory, already migrated (a copy of the run's template). */
export function freshPgliteDirectory(): TestStore {
  const dir = mkdtempSync(join(scratchDir(), "leasehold-pglite-"));
  cpSync(inject("pgliteTemplate"), join(dir, "data"), { recursive: true });
  const drop = async () => rmSync(dir, { recursive: true, force: true });
  return { url: undefined, dataDir: join(dir, "data"), drop, [Symbol.asyncDispose]: drop };
}

/**
 * Whether this run takes the tests that need a PostgreSQL of their own (a
 * second connection, locks held across processes, a server stopped): every
 * run does, on DATABASE_URL's server or the embedded one the global setup
 * started, except CI's PGlite pass (LEASEHOLD_TEST_POSTGRES_PASS_FOLLOWS=1),
 * whose PostgreSQL pass runs them: once per CI run is enough.
 */
export function runsPostgresTests(): boolean {
  return inject("driver") === "postgres" || process.env.LEASEHOLD_TEST_POSTGRES_PASS_FOLLOWS !== "1";
}

/**
 * Whether this run takes the tests whose outcome does not depend on the
 * driver (the CLI's flags and output, the benchmarks' flags, TLS): every run,
 * except CI's PGlite pass, whose PostgreSQL pass runs them. Each starts
 * servers and processes by the dozen, which on PGlite alone took a fifth of
 * that pass.
 */
export function runsDriverNeutralTests(): boolean {
  return runsPostgresTests();
}

/**
 * A store on the driver of this run with nothing in it, not even drizzle's
 * migrations table: for tests that migrate it themselves (upgrades from what
 * an earlier build left).
 */
export async function emptyStore(): Promise<TestStore> {
  if (inject("driver") === "postgres") return freshPostgresDatabase();
  const dir = mkdtempSync(join(scratchDir(), "leasehold-pglite-"));
  const drop = async () => rmSync(dir, { recursive: true, force: true });
  return { url: undefined, dataDir: join(dir, "data"), drop, [Symbol.asyncDispose]: drop };
}

/** A fresh, migrated store on the driver of this run (PGlite, or PostgreSQL when DATABASE_URL is set). */
export async function freshStore(): Promise<TestStore> {
  return inject("driver") === "postgres" ? freshPostgresDatabase({ migrated: true }) : freshPgliteDirectory();
}

/**
 * A fresh store, opened and migrated before the tests of the calling suite
 * and closed and dropped after them: `database.current` in the tests.
 */
export function useFreshDatabase(): { readonly current: Database } {
  const handle: { current: Database; store?: TestStore } = { current: undefined as unknown as Database };
  beforeAll(async () => {
    handle.store = await freshStore();
    handle.current = await openDatabase({ url: handle.store.url, dataDir: handle.store.dataDir });
  });
  afterAll(async () => {
    await handle.current?.close();
    await handle.store?.drop();
  });
  return handle;
}

/**
 * Resolves once a statement of the database `db` is on waits for a lock
 * (pg_stat_activity), or `waiters` statements do, or once `done()` says there
 * is nothing left to wait for: the moment a test that holds a row lock lets
 * its transaction go on.
 */
export async function untilSomeoneWaitsForALock(
  db: Db,
  done: () => boolean = () => false,
  waiters = 1,
): Promise<void> {
  for (;;) {
    const [row] = await queryRows<{ waiting: number }>(
      db,
      sql`select count(*)::int as waiting from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock'`,
    );
    if ((row?.waiting ?? 0) >= waiters || done()) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}
