import { sql } from "drizzle-orm";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { type BusMessage, type ClusterBus, createPostgresBus } from "../../src/work/cluster-bus.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { startTestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

// LISTEN/NOTIFY exists only on PostgreSQL; PGlite serves a single process and has no bus.
describe.runIf(runsPostgresTests())("cluster bus", () => {
  let store: TestStore;
  const opened: { database: Database; bus: ClusterBus }[] = [];
  beforeAll(async () => {
    store = await freshPostgresDatabase();
  });
  afterAll(async () => {
    for (const { database, bus } of opened.reverse()) {
      await bus.close();
      await database.close();
    }
    await store?.drop();
  });

  async function process(
    serverId: string,
    onQuery?: (q: string) => void,
    wakeGapMs?: number,
    url: string | undefined = store.url,
  ) {
    const database = await openDatabase({
      url,
      dataDir: "",
      ...(onQuery ? { onQuery } : {}),
    });
    const listen = database.listen;
    if (!listen) throw new Error("PostgreSQL has listen");
    const bus = await createPostgresBus({
      db: database.db,
      listen,
      serverId,
      log: pino({ level: "silent" }),
      ...(wakeGapMs !== undefined ? { wakeGapMs } : {}),
    });
    opened.push({ database, bus });
    return bus;
  }

  it("notifies nobody while alone, and the other process once one listens", async () => {
    const statements: string[] = [];
    const a = await process("a", (q) => statements.push(q));
    expect(await a.peersListening()).toBe(false);
    statements.length = 0;
    a.send({ kind: "wake", topics: ["alone"] });
    await new Promise((r) => setImmediate(r));
    expect(statements.filter((q) => q.includes("pg_notify"))).toEqual([]);

    const b = await process("b");
    const heard = new Promise<BusMessage>((resolve) =>
      b.subscribe((m) => {
        if (m.kind === "wake" && m.topics.includes("together")) resolve(m);
      }),
    );
    expect(await a.peersListening()).toBe(true);
    a.send({ kind: "wake", topics: ["together"] });
    expect(await heard).toMatchObject({ kind: "wake", topics: ["together"] });
    expect(statements.filter((q) => q.includes("pg_notify")).length).toBeGreaterThan(0);
  });

  it("tells the processes apart when the URL sets its own application_name, which it keeps in front", async () => {
    await using own = await freshPostgresDatabase();
    const url = `${own.url}?application_name=dba%20tools`;
    const a = await process("a", undefined, undefined, url);
    // Before, the URL's name was every process's: each took the others' LISTEN for its own.
    expect(await a.peersListening()).toBe(false);
    const b = await process("b", undefined, undefined, url);
    expect(await a.peersListening()).toBe(true);
    expect(await b.peersListening()).toBe(true);
    const names = await Promise.all(
      opened.slice(-2).map(async ({ database }) => {
        const [row] = await queryRows<{ name: string }>(
          database.db,
          sql`select current_setting('application_name') as name`,
        );
        return row?.name;
      }),
    );
    expect(names[0]).toMatch(/^dba tools leasehold\/[0-9a-f-]{36}$/);
    expect(names[1]).toMatch(/^dba tools leasehold\/[0-9a-f-]{36}$/);
    expect(names[0]).not.toBe(names[1]);
    for (const { database, bus } of opened.splice(-2)) {
      await bus.close();
      await database.close();
    }
  });

  it("names a server's connections after its server id, as workers list shows it", async () => {
    await using own = await freshPostgresDatabase();
    const t = await startTestServer({ store: own });
    const w = await connectWorker(t.address, { workerId: "named", cluster: "c", capacity: 1 });
    try {
      const { worker } = await t.client(ClusterService).getWorker({ workerId: "named" });
      const serverId = worker?.session?.serverId ?? "";
      expect(serverId).toMatch(/^[0-9a-f-]{36}$/);
      const database = await openDatabase({ url: own.url, dataDir: "" });
      try {
        const [row] = await queryRows<{ n: number }>(
          database.db,
          sql`select count(*)::int as n from pg_stat_activity where application_name = ${`leasehold/${serverId}`}`,
        );
        expect(row?.n).toBeGreaterThan(0);
      } finally {
        await database.close();
      }
    } finally {
      w.goodbye();
      await w.ended;
      await t[Symbol.asyncDispose]();
    }
  });

  it("gathers wake-ups sent within the gap into one NOTIFY, and sends them at once with a revoke", async () => {
    // A gap no test outlasts: only the revoke can end the wait.
    const a = await process("gap-a", undefined, 600_000);
    const b = await process("gap-b");
    const heard: BusMessage[] = [];
    const waiters: (() => void)[] = [];
    b.subscribe((m) => {
      if (m.kind === "wake" && !m.topics.some((t) => t.startsWith("gap-"))) return;
      if (m.kind === "revoke" && m.sessionId !== "gap-session") return;
      heard.push(m);
      for (const w of waiters.splice(0)) w();
    });
    const until = async (n: number) => {
      while (heard.length < n) await new Promise<void>((r) => waiters.push(r));
    };
    expect(await a.peersListening()).toBe(true);
    a.send({ kind: "wake", topics: ["gap-1"] });
    await until(1);
    expect(heard[0]).toMatchObject({ kind: "wake", topics: ["gap-1"] });
    // Two more, in separate turns of the event loop: both wait for the gap.
    a.send({ kind: "wake", topics: ["gap-2"] });
    await new Promise((r) => setImmediate(r));
    a.send({ kind: "wake", topics: ["gap-3"] });
    a.send({
      kind: "revoke",
      sessionId: "gap-session",
      actionId: "act",
      epoch: 1,
      reason: "CANCELLED",
      message: "stop",
      ended: false,
    });
    await until(3);
    expect(heard.slice(1)).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ kind: "revoke", sessionId: "gap-session" }),
        expect.objectContaining({ kind: "wake", topics: ["gap-2", "gap-3"] }),
      ]),
    );
  });
});
