import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { sql } from "drizzle-orm";
import postgres from "postgres";
import { describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { openDatabase } from "../../src/store/database.js";
import { freshPostgresDatabase, freshStore, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { BIN } from "../helpers/process.js";
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
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith("LEASEHOLD_") && k !== "DATABASE_URL"),
    );
    const where = store.url ? ["--database-url", store.url] : ["--data-dir", store.dataDir];
    const { code, stderr } = await new Promise<{ code: number; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        [BIN, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", ...where],
        // A build that serves on the newer schema anyway is stopped, not left running.
        { env, timeout: 20_000 },
        (error, _stdout, stderr) => resolve({ code: error ? Number(error.code ?? 1) : 0, stderr }),
      );
    });
    expect(code).toBe(1);
    expect(stderr).toContain(`the newest this build knows is ${newestKnown.tag}`);
    expect(stderr).toContain("Run a leasehold build at least as new as the one that migrated it");
    expect(stderr).not.toContain("--database-url");
  });
});

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
});
