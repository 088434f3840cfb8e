import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import { renewSessions } from "../../src/store/queries/renew-sessions.js";
import type { HostedSessions } from "../../src/work/lease/hosted.js";
import { createRenewal, type HeldSession } from "../../src/work/lease/renewal.js";
import {
  freshPostgresDatabase,
  runsPostgresTests,
  type TestStore,
  untilSomeoneWaitsForALock,
} from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";

// Two statements at once on one session: PGlite has one connection, so only PostgreSQL can race.
describe.runIf(runsPostgresTests())("a renewal meeting a reap of its session", () => {
  let store: TestStore;
  let renewing: Database;
  let reaping: Database;
  beforeAll(async () => {
    store = await freshPostgresDatabase();
    renewing = await openDatabase({ url: store.url, dataDir: "" });
    reaping = await openDatabase({ url: store.url, dataDir: "" });
    await renewing.db.execute(sql`insert into clusters (name) values ('east')`);
  });
  afterAll(async () => {
    await renewing?.close();
    await reaping?.close();
    await store?.drop();
  });

  /**
   * Ends session `id` in a transaction of the other connection, and renews it
   * meanwhile, then again after that transaction committed.
   */
  async function renewWhileEnding(id: string, ending: string) {
    const db = renewing.db;
    await db.execute(
      sql`insert into workers (worker_id, cluster, capacity) values (${`w-${id}`}, 'east', 1)`,
    );
    await db.execute(sql`
      insert into sessions (id, worker_id, server_id, stream_token, deadline, principal)
      values (${id}, ${`w-${id}`}, 'this-server', ${`t-${id}`}, now() + interval '1 minute', 'anonymous')`);
    const ended = deferred();
    const committing = deferred();
    const other = reaping.db.transaction(async (t) => {
      await t.execute(sql.raw(ending));
      ended.resolve();
      await committing.promise;
    });
    await ended.promise;
    const renew = () => {
      const nowMs = performance.now();
      return renewSessions(
        db,
        clock,
        10_000,
        [{ sessionId: id, streamToken: `t-${id}`, heardAt: nowMs }],
        nowMs,
        50,
      );
    };
    // The row is held: the renewal waits 50 ms for it (every other session of the statement
    // waits too), then leaves it for the next one.
    const whileHeld = await renew();
    committing.resolve();
    await other;
    return { whileHeld, after: await renew() };
  }

  it("says busy while the reap holds the row, then reaped, not taken over", async () => {
    const { whileHeld, after } = await renewWhileEnding(
      "reaped",
      "update sessions set ended_at = now(), end_reason = 'reaped', server_id = null, stream_token = null where id = 'reaped'",
    );
    expect(whileHeld.deadlinesMs[0]).toBeNaN();
    expect(whileHeld.notRenewed.get(0)).toBe("busy");
    expect(after.deadlinesMs[0]).toBeNaN();
    expect(after.notRenewed.get(0)).toBe("reaped");
  });

  it("renews the other sessions at once while another transaction holds one session's row", async () => {
    const db = renewing.db;
    for (const id of ["held", "free-1", "free-2"]) {
      await db.execute(
        sql`insert into workers (worker_id, cluster, capacity) values (${`w-${id}`}, 'east', 1)`,
      );
      await db.execute(sql`
        insert into sessions (id, worker_id, server_id, stream_token, deadline, principal)
        values (${id}, ${`w-${id}`}, 'this-server', ${`t-${id}`}, now() + interval '1 second', 'anonymous')`);
    }
    // An operator's query, or any transaction, holding one row for as long as it likes.
    const locked = deferred();
    const release = deferred();
    const other = reaping.db.transaction(async (t) => {
      await t.execute(sql`select id from sessions where id = 'held' for update`);
      locked.resolve();
      await release.promise;
    });
    await locked.promise;
    const nowMs = performance.now();
    const heard = ["free-1", "held", "free-2"].map((id) => ({
      sessionId: id,
      streamToken: `t-${id}`,
      heardAt: nowMs,
    }));
    // Before, the statement waited for the held row for as long as it was held, with the
    // others' already locked: every session of the process, and the grants and reports that lock
    // them, waited with it. Now it waits 100 ms, then renews the others without it.
    const { deadlinesMs, dbNowMs, atMs, notRenewed } = await renewSessions(
      db,
      clock,
      10_000,
      heard,
      nowMs,
      100,
    );
    release.resolve();
    await other;
    // Counted afresh for the statement run again: heard at nowMs, that is atMs - nowMs ago.
    const ago = Math.round(atMs - nowMs);
    expect(deadlinesMs[0]).toBe(dbNowMs + 10_000 - ago);
    expect(deadlinesMs[2]).toBe(dbNowMs + 10_000 - ago);
    expect(deadlinesMs[1]).toBeNaN();
    expect([...notRenewed]).toEqual([[1, "busy"]]);
  });

  it("waits for a session a grant holds for a moment, and renews it in the same tick", async () => {
    const db = renewing.db;
    await db.execute(sql`insert into workers (worker_id, cluster, capacity) values ('w-granted', 'east', 1)`);
    await db.execute(sql`
      insert into sessions (id, worker_id, server_id, stream_token, deadline, principal)
      values ('granted', 'w-granted', 'this-server', 't-granted', now() + interval '1 second', 'anonymous')`);
    // A grant's statement holds the session `for share` until it commits.
    const locked = deferred();
    const release = deferred();
    const other = reaping.db.transaction(async (t) => {
      await t.execute(sql`select id from sessions where id = 'granted' for share`);
      locked.resolve();
      await release.promise;
    });
    await locked.promise;
    const s = {
      sessionId: "granted",
      streamToken: "t-granted",
      heardAt: performance.now(),
      ended: false,
      deadlineMs: 0,
      dbOffsetMs: 0,
    };
    const hosted = { values: () => [s].values(), end: () => {} } as unknown as HostedSessions;
    const held: string[] = [];
    const renewal = createRenewal({
      db,
      clock,
      hosted,
      graceMs: 10_000,
      // Waits up to 500 ms for a row: the grant commits well within it.
      heartbeatIntervalMs: 60_000,
      serverId: "this-server",
      onHeld: (h) => held.push(...h.map((x) => x.sessionId)),
    });
    const renewed = renewal.renew();
    // Skipped at once, a session that grants keep busy could miss tick after tick.
    await untilSomeoneWaitsForALock(reaping.db);
    release.resolve();
    await other;
    await renewed;
    expect(held).toEqual([]);
    expect(s.deadlineMs).toBeGreaterThan(Date.now() + 5_000);
  });

  it("says a session skipped once is renewed on the next tick, and one skipped tick after tick is at risk", async () => {
    const db = renewing.db;
    await db.execute(sql`insert into workers (worker_id, cluster, capacity) values ('w-busy', 'east', 1)`);
    await db.execute(sql`
      insert into sessions (id, worker_id, server_id, stream_token, deadline, principal)
      values ('busy', 'w-busy', 'this-server', 't-busy', now() + interval '2 seconds', 'anonymous')`);
    // Another transaction keeps the row for two ticks, longer than each tick waits for it.
    const locked = deferred();
    const release = deferred();
    const other = reaping.db.transaction(async (t) => {
      await t.execute(sql`select id from sessions where id = 'busy' for update`);
      locked.resolve();
      await release.promise;
    });
    await locked.promise;
    // Long ticks, so that a slow first tick (up to about 3 s: its lock wait is bounded by half an
    // interval) still leaves more than an interval, and is not yet at risk.
    const intervalMs = 4_000;
    // As stored by the tick before: not yet within an interval, within two.
    const s = {
      sessionId: "busy",
      workerId: "w-busy",
      streamToken: "t-busy",
      heardAt: performance.now(),
      ended: false,
      deadlineMs: performance.now() + 7_000,
      dbOffsetMs: 0,
    };
    const hosted = { values: () => [s].values(), end: () => {} } as unknown as HostedSessions;
    const held: HeldSession[][] = [];
    const renewal = createRenewal({
      db,
      clock,
      hosted,
      graceMs: 3_000,
      heartbeatIntervalMs: intervalMs,
      serverId: "this-server",
      onHeld: (h) => held.push([...h]),
    });
    try {
      await renewal.renew();
      expect(held).toEqual([
        [expect.objectContaining({ sessionId: "busy", workerId: "w-busy", skips: 1, atRisk: false })],
      ]);
      await renewal.renew();
      expect(held[1]).toEqual([expect.objectContaining({ sessionId: "busy", skips: 2, atRisk: true })]);
      expect(held[1]?.[0]?.remainingMs).toBeLessThanOrEqual(2 * intervalMs);
    } finally {
      release.resolve();
      await other;
    }
    // Renewed once the row is free, from a heartbeat heard now: nothing more is said of it.
    s.heardAt = performance.now();
    await renewal.renew();
    expect(held).toHaveLength(2);
    expect(s.deadlineMs).toBeGreaterThan(Date.now() + 2_000);
  });

  it("says ended, not taken over, for a session a starting process put in grace", async () => {
    const {
      after: { notRenewed },
    } = await renewWhileEnding(
      "in-grace",
      "update sessions set stream_lost_at = now(), server_id = null, stream_token = null where id = 'in-grace'",
    );
    expect(notRenewed.get(0)).toBe("ended");
  });

  it("says taken over for a session another stream took meanwhile", async () => {
    const {
      after: { notRenewed },
    } = await renewWhileEnding(
      "taken",
      "update sessions set stream_token = 'another', server_id = 'another-server' where id = 'taken'",
    );
    expect(notRenewed.get(0)).toBe("taken over");
  });
});
