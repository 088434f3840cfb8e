import { readFileSync } from "node:fs";
import postgres from "postgres";
import { describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { startTestServer } from "../helpers/server.js";

const journal = JSON.parse(
  readFileSync(new URL("../../src/store/migrations/meta/_journal.json", import.meta.url), "utf8"),
) as { entries: unknown[] };

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
