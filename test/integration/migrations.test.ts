import { execFile } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { sql } from "drizzle-orm";
import postgres from "postgres";
import { describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import {
  connectionShortfalls,
  type Database,
  type MigrationLockWait,
  openDatabase,
  vacuumShortfalls,
} from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import {
  emptyStore,
  freshPostgresDatabase,
  freshStore,
  runsPostgresTests,
  type TestStore,
} from "../helpers/database.js";
import { migrateWith, migrateWithFirst, queryStore } from "../helpers/migrations.js";
import { BIN } from "../helpers/process.js";
import { scratchDir } from "../helpers/scratch.js";
import { startTestServer } from "../helpers/server.js";

const journal = JSON.parse(
  readFileSync(new URL("../../src/store/migrations/meta/_journal.json", import.meta.url), "utf8"),
) as { entries: { tag: string; when: number }[] };
const newestKnown = journal.entries.at(-1) as { tag: string; when: number };

/** Records in `store` a migration newer than every one this build ships, as a newer build would. */
async function migrateAsANewerBuild(store: TestStore): Promise<void> {
  const database = await openDatabase({ url: store.url, dataDir: store.dataDir });
  try {
    await database.db.execute(
      sql`insert into drizzle.__drizzle_migrations (hash, created_at) values ('f0e1d2c3b4a5f0e1d2c3', ${newestKnown.when + 86_400_000})`,
    );
  } finally {
    await database.close();
  }
}

/** Runs `leasehold serve` on `store` until it exits (a build that serves anyway is stopped): its code and stderr. */
function serveToExit(store: TestStore): Promise<{ code: number; stderr: string }> {
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith("LEASEHOLD_") && k !== "DATABASE_URL"),
  );
  const where = store.url ? ["--database-url", store.url] : ["--data-dir", store.dataDir];
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [BIN, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", ...where],
      { env, timeout: 60_000 },
      (error, _stdout, stderr) => resolve({ code: error ? Number(error.code ?? 1) : 0, stderr }),
    );
  });
}

describe("a database a newer build migrated", () => {
  it("is refused by openDatabase, naming the newest migration it has and the newest this build knows", async () => {
    await using store = await freshStore();
    await migrateAsANewerBuild(store);
    const opened = openDatabase({ url: store.url, dataDir: store.dataDir });
    await expect(opened).rejects.toThrow(/1 migration this build does not know/);
    await expect(opened).rejects.toThrow(new Date(newestKnown.when + 86_400_000).toISOString());
    await expect(opened).rejects.toThrow(`the newest this build knows is ${newestKnown.tag}`);
  });

  it("makes `leasehold serve` exit 1 saying to run a build at least that new", async () => {
    await using store = await freshStore();
    await migrateAsANewerBuild(store);
    const { code, stderr } = await serveToExit(store);
    expect(code).toBe(1);
    expect(stderr).toContain(`the newest this build knows is ${newestKnown.tag}`);
    expect(stderr).toContain("Run a leasehold build at least as new as the one that migrated it");
    expect(stderr).not.toContain("--database-url");
  });
});

describe("pending migrations", { timeout: 120_000 }, () => {
  const lastTwo = journal.entries.slice(-2).map((e) => e.tag);

  it("are reported before and after they are applied, and nothing is reported when none is pending", async () => {
    await using store = await emptyStore();
    await migrateWithFirst(store, journal.entries.length - 2);
    const calls: unknown[] = [];
    const open = () =>
      openDatabase({
        url: store.url,
        dataDir: store.dataDir,
        onMigrating: (pending) => calls.push(["migrating", pending]),
        onMigrated: (applied, ms) => calls.push(["migrated", applied, ms]),
      });
    await (await open()).close();
    expect(calls).toEqual([
      ["migrating", lastTwo],
      ["migrated", lastTwo, expect.any(Number)],
    ]);
    calls.length = 0;
    await (await open()).close();
    expect(calls).toEqual([]);
  });

  it("are logged by a server that applies them, with how long they took", async () => {
    await using store = await emptyStore();
    await migrateWithFirst(store, journal.entries.length - 2);
    const t = await startTestServer({ store });
    try {
      const messages = t.logs.map((l) => String(l.msg));
      expect(messages).toContainEqual(`applying 2 migrations: ${lastTwo.join(", ")}`);
      expect(messages).toContainEqual(expect.stringMatching(/^applied 2 migrations in \d+\.\d s$/));
      expect(messages.findIndex((m) => m.startsWith("applied "))).toBeLessThan(
        messages.indexOf("database ready"),
      );
      const again = await t.restart();
      try {
        expect(again.logs.some((l) => /^appl(ying|ied) /.test(String(l.msg)))).toBe(false);
      } finally {
        await again.stop();
      }
    } finally {
      await t.stop();
    }
  });
});

/** Resolves once a statement of a Leasehold process on `sql`'s database waits for a lock. */
async function untilMigrationWaits(sql: postgres.Sql): Promise<void> {
  for (;;) {
    const [row] = await sql`select count(*)::int as n from pg_stat_activity
      where datname = current_database() and wait_event_type = 'Lock' and application_name like 'leasehold/%'`;
    if ((row?.n ?? 0) > 0) return;
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

// Always on real PostgreSQL (DATABASE_URL's server, or the embedded one).
describe.runIf(runsPostgresTests())("migrations on PostgreSQL", () => {
  it("let two servers starting at once on one empty database both come up, migrating once", async () => {
    await using store = await freshPostgresDatabase();
    const [a, b] = await Promise.all([startTestServer({ store }), startTestServer({ store })]);
    try {
      const submitted = await a.client(ActionService).submitAction({ cluster: "shared" });
      const seen = await b.client(ActionService).getAction({ actionId: submitted.action?.id ?? "" });
      expect(seen.action?.id).toBe(submitted.action?.id);

      const sql = postgres(store.url ?? "", { max: 1 });
      try {
        const rows = await sql`select count(*)::int as n from drizzle.__drizzle_migrations`;
        // Each migration applied exactly once, not once per server.
        expect(rows[0]?.n).toBe(journal.entries.length);
      } finally {
        await sql.end();
      }
    } finally {
      await Promise.all([a.stop(), b.stop()]);
    }
  });

  it("names the connection limits that leave fewer connections than a process may open", async () => {
    await using store = await freshPostgresDatabase({ migrated: true });
    const database = await openDatabase({ url: store.url, dataDir: "" });
    try {
      expect(await connectionShortfalls(database.db, 10)).toEqual([]);
      const name = new URL(store.url ?? "").pathname.slice(1);
      await database.db.execute(sql.raw(`alter database "${name}" connection limit 8`));
      expect(await connectionShortfalls(database.db, 10)).toEqual([
        { limit: 8, needed: 13, what: "the database's CONNECTION LIMIT" },
      ]);
      expect(await connectionShortfalls(database.db, 5)).toEqual([]);
      // Past what the server allows at all.
      const [server] = await connectionShortfalls(database.db, 100_000).then((s) =>
        s.filter((x) => x.what.startsWith("max_connections")),
      );
      expect(server).toMatchObject({
        needed: 100_003,
        what: "max_connections less superuser_reserved_connections",
      });
    } finally {
      await database.close();
    }
  });

  it("names what keeps PostgreSQL from vacuuming Leasehold's tables", async () => {
    await using store = await freshPostgresDatabase({ migrated: true });
    const database = await openDatabase({ url: store.url, dataDir: "" });
    try {
      // The server-wide settings are the machine's (this one's PostgreSQL may run without autovacuum).
      const [settings] = await queryRows<{ autovacuum: string; track_counts: string }>(
        database.db,
        sql`select current_setting('autovacuum') as autovacuum, current_setting('track_counts') as track_counts`,
      );
      const serverWide = [
        ...(settings?.autovacuum === "off" ? ["autovacuum is off"] : []),
        ...(settings?.track_counts === "off" ? ["track_counts is off (autovacuum needs it)"] : []),
      ];
      expect(await vacuumShortfalls(database.db)).toEqual(serverWide);
      await database.db.execute(sql`alter table events set (autovacuum_enabled = false)`);
      expect(await vacuumShortfalls(database.db)).toEqual([
        ...serverWide,
        "autovacuum_enabled = false on table events",
      ]);
    } finally {
      await database.close();
    }
  });

  it("gives way to a session holding a table's lock, says who holds it, and migrates once it lets go", async () => {
    await using store = await freshPostgresDatabase({ migrated: true });
    const sql = postgres(store.url ?? "", { max: 3 });
    try {
      // Back to before the newest migration, which builds an index on events.
      await sql`drop index events_expiry_idx`;
      await sql`delete from drizzle.__drizzle_migrations where created_at = ${newestKnown.when}`;
      // A long transaction on events, as a pg_dump or a forgotten psql holds.
      const holder = await sql.reserve();
      await holder`begin`;
      await holder`lock table events in row exclusive mode`;
      const [{ pid }] = (await holder`select pg_backend_pid() as pid`) as unknown as [{ pid: number }];
      const waits: MigrationLockWait[] = [];
      let firstWait: () => void = () => {};
      const waited = new Promise<void>((resolve) => {
        firstWait = resolve;
      });
      const opening = openDatabase({
        url: store.url,
        dataDir: "",
        onMigrationLockWait: (wait) => {
          waits.push(wait);
          firstWait();
        },
      });
      // A statement of a serving process queued behind the migration, holding a lock on another of
      // Leasehold's tables meanwhile: it waits for the migration, it does not hold what the migration
      // waits for.
      await untilMigrationWaits(sql);
      const queued = await sql.reserve();
      await queued`begin`;
      await queued`lock table actions in row exclusive mode`;
      const [{ pid: queuedPid }] = (await queued`select pg_backend_pid() as pid`) as unknown as [
        { pid: number },
      ];
      const queuing = queued`lock table events in row exclusive mode`.execute();
      await waited;
      const [first] = waits;
      await queuing;
      await queued`commit`;
      queued.release();
      await holder`commit`;
      holder.release();
      const database = await opening;
      await database.close();
      expect(first).toMatchObject({
        tries: 1,
        holders: [expect.objectContaining({ pid, state: "idle in transaction" })],
      });
      expect(first?.holders.map((h) => h.pid)).not.toContain(queuedPid);
      const [index] = await sql`select indexname from pg_indexes where indexname = 'events_expiry_idx'`;
      expect(index?.indexname).toBe("events_expiry_idx");
    } finally {
      await sql.end();
    }
  });
});

/**
 * A migrations folder as the builds of `fixture` (test/fixtures/migrations) shipped it: the
 * fixture's journal, its own text of what was edited later, and every other migration it names
 * from src/store/migrations (released migrations are never edited: their text is the same).
 * The caller removes the folder.
 */
function releasedMigrations(fixture: string): string {
  const from = fileURLToPath(new URL(`../fixtures/migrations/${fixture}/`, import.meta.url));
  const current = fileURLToPath(new URL("../../src/store/migrations/", import.meta.url));
  const folder = mkdtempSync(join(scratchDir(), `leasehold-${fixture}-`));
  cpSync(join(from, "meta"), join(folder, "meta"), { recursive: true });
  const journal = JSON.parse(readFileSync(join(from, "meta", "_journal.json"), "utf8")) as {
    entries: { tag: string }[];
  };
  for (const { tag } of journal.entries) {
    const own = join(from, `${tag}.sql`);
    cpSync(existsSync(own) ? own : join(current, `${tag}.sql`), join(folder, `${tag}.sql`));
  }
  return folder;
}

/**
 * The schema as pg_dump shows it: columns in their order (with type, nullability and default),
 * indexes, constraints, triggers and functions.
 */
async function schemaOf(database: Database): Promise<Record<string, unknown[]>> {
  const rows = (text: string) => queryRows<Record<string, unknown>>(database.db, sql.raw(text));
  return {
    columns: await rows(
      `select table_name, column_name, data_type, is_nullable, column_default from information_schema.columns
       where table_schema = 'public' order by table_name, ordinal_position`,
    ),
    indexes: await rows(
      `select indexname, indexdef from pg_indexes where schemaname = 'public' order by indexname`,
    ),
    constraints: await rows(
      `select conrelid::regclass::text as table_name, conname, pg_get_constraintdef(oid) as def from pg_constraint
       where connamespace = 'public'::regnamespace order by conname`,
    ),
    triggers: await rows(
      "select tgname, pg_get_triggerdef(oid) as def from pg_trigger where not tgisinternal order by tgname",
    ),
    functions: await rows(
      `select proname, pg_get_functiondef(oid) as def from pg_proc
       where pronamespace = 'public'::regnamespace order by proname`,
    ),
  };
}

/**
 * Migration 0016 was edited after builds had applied it (see src/store/migrations/README.md):
 * test/fixtures/migrations holds the migrations those builds shipped. drizzle applies the
 * current 0016 over the earlier one, since its journal entry is newer than the earlier's.
 */
// Each test migrates a database from empty and starts a server or a process: seconds each on a
// busy machine. The timeout is a hang guard.
describe("a database an earlier text of migration 0016 was applied to", { timeout: 120_000 }, () => {
  const LEASE = "0190a0b0-0000-7000-8000-00000000a001";
  const OBJECT = "0190a0b0-0000-7000-8000-00000000b001";
  const seed = [
    `insert into scope_leases (id, runtime, state, close_reason, ttl_ms, expires_at, closed_at, created_by)
     values ('${LEASE}', 'east', 'COMMITTED', 'COMMITTED', 600000, now(), now(), 'alice')`,
    `insert into resources (id, kind, ownership, lease_id, body, request_id, requested_by, request_hash)
     values ('${OBJECT}', 'report', 'WORKSPACE', '${LEASE}', '{"a": 1}', 'report-1', 'alice', 'h')`,
  ];

  it.each([
    ["0016_resource_request_id (builds 6f98e02 to e81a932)", "released-0016-request-id"],
    ["the first 0016_resource_request_id_and_runtime (builds 270bad0 to 49b310f)", "released-0016-runtime"],
  ])("upgrades from %s to the schema a fresh database gets, and serves", async (_name, fixture) => {
    await using store = await emptyStore();
    const folder = releasedMigrations(fixture);
    try {
      await migrateWith(store, folder, seed);
    } finally {
      rmSync(folder, { recursive: true, force: true });
    }

    const upgraded = await openDatabase({ url: store.url, dataDir: store.dataDir });
    let schema: Record<string, unknown[]>;
    try {
      schema = await schemaOf(upgraded);
      const [row] = await queryRows<Record<string, unknown>>(
        upgraded.db,
        sql`select runtime, lease_owner, request_id, requested_by from resources where id = ${OBJECT}`,
      );
      // Backfilled from the lease, and what the earlier build recorded is kept.
      expect(row).toEqual({
        runtime: "east",
        lease_owner: "alice",
        request_id: "report-1",
        requested_by: "alice",
      });
      const [applied] = await queryRows<{ n: number }>(
        upgraded.db,
        sql`select count(*)::int as n from drizzle.__drizzle_migrations where created_at = ${newestKnown.when}`,
      );
      expect(applied?.n).toBe(1);
    } finally {
      await upgraded.close();
    }
    await using fresh = await freshStore();
    const reference = await openDatabase({ url: fresh.url, dataDir: fresh.dataDir });
    try {
      expect(schema).toEqual(await schemaOf(reference));
    } finally {
      await reference.close();
    }
    expect(schema.indexes).toContainEqual({
      indexname: "resources_requested_by_request_id_key",
      indexdef: expect.stringMatching(/^CREATE UNIQUE INDEX .* USING btree \(requested_by, request_id\)$/),
    });

    const t = await startTestServer({ store });
    try {
      const resources = t.client(ResourceService);
      const kept = await resources.getResource({ resourceId: OBJECT });
      expect(kept.resource?.id).toBe(OBJECT);
      const leaseId = (await t.client(LeaseService).createLease({ runtime: "east", ttl: { seconds: 600n } }))
        .lease?.id;
      const request = { leaseId: leaseId ?? "", kind: "report", body: { a: 2 }, requestId: "report-2" };
      const first = await resources.createObject(request);
      const retried = await resources.createObject(request);
      expect(retried.resource?.id).toBe(first.resource?.id);
    } finally {
      await t.stop();
    }
  });
});

describe("a migration the database refuses", { timeout: 120_000 }, () => {
  /**
   * A store migrated up to 0014_server_liveness that already has an index named as one
   * 0015_discard_lost_run_outputs creates (`CREATE INDEX`, without `IF NOT EXISTS`).
   */
  async function storeThatRefuses0015(): Promise<TestStore> {
    const store = await emptyStore();
    await migrateWithFirst(
      store,
      journal.entries.findIndex((e) => e.tag.startsWith("0015_")),
      ['create index "resources_output_run_idx" on resources (id)'],
    );
    return store;
  }

  /** What the message must say: the migration, the database's own error, the state it is left in. */
  const expectExplained = (message: string) => {
    expect(message).toContain(
      'migration 0015_discard_lost_run_outputs failed: relation "resources_output_run_idx" already exists (SQLSTATE 42P07), ' +
        'in: CREATE INDEX "resources_output_run_idx" ON "resources"',
    );
    expect(message).toContain(
      "pending migrations run in one transaction, which was rolled back, so the database is still at migration 0014_server_liveness",
    );
    expect(message).toContain("resolve that conflict and start again");
    expect(message).not.toContain("Failed query");
  };

  it("fails openDatabase saying which migration, the database's error and that nothing of it was applied", async () => {
    await using store = await storeThatRefuses0015();
    const error = await openDatabase({ url: store.url, dataDir: store.dataDir }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toMatchObject({ name: "MigrationFailed", sqlState: "42P07" });
    expectExplained((error as Error).message);
    expect((error as Error).message).toContain(
      store.url
        ? `cannot migrate the database at ${store.url}`
        : `cannot migrate the database in ${store.dataDir}`,
    );

    // Rolled back: 0015's first statement (a column) left nothing either, and 0015 is not recorded.
    const [left] = await queryStore(
      store,
      `select (select count(*)::int from drizzle.__drizzle_migrations) as applied,
              (select count(*)::int from information_schema.columns
               where table_name = 'resources' and column_name = 'output_action_id') as output_columns`,
    );
    expect(left).toEqual({
      applied: journal.entries.findIndex((e) => e.tag.startsWith("0015_")),
      output_columns: 0,
    });
  });

  it("makes `leasehold serve` exit 1 with that message, not advice about --database-url", async () => {
    await using store = await storeThatRefuses0015();
    const { code, stderr } = await serveToExit(store);
    expect(code).toBe(1);
    expectExplained(stderr);
    expect(stderr).not.toContain("check --database-url");
  });
});
