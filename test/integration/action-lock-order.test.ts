import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import { type Database, type Db, openDatabase } from "../../src/store/database.js";
import { cancelDeploymentActions, requestOutputs } from "../../src/store/deployments.js";
import { endSession } from "../../src/store/queries/end-session.js";
import { reapSessions } from "../../src/store/queries/reap-sessions.js";
import { recordProgress } from "../../src/store/queries/record-progress.js";
import { settleAndGrant } from "../../src/store/queries/settle-and-grant.js";
import { queryRows } from "../../src/store/rows.js";
import {
  freshPostgresDatabase,
  runsPostgresTests,
  type TestStore,
  untilSomeoneWaitsForALock,
} from "../helpers/database.js";

/**
 * Statements that lock several actions at once and wait for them (reports,
 * progress, goodbyes, reaps, output requests, and the cancel of a rolled-back
 * lease's deployments) must take them in one order, by id: in any other, two
 * of them deadlock and PostgreSQL fails one (40P01), a rollback answered
 * ABORTED or a batch of reports refused. Locks held by other transactions
 * need a second connection, so this runs on PostgreSQL only (PGlite runs one
 * transaction at a time: it can neither deadlock nor show a lock held).
 *
 * Deterministic: another transaction holds B, the last of the two actions in
 * id order; the statement under test then waits for it, having locked A if it
 * locks in id order. Each runs with both orders of the actions, in its input
 * and on disk (a session's leases are read in the order they were written),
 * on a table large enough that the planner reads the actions by key, in the
 * order of its input, as on a real database.
 */
describe.runIf(runsPostgresTests())(
  "actions locked in one order against a rollback's cancel, on PostgreSQL",
  () => {
    let store: TestStore;
    let database: Database;
    let db: Db;
    beforeAll(async () => {
      store = await freshPostgresDatabase({ migrated: true });
      database = await openDatabase({ url: store.url, dataDir: "" });
      db = database.db;
      await db.execute(sql`insert into clusters (name) values ('east')`);
      await db.execute(sql`insert into workers (worker_id, cluster, capacity) values ('w1', 'east', 2)`);
      // History enough that the planner reads actions by key, each statement in its own order, as on
      // a real database (on a small table it scans it, in the order the rows are on disk, whatever
      // the statement: the same order for all).
      await db.execute(sql`insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier,
          max_backoff_ms, max_system_retries, state)
        select 'done-' || lpad(n::text, 6, '0'), 'east', 3, 1000, 2, 10000, 3, 'SUCCEEDED'
        from generate_series(1, 60000) n`);
      await db.execute(sql`analyze actions`);
    });
    afterAll(async () => {
      await database?.close();
      await store?.drop();
    });

    /** Actions `ids`, inserted in that order, LEASED at epoch 1 to session X (deadline past or not). */
    async function leased(ids: readonly string[], deadline: "past" | "future"): Promise<void> {
      await db.execute(sql`delete from events`);
      await db.execute(sql`delete from attempts`);
      await db.execute(sql`delete from actions where id in ('A', 'B')`);
      await db.execute(sql`delete from sessions`);
      await db.execute(sql`insert into sessions (id, worker_id, server_id, stream_token, deadline)
      values ('X', 'w1', 'A', 'T', now() + ${deadline === "past" ? sql`interval '-1 second'` : sql`interval '1 hour'`})`);
      for (const id of ids) {
        await db.execute(sql`insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier,
          max_backoff_ms, max_system_retries, state, epoch, attempt_count, session_id, worker_id, granted_at)
        values (${id}, 'east', 3, 1000, 2, 10000, 3, 'LEASED', 1, 1, 'X', 'w1', now())`);
        await db.execute(sql`insert into attempts (action_id, epoch, worker_id, session_id, outcome, started_at)
        values (${id}, 1, 'w1', 'X', 'RUNNING', now())`);
      }
    }

    const cases: {
      name: string;
      deadline: "past" | "future";
      run: (ids: readonly string[]) => Promise<unknown>;
    }[] = [
      {
        name: "a batch of progress reports",
        deadline: "future",
        run: (ids) =>
          recordProgress(
            db,
            clock,
            ids.map((actionId) => ({ actionId, epoch: 1, sessionId: "X", phase: "working" })),
          ),
      },
      {
        name: "a batch of finishing reports (the settle statement)",
        deadline: "future",
        run: (ids) =>
          settleAndGrant(
            db,
            clock,
            ids.map((actionId) => ({
              actionId,
              epoch: 1,
              sessionId: "X",
              kind: "succeeded" as const,
              actor: "",
            })),
            undefined,
          ),
      },
      {
        name: "a goodbye releasing the session's leases",
        deadline: "future",
        run: () => endSession(db, clock, "X", "T", "shutting down"),
      },
      {
        name: "a reap expiring the session's leases",
        deadline: "past",
        run: () => reapSessions(db, clock, { limit: 10, partitionShare: 1, maxSilenceMs: 100_000 }),
      },
      {
        name: "a rollback's cancel of deployments",
        deadline: "future",
        run: (ids) =>
          db.transaction((t) =>
            cancelDeploymentActions(t as unknown as Db, ids, "scope lease rolled back", "tester"),
          ),
      },
      {
        name: "a request to save outputs",
        deadline: "future",
        run: (ids) => requestOutputs(db, ids, "tester"),
      },
    ];

    for (const c of cases) {
      it(`${c.name} locks the actions in id order`, async () => {
        for (const ids of [
          ["A", "B"],
          ["B", "A"],
        ]) {
          await leased(ids, c.deadline);
          const { first, outcome } = await lockedFirst(() => c.run(ids));
          expect({ ids, first }).toEqual({ ids, first: "A" });
          await expect(outcome).resolves.toBeDefined();
        }
      });
    }

    it("a batch of progress reports and a rollback's cancel of the same deployments, both waiting, both go through", async () => {
      // Both queue behind a holder of the two rows, each for the row it locks first: in opposite
      // orders, each would get that one and wait for the other's, a deadlock PostgreSQL ends by
      // failing one of them (after its deadlock_timeout).
      for (const ids of [
        ["A", "B"],
        ["B", "A"],
      ]) {
        await leased(ids, "future");
        const { release, holder } = await holdBoth();
        const progress = recordProgress(
          db,
          clock,
          ids.map((actionId) => ({ actionId, epoch: 1, sessionId: "X", phase: "working" })),
        );
        await untilSomeoneWaitsForALock(db);
        const cancel = db.transaction((t) =>
          cancelDeploymentActions(
            t as unknown as Db,
            [...ids].reverse(),
            "scope lease rolled back",
            "tester",
          ),
        );
        await untilSomeoneWaitsForALock(db, () => false, 2);
        release();
        await holder;
        // Whichever goes first, the other waits for it and goes through after it.
        await expect(progress).resolves.toBeDefined();
        expect([...(await cancel).actionIds].sort()).toEqual(["A", "B"]);
      }
    });

    /** A transaction holding actions A and B until `release()`. */
    async function holdBoth(): Promise<{ release: () => void; holder: Promise<void> }> {
      let release!: () => void;
      const gate = new Promise<void>((r) => {
        release = r;
      });
      let held!: () => void;
      const holding = new Promise<void>((r) => {
        held = r;
      });
      const holder = db.transaction(async (t) => {
        await (t as unknown as Db).execute(sql`select id from actions where id in ('A', 'B') for update`);
        held();
        await gate;
      });
      await holding;
      return { release, holder };
    }

    /**
     * Runs `statement` while another transaction holds B, the last in id order, and tells which
     * of A and B it had locked while it waited: A if it locks in id order, none if it began with B.
     */
    async function lockedFirst(
      statement: () => Promise<unknown>,
    ): Promise<{ first: string | undefined; outcome: Promise<unknown> }> {
      let release!: () => void;
      const gate = new Promise<void>((r) => {
        release = r;
      });
      let held!: () => void;
      const holding = new Promise<void>((r) => {
        held = r;
      });
      const holder = db.transaction(async (t) => {
        await (t as unknown as Db).execute(sql`select id from actions where id = 'B' for update`);
        held();
        await gate;
      });
      await holding;
      const outcome = statement();
      await untilSomeoneWaitsForALock(db);
      const free = await queryRows<{ id: string }>(
        db,
        sql`select id from actions where id = 'A' for update skip locked`,
      );
      release();
      await holder;
      return { first: free.length === 0 ? "A" : undefined, outcome };
    }
  },
);
