import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import { renewSessions } from "../../src/store/queries/renew-sessions.js";
import {
  freshPostgresDatabase,
  runsPostgresTests,
  type TestStore,
  untilSomeoneWaitsForALock,
} from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";

// Two statements at once on one session: PGlite has one connection, so only PostgreSQL can race.
describe.runIf(runsPostgresTests())("a renewal that waits for a reap of its session", () => {
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

  /** Ends session `id` in a transaction of the other connection, and renews it meanwhile. */
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
    const nowMs = performance.now();
    const renewal = renewSessions(
      db,
      clock,
      10_000,
      [{ sessionId: id, streamToken: `t-${id}`, heardAt: nowMs }],
      nowMs,
    );
    // The renewal's update waits for the session's row lock.
    await untilSomeoneWaitsForALock(reaping.db);
    committing.resolve();
    await other;
    return renewal;
  }

  it("says reaped, not taken over: the reason is read after the reap committed", async () => {
    const { deadlinesMs, notRenewed } = await renewWhileEnding(
      "reaped",
      "update sessions set ended_at = now(), end_reason = 'reaped', server_id = null, stream_token = null where id = 'reaped'",
    );
    expect(deadlinesMs[0]).toBeNaN();
    expect(notRenewed.get(0)).toBe("reaped");
  });

  it("says ended, not taken over, for a session a starting process put in grace", async () => {
    const { notRenewed } = await renewWhileEnding(
      "in-grace",
      "update sessions set stream_lost_at = now(), server_id = null, stream_token = null where id = 'in-grace'",
    );
    expect(notRenewed.get(0)).toBe("ended");
  });

  it("says taken over for a session another stream took meanwhile", async () => {
    const { notRenewed } = await renewWhileEnding(
      "taken",
      "update sessions set stream_token = 'another', server_id = 'another-server' where id = 'taken'",
    );
    expect(notRenewed.get(0)).toBe("taken over");
  });
});
