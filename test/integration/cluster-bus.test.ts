import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { type Database, openDatabase } from "../../src/store/database.js";
import { type BusMessage, type ClusterBus, createPostgresBus } from "../../src/work/cluster-bus.js";
import { freshPostgresDatabase, type TestStore } from "../helpers/database.js";

// LISTEN/NOTIFY exists only on PostgreSQL; PGlite serves a single process and has no bus.
describe.skipIf(inject("driver") !== "postgres")("cluster bus", () => {
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

  async function process(serverId: string, onQuery?: (q: string) => void) {
    const database = await openDatabase({
      url: store.url,
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
});
