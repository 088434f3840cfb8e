import { sql } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { markStreamsLost, type StreamLoss } from "../../src/store/queries/mark-stream-lost.js";
import { queryRows } from "../../src/store/rows.js";
import { useSessionsDatabase } from "../helpers/sessions.js";

/** The stream-loss statement: one for a whole batch, each loss conditional on its session and stream. */
describe("markStreamsLost", () => {
  const store = useSessionsDatabase();
  let db: Db;
  beforeAll(() => {
    db = store.db;
  });
  const session = store.session;

  const row = async (id: string) => {
    const [r] = await queryRows<{ ms: unknown; lost: boolean; token: string | null; events: number }>(
      db,
      sql`select floor(extract(epoch from deadline) * 1000)::float8 as ms, stream_lost_at is not null as lost,
                 stream_token as token,
                 (select count(*)::int from events e where e.session_id = s.id and e.kind = 'stream_lost') as events
          from sessions s where id = ${id}`,
    );
    return { ms: Number(r?.ms), lost: r?.lost, token: r?.token, events: r?.events };
  };

  it("records every loss of a batch in one statement, each at last heard + grace, and none it must not", async () => {
    await session("a", 1);
    await session("b", 1);
    await session("extended", 600); // a restart's extension: later than heard + grace, kept
    await session("moved", 30); // now attached to another stream: the token below is stale
    await session("ended", 30, true);
    const losses = await markStreamsLost(
      db,
      clock,
      [
        { sessionId: "a", streamToken: "t-a", agoMs: 250.4 },
        { sessionId: "moved", streamToken: "t-elsewhere", agoMs: 0 },
        { sessionId: "b", streamToken: "t-b", agoMs: 4_000 },
        { sessionId: "extended", streamToken: "t-extended", agoMs: 0 },
        { sessionId: "ended", streamToken: "t-ended", agoMs: 0 },
        { sessionId: "gone", streamToken: "t-gone", agoMs: 0 },
      ],
      10_000,
    );

    const [a, moved, b, extended, ended, gone] = losses;
    expect([moved, ended, gone]).toEqual([undefined, undefined, undefined]);
    const recorded = (loss: StreamLoss | undefined): StreamLoss => {
      expect(loss).toBeDefined();
      return loss as StreamLoss;
    };
    const dbNowMs = recorded(a).dbNow.getTime();
    // Whole milliseconds: the database's now (as the statement saw it) + grace - ago.
    expect(Math.abs(recorded(a).deadline.getTime() - (dbNowMs + 10_000 - 250))).toBeLessThanOrEqual(1);
    expect(Math.abs(recorded(b).deadline.getTime() - (dbNowMs + 10_000 - 4_000))).toBeLessThanOrEqual(1);
    expect(recorded(extended).deadline.getTime()).toBeGreaterThan(dbNowMs + 500_000);
    expect(recorded(a).workerId).toBe("w-a");

    for (const id of ["a", "b", "extended"]) {
      const r = await row(id);
      expect(r, id).toMatchObject({ lost: true, token: null, events: 1 });
    }
    expect(await row("moved")).toMatchObject({ lost: false, token: "t-moved", events: 0 });
    expect(await row("ended")).toMatchObject({ lost: false, events: 0 });
    expect((await row("a")).ms).toBe(recorded(a).deadline.getTime());
  });

  it("tells a stream this server ended to rebalance apart from a lost one, in the same batch", async () => {
    await session("lost", 1);
    await session("rebalanced", 1);
    await markStreamsLost(
      db,
      clock,
      [
        { sessionId: "lost", streamToken: "t-lost", agoMs: 0 },
        { sessionId: "rebalanced", streamToken: "t-rebalanced", agoMs: 0, rebalanced: true },
      ],
      10_000,
    );
    const events = await queryRows<{ session_id: string; message: string; details: Record<string, unknown> }>(
      db,
      sql`select session_id, message, details from events
          where kind = 'stream_lost' and session_id in ('lost', 'rebalanced') order by session_id`,
    );
    expect(
      events.map((e) => [e.session_id, e.message, Object.keys(e.details).sort(), e.details.reason]),
    ).toEqual([
      [
        "lost",
        expect.stringMatching(/^stream lost for worker w-lost; session in grace until .+Z$/),
        ["deadline"],
        undefined,
      ],
      [
        "rebalanced",
        expect.stringMatching(
          /^stream of worker w-rebalanced ended to rebalance \(this server hosted more than its share\); it reconnects to another server; session in grace until .+Z$/,
        ),
        ["deadline", "reason"],
        "REBALANCING",
      ],
    ]);
  });

  it("records nothing for an empty batch, without a statement", async () => {
    expect(await markStreamsLost(db, clock, [], 10_000)).toEqual([]);
  });
});
