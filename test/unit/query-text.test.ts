import { type SQL, sql } from "drizzle-orm";
import { PgDialect } from "drizzle-orm/pg-core";
import { describe, expect, it } from "vitest";
import { type Clock, createFakeClock, databaseClock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { insertActions } from "../../src/store/queries/insert-actions.js";
import { markStreamsLost } from "../../src/store/queries/mark-stream-lost.js";
import { recordProgress } from "../../src/store/queries/record-progress.js";
import { renewSessions } from "../../src/store/queries/renew-sessions.js";
import { settleAndGrant } from "../../src/store/queries/settle-and-grant.js";
import { simpleQueryText } from "../../src/store/query-text.js";
import { registerPreparedRunner } from "../../src/store/rows.js";
import { actions } from "../../src/store/schema.js";
import { ACTION_DEFAULTS, type NewAction } from "../../src/work/action.js";

const dialect = new PgDialect();

/** The statements the hot-path queries send to PostgreSQL, captured instead of run. */
async function hotPathStatements(clock: Clock): Promise<SQL[]> {
  const captured: SQL[] = [];
  const db = {} as Db;
  registerPreparedRunner(db, async (query) => {
    captured.push(query);
    return [];
  });
  const report = (i: number) => ({
    actionId: `a-${i}`,
    epoch: i,
    sessionId: "s-1",
    kind: i % 2 ? ("succeeded" as const) : ("failed" as const),
    output: { n: i },
    error: { message: 'it\'s "broken"', retryable: true },
    actor: "alice",
  });
  const claim = {
    groups: [{ g: 0, cluster: "east", labels: { zone: "a" }, room: 2 }],
    slots: [1, 2].map((n) => ({ g: 0, n, sessionId: "s-1", streamToken: "t", workerId: "w" })),
  };
  await settleAndGrant(db, clock, [report(1), report(2)], claim);
  await settleAndGrant(db, clock, [report(3)], undefined);
  await settleAndGrant(db, clock, [], claim);
  const action = (requestId: string | undefined): NewAction => ({
    requestId,
    requestHash: requestId ? "h" : undefined,
    runId: "",
    cluster: "east",
    labelSelector: {},
    payload: { quote: "'; drop table actions; --" },
    priority: 0,
    retryPolicy: ACTION_DEFAULTS.retryPolicy,
    maxSystemRetries: 3,
  });
  for (const requestId of [undefined, "r-1"]) {
    await insertActions(db, clock, [{ id: "x", action: action(requestId), actor: "" }]).catch(() => {});
  }
  await recordProgress(db, clock, [{ actionId: "a", epoch: 1, sessionId: "s", phase: "p" }]);
  // The runner answers no rows, which some of them take for an error after the statement.
  await renewSessions(db, clock, 10_000, [{ sessionId: "s", streamToken: "t", heardAt: 1 }], 5).catch(
    () => {},
  );
  await markStreamsLost(db, clock, [{ sessionId: "s", streamToken: "t", agoMs: 10 }], 10_000);
  return captured;
}

describe("statement text without drizzle's builder", () => {
  it("gives exactly what drizzle gives for every hot-path statement", async () => {
    for (const clock of [databaseClock, createFakeClock(new Date("2026-12-04T10:00:00Z"))]) {
      const statements = await hotPathStatements(clock);
      // Ten: the runner answers no rows, so each settleAndGrant with reports looks at them again
      // in finishActions's statement, which is checked as well.
      expect(statements.length).toBe(10);
      for (const query of statements) {
        const expected = dialect.sqlToQuery(query);
        expect(simpleQueryText(query)).toEqual({ sql: expected.sql, params: expected.params });
      }
    }
  });

  it("numbers plain values of nested, joined and raw parts in order", () => {
    const query = sql`select ${1}, ${"two"}, ${null}, ${true}, ${3n}${undefined} from ${sql.raw("t")} where ${sql.join(
      [sql`a = ${4}`, sql`b = ${"five"}`],
      sql` and `,
    )}`;
    const expected = dialect.sqlToQuery(query);
    expect(simpleQueryText(query)).toEqual({ sql: expected.sql, params: expected.params });
    expect(expected.params).toEqual([1, "two", null, true, 3n, 4, "five"]);
  });

  it("leaves to drizzle what it does not know", () => {
    expect(simpleQueryText(sql`select ${new Date()}`)).toBeUndefined();
    expect(simpleQueryText(sql`select ${sql.placeholder("p")}`)).toBeUndefined();
    expect(simpleQueryText(sql`select ${actions.id} from ${actions}`)).toBeUndefined();
    expect(simpleQueryText(sql`select ${[1, 2]}`)).toBeUndefined();
    expect(simpleQueryText(sql`select ${sql`${1}`.inlineParams()}`)).toBeUndefined();
  });
});
