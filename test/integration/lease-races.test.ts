import { sql } from "drizzle-orm";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import { type Database, type Db, openDatabase } from "../../src/store/database.js";
import { claimActions, grantActions } from "../../src/store/queries/claim-actions.js";
import { endSession } from "../../src/store/queries/end-session.js";
import { reapSessions } from "../../src/store/queries/reap-sessions.js";
import { queryRows } from "../../src/store/rows.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";

/**
 * Interleavings that only real PostgreSQL can produce (PGlite runs one
 * transaction at a time): a grant still uncommitted while the session it
 * targets is reaped or says goodbye. The invariant: no action is ever left
 * LEASED to an ended session.
 */
describe.runIf(runsPostgresTests())("grants racing session ends on PostgreSQL", () => {
  let store: TestStore;
  let database: Database;
  let db: Db;
  beforeAll(async () => {
    store = await freshPostgresDatabase();
    database = await openDatabase({ url: store.url, dataDir: "" });
    db = database.db;
    await db.execute(sql`insert into clusters (name) values ('east')`);
    await db.execute(sql`insert into workers (worker_id, cluster, capacity) values ('w1', 'east', 1)`);
  });
  afterAll(async () => {
    await database?.close();
    await store?.drop();
  });
  beforeEach(async () => {
    await db.execute(sql`delete from attempts`);
    await db.execute(sql`delete from actions`);
    await db.execute(sql`delete from sessions`);
    await db.execute(sql`insert into sessions (id, worker_id, server_id, stream_token, deadline)
                         values ('X', 'w1', 'A', 'T', now() - interval '1 second')`);
    await db.execute(sql`insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier,
                           max_backoff_ms, max_system_retries, state)
                         values ('Z', 'east', 3, 1000, 2, 10000, 3, 'QUEUED')`);
  });

  /** Runs a grant of Z to session X that stays uncommitted until `concurrently` has had its chance. */
  async function grantWhile(concurrently: () => Promise<unknown>): Promise<void> {
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    let granted!: () => void;
    const grantedSignal = new Promise<void>((r) => {
      granted = r;
    });
    const granting = db.transaction(async (t) => {
      const tx = t as unknown as Db;
      const claimed = await claimActions(tx, clock, "east", [{}], 10);
      await grantActions(
        tx,
        clock,
        claimed.map((a) => ({ actionId: a.id, sessionId: "X", streamToken: "T", workerId: "w1" })),
      );
      granted();
      await gate;
    });
    await grantedSignal;
    const other = concurrently();
    // The other side either skips the locked session or waits for the grant to commit.
    await Promise.race([other, new Promise((r) => setTimeout(r, 300))]);
    release();
    await granting;
    await other;
  }

  const leasedToEndedSessions = async () =>
    (
      await queryRows<{ n: number }>(
        db,
        sql`select count(*)::int as n from actions a join sessions s on s.id = a.session_id
            where a.state = 'LEASED' and s.ended_at is not null`,
      )
    )[0]?.n;

  it("a reap during an uncommitted grant leaves no lease on the ended session", async () => {
    await grantWhile(() =>
      reapSessions(db, clock, { limit: 10, partitionShare: 0.5, maxSilenceMs: 100_000 }),
    );
    // The reaper skipped the locked session; the next reap expires it with its new lease.
    await reapSessions(db, clock, { limit: 10, partitionShare: 0.5, maxSilenceMs: 100_000 });
    expect(await leasedToEndedSessions()).toBe(0);
    const [z] = await queryRows<{ state: string; system_retry_count: number }>(
      db,
      sql`select * from actions where id = 'Z'`,
    );
    expect(z).toMatchObject({ state: "QUEUED", system_retry_count: 1 });
  });

  it("a goodbye during an uncommitted grant releases that lease too", async () => {
    await grantWhile(() => endSession(db, clock, "X", "T", "shutting down"));
    expect(await leasedToEndedSessions()).toBe(0);
    const [z] = await queryRows<{ state: string }>(db, sql`select state from actions where id = 'Z'`);
    expect(z?.state).toBe("QUEUED");
  });

  it("a stale stream token can neither end the session nor receive grants", async () => {
    await db.execute(
      sql`update sessions set stream_token = 'NEW', deadline = now() + interval '1 minute' where id = 'X'`,
    );
    expect((await endSession(db, clock, "X", "T", "stale goodbye")).releasedActionIds).toEqual([]);
    const granted = await db.transaction(async (t) => {
      const tx = t as unknown as Db;
      const claimed = await claimActions(tx, clock, "east", [{}], 10);
      return grantActions(
        tx,
        clock,
        claimed.map((a) => ({ actionId: a.id, sessionId: "X", streamToken: "T", workerId: "w1" })),
      );
    });
    expect(granted).toEqual([]);
    const [x] = await queryRows<{ ended_at: unknown }>(db, sql`select ended_at from sessions where id = 'X'`);
    expect(x?.ended_at).toBeNull();
  });
});
