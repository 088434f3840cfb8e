import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import type { FinishReport } from "../../src/store/queries/finish-actions.js";
import { settleAndGrant } from "../../src/store/queries/settle-and-grant.js";
import {
  freshPostgresDatabase,
  runsPostgresTests,
  type TestStore,
  untilSomeoneWaitsForALock,
} from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";

// Two statements at once on one action: PGlite has one connection, so only PostgreSQL can race.
describe.runIf(runsPostgresTests())("a completion sent again while its first copy commits", () => {
  let store: TestStore;
  let first: Database;
  let second: Database;
  beforeAll(async () => {
    store = await freshPostgresDatabase();
    first = await openDatabase({ url: store.url, dataDir: "" });
    second = await openDatabase({ url: store.url, dataDir: "" });
    const db = first.db;
    await db.execute(sql`insert into clusters (name) values ('east')`);
    await db.execute(sql`insert into workers (worker_id, cluster, capacity) values ('w', 'east', 1)`);
    await db.execute(sql`
      insert into sessions (id, worker_id, server_id, stream_token, deadline, principal)
      values ('s', 'w', 'this-server', 't', now() + interval '1 minute', 'anonymous')`);
  });
  afterAll(async () => {
    await first?.close();
    await second?.close();
    await store?.drop();
  });

  it("is accepted, not fenced: the answer looks again after the first copy's commit", async () => {
    await first.db.execute(sql`
      insert into actions (id, cluster, state, max_attempts, initial_backoff_ms, backoff_multiplier,
                           max_backoff_ms, max_system_retries)
      values ('a', 'east', 'QUEUED', 3, 1000, 2, 60000, 3)`);
    const claim = {
      groups: [{ g: 0, cluster: "east", labels: {}, room: 1 }],
      slots: [{ g: 0, n: 1, sessionId: "s", streamToken: "t", workerId: "w" }],
    };
    const { grants } = await settleAndGrant(first.db, clock, [], claim);
    expect(grants.map((g) => [g.actionId, g.epoch])).toEqual([["a", 1]]);
    const report: FinishReport = {
      actionId: "a",
      epoch: 1,
      sessionId: "s",
      kind: "succeeded",
      output: { n: 1 },
      actor: "anonymous",
    };

    // The first copy is applied in a transaction that has not committed yet.
    const firstApplied = deferred<number>();
    const committing = deferred();
    const firstCopy = first.db.transaction(async (t) => {
      const { finished } = await settleAndGrant(t as unknown as typeof first.db, clock, [report], undefined);
      firstApplied.resolve(finished.length);
      await committing.promise;
    });
    expect(await firstApplied.promise).toBe(1);

    // The second copy's statement starts meanwhile and waits for the action's row lock.
    const secondCopy = settleAndGrant(second.db, clock, [report], undefined);
    await untilSomeoneWaitsForALock(first.db);
    committing.resolve();
    await firstCopy;
    const { finished } = await secondCopy;
    expect(finished).toEqual([{ key: 0, actionId: "a", state: "SUCCEEDED" }]);

    // A stale report is still fenced: the second look accepts only what really was applied.
    const stale = await settleAndGrant(second.db, clock, [{ ...report, epoch: 2 }], undefined);
    expect(stale.finished).toEqual([]);
  });
});
