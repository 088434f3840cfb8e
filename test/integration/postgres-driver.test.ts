import { once } from "node:events";
import { connect, type Socket } from "node:net";
import postgres from "postgres";
import { describe, expect, it } from "vitest";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";

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
describe.runIf(runsPostgresTests())("postgres.js transactions on a busy pool", () => {
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

describe.runIf(runsPostgresTests())("postgres.js answers on a connection after a failed query", () => {
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

describe.runIf(runsPostgresTests())("postgres.js after a backend is terminated", () => {
  it("runs the next query on the connection, not failing it with the old error", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 1 });
    const running = failure(sql`select pg_sleep(30)`.execute());
    await terminate(store, await activeBackend(store, "pg_sleep"));
    expect(await running).toBeInstanceOf(Error);
    // Unpatched: rejected with the terminated backend's 57P01.
    expect(await sql`select 42 as x`).toEqual([{ x: 42 }]);
  });

  it("ends the pool without waiting for the query that died", async () => {
    await using store = await freshPostgresDatabase();
    const sql = pool(store, { max: 4 });
    const running = failure(sql`select pg_sleep(30)`.execute());
    await terminate(store, await activeBackend(store, "pg_sleep"));
    expect(await running).toBeInstanceOf(Error);
    // Unpatched: never resolves without a timeout (the test's own timeout fails it).
    await sql.end();
  });

  it("fails the rest of a transaction whose connection died, instead of running it outside", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 1 });
    await sql`create table t (n int)`;
    let reached!: (pid: number) => void;
    const atGate = new Promise<number>((r) => (reached = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let issued!: (late: { query: Promise<unknown> }) => void;
    const lateIssued = new Promise<{ query: Promise<unknown> }>((r) => (issued = r));
    // Handled from the start: it fails as the backend goes, before the assertion below.
    const transaction = failure(
      sql.begin(async (tx) => {
        const [row] = await tx`select pg_backend_pid() as pid`;
        reached(row?.pid as number);
        await gate; // the caller's own work, e.g. an RPC
        const query = failure(tx`insert into t values (1)`.execute());
        issued({ query });
        throw await query;
      }),
    );
    await terminate(store, await atGate);
    expect(await transaction).toBeInstanceOf(Error);
    // The pool opens a new backend for other work on the same connection.
    expect(await sql`select 1 as ok`).toEqual([{ ok: 1 }]);
    release();
    const late = await lateIssued;
    // Unpatched: the insert ran on the new backend, outside any transaction, and stayed.
    expect(await late.query).toBeInstanceOf(Error);
    expect(await sql`select count(*)::int as n from t`).toEqual([{ n: 0 }]);
  });

  it("fails the queries a transaction had queued when its connection dies", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 4 });
    let queued: Promise<unknown>[] = [];
    const transaction = sql.begin(async (tx) => {
      const [row] = await tx`select pg_backend_pid() as pid`;
      // The first waits for its statement's description: the others queue behind it.
      queued = [
        tx.unsafe("select pg_sleep(30), $1::int", [1], { prepare: true }).execute(),
        tx.unsafe("select $1::int as x", [2], { prepare: true }).execute(),
        tx.unsafe("select $1::int as x", [3], { prepare: true }).execute(),
      ].map(failure);
      await activeBackend(store, "pg_sleep");
      await terminate(store, row?.pid as number);
    });
    await expect(transaction).rejects.toThrow();
    // Unpatched: the two queued queries never settle (the test's own timeout fails it).
    for (const q of queued) expect(await q).toBeInstanceOf(Error);
  });
});

describe.runIf(runsPostgresTests())("postgres.js on a connection reset", () => {
  it("fails a query sent between the socket's error and its close, instead of dropping it", async () => {
    await using store = await freshPostgresDatabase();
    const url = new URL(store.url ?? "");
    let socket: Socket | undefined;
    await using sql = pool(store, {
      max: 1,
      socket: async () => {
        const s = connect(Number(url.port || 5432), url.hostname);
        await once(s, "connect");
        socket = s;
        return s;
      },
    });
    await sql`select 1`;
    const s = socket as Socket;
    // A reset (ECONNRESET) emits the socket's error at once and its close a turn later; in
    // between the pool still counts the idle connection as usable, and a caller retrying on
    // the error (the lease dispatcher looking whether its claim committed) is given it.
    const late = new Promise<Promise<unknown>>((resolve) =>
      s.once("error", () => resolve(failure(sql`select 2 as x`.execute()))),
    );
    s.destroy(Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET" }));
    const query = await late;
    // Unpatched: never settles (the test's own timeout fails it); the close forgot the query.
    expect(await query).toBeInstanceOf(Error);
    // And the pool opens a new connection for the next one.
    expect(await sql`select 3 as x`).toEqual([{ x: 3 }]);
  });
});

describe.runIf(runsPostgresTests())("postgres.js statements prepared before a migration", () => {
  it("send their parameters once more as they were, not serialized twice", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 1 });
    await using ddl = pool(store, { max: 1 });
    await ddl`create table t (id int, flag bool)`;
    const insert = (id: number) =>
      sql.unsafe("insert into t select $1, $2 returning *", [id, true], { prepare: true });
    await insert(1);
    // Another process migrates: the prepared statement's result type changes, and it is prepared again.
    await ddl`alter table t add column note text`;
    // Unpatched: true became 't' on the first try, and 't' became false on the second.
    expect([...(await insert(2))]).toEqual([{ id: 2, flag: true, note: null }]);
  });

  it("keep their answers apart from the queries sent while one is prepared again", async () => {
    await using store = await freshPostgresDatabase();
    await using ddl = pool(store, { max: 1 });
    await ddl`create table t (id int, v text)`;
    await ddl`insert into t values (1, 'one')`;
    let builds = 0;
    let other: Promise<unknown> | undefined;
    await using sql = pool(store, {
      max: 1,
      // Called as each query is built: the fourth build of the statement is its retry.
      debug: (_connection, text) => {
        if (text.startsWith("select * from t") && ++builds === 4)
          other = sql`select 'the other query' as other`.execute();
      },
    });
    const select = () => sql.unsafe("select * from t where id = $1", [1], { prepare: true });
    await select();
    await select();
    await ddl`alter table t add column w int`;
    // Unpatched: the retried statement got the other query's row, and the other query failed.
    expect([...(await select())]).toEqual([{ id: 1, v: "one", w: null }]);
    expect([...((await other) as unknown[])]).toEqual([{ other: "the other query" }]);
  });
});

describe.runIf(runsPostgresTests())("postgres.js picking an idle connection", () => {
  it("takes the one used last, so queries sent one at a time keep to one backend", async () => {
    await using store = await freshPostgresDatabase();
    await using sql = pool(store, { max: 3 });
    // Three connections open, then all idle.
    await Promise.all([1, 2, 3].map(() => sql`select pg_sleep(0.01)`));
    const backends = new Set<number>();
    for (let i = 0; i < 6; i++) {
      const [row] = await sql`select pg_backend_pid() as pid`;
      backends.add(row?.pid as number);
    }
    // Unpatched: the one idle longest each time, so all three in turn.
    expect(backends.size).toBe(1);
  });
});

describe.runIf(runsPostgresTests())("postgres.js ending a pool", () => {
  it("fails the queries still waiting for a connection instead of opening one after the end", async () => {
    await using store = await freshPostgresDatabase();
    const name = "leasehold-pool-end-test";
    const sql = pool(store, { max: 1, connection: { application_name: name } });
    await sql`select 1`;
    const queued = [1, 2, 3].map((i) => sql.unsafe("select $1::int as x", [i], { prepare: true }).execute());
    await new Promise((r) => setImmediate(r));
    await sql.end({ timeout: 5 });
    const settled = await Promise.allSettled(queued);
    // The first was on the connection already; the others had not been sent.
    expect(settled.slice(1).map((s) => s.status)).toEqual(["rejected", "rejected"]);
    await using admin = pool(store, { max: 1 });
    // Unpatched: a connection reopened after the end to run them, and stayed open.
    expect(
      await admin`select count(*)::int as n from pg_stat_activity where application_name = ${name}`,
    ).toEqual([{ n: 0 }]);
  });
});

/** The pid of the backend of the store's database running a query containing `text`, once it runs. */
async function activeBackend(store: TestStore, text: string): Promise<number> {
  await using admin = pool(store, { max: 1 });
  for (;;) {
    const [row] = await admin`
      select pid from pg_stat_activity
      where datname = current_database() and state = 'active' and pid <> pg_backend_pid()
        and query like ${`%${text}%`}`;
    if (row) return row.pid as number;
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** What `query` fails with (undefined if it succeeds), handled from the start. */
const failure = (query: Promise<unknown>): Promise<unknown> =>
  query.then(
    () => undefined,
    (error: unknown) => error,
  );

/** Terminates a backend, as a PostgreSQL restart or an operator would. */
async function terminate(store: TestStore, pid: number): Promise<void> {
  await using admin = pool(store, { max: 1 });
  await admin`select pg_terminate_backend(${pid})`;
}

/** A pool on the store's database that `await using` ends. */
function pool(
  store: TestStore,
  // max_pipeline: how many queries a connection queues (a connection option its types omit).
  // socket: a function opening the connection's socket (also missing from its types).
  options: postgres.Options<Record<string, never>> & {
    max_pipeline?: number;
    socket?: () => Promise<Socket>;
  },
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
