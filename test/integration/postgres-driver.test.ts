import postgres from "postgres";
import { describe, expect, it } from "vitest";
import { freshPostgresDatabase, type TestStore } from "../helpers/database.js";

/**
 * Patches of the vendored postgres.js (vendor/README.md), each shown here
 * failing the way it failed unpatched. A BEGIN that filled a connection's
 * pipeline never reserved that connection: the caller got UNSAFE_TRANSACTION,
 * the transaction stayed open on the server, and the pool handed the
 * connection to other queries, which then ran inside it, uncommitted, though
 * each had been answered. A query that failed after sending some rows left
 * the next query on its connection an answer with holes, as a success.
 */
// Always on real PostgreSQL (DATABASE_URL's server, or the embedded one).
describe("postgres.js transactions on a busy pool", () => {
  it("reserve their connection when BEGIN is the query that fills its pipeline", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 2 });
    // Both connections open and idle, so the queries below are dealt to them in turn.
    await Promise.all([sql`select pg_sleep(0.01)`, sql`select pg_sleep(0.01)`]);
    await sql`create table t (n int)`;
    // Each connection takes one query and queues up to max_pipeline (100) more: 200, sent now
    // (not on the next tick, as a query awaited later would be), leave the first connection with
    // a full pipeline once BEGIN is added to it.
    const busy = Array.from({ length: 200 }, () => sql`select 1`.execute());
    const committed = sql.begin(async (tx) => {
      await tx`insert into t values (1)`;
      return "committed";
    });
    await expect(committed).resolves.toBe("committed");
    await Promise.all(busy);
    await expectNoOpenTransaction(store);
    expect(await sql`select count(*)::int as n from t`).toEqual([{ n: 1 }]);
  });

  it("reserve their connection however small the pipeline (max_pipeline 0)", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 2, max_pipeline: 0 });
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) => sql.begin(async (tx) => (await tx`select ${i}::int as i`)[0]?.i)),
    );
    expect(results).toEqual(Array.from({ length: 20 }, (_, i) => i));
    await expectNoOpenTransaction(store);
  });
});

describe("postgres.js answers on a connection after a failed query", () => {
  it("are whole when the query before failed after sending some rows", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 1 });
    // Three rows, then division by zero; the next query waits in the same connection's pipeline.
    const failing = sql`select i, 1 / (4 - i) as boom from generate_series(1, 10) i`.execute();
    const next = sql`select x from generate_series(1, 5) x`.execute();
    await expect(failing).rejects.toThrow("division by zero");
    // Unpatched: eight elements, the first three holes, resolved as a success.
    expect([...(await next)]).toEqual([1, 2, 3, 4, 5].map((x) => ({ x })));
  });
});

/** A pool on the store's database that `await using` ends. */
function pool(
  store: TestStore,
  // max_pipeline: how many queries a connection queues (a connection option its types omit).
  options: postgres.Options<Record<string, never>> & { max_pipeline?: number },
) {
  const sql = postgres(store.url ?? "", { onnotice: () => {}, ...options });
  return Object.assign(sql, { [Symbol.asyncDispose]: () => sql.end({ timeout: 5 }) });
}

/** No session on the store's database is left idle inside a transaction. */
async function expectNoOpenTransaction(store: TestStore): Promise<void> {
  await using probe = pool(store, { max: 1 });
  const rows = await probe`
    select count(*)::int as n from pg_stat_activity
    where datname = current_database() and state like 'idle in transaction%'`;
  expect(rows).toEqual([{ n: 0 }]);
}
