import { sql } from "drizzle-orm";
import { describe, expect, it } from "vitest";
import { createFakeClock } from "../../src/store/clock.js";
import { extendAwaitedSessions } from "../../src/store/queries/extend-sessions-on-start.js";
import { queryRows, toDate } from "../../src/store/rows.js";
import { useFreshDatabase } from "../helpers/database.js";

const GRACE_MS = 10_000;
const MAX_SILENCE_MS = 100_000;

describe("the restart extension renewed while a restarted process takes its agents back", () => {
  const database = useFreshDatabase();

  it("extends only the live sessions not heard from since the start, and never one silent past the maximum", async () => {
    const db = database.current.db;
    const start = new Date(Date.now() + 60_000);
    const clock = createFakeClock(start);
    const at = (ms: number) => new Date(start.getTime() + ms).toISOString();
    await db.execute(sql`insert into clusters (name) values ('east')`);
    await db.execute(sql`insert into workers (worker_id, cluster, capacity)
                         select 'w' || i, 'east', 1 from generate_series(1, 4) i`);
    // waiting: its agent has not come back; back: reconnected after the start;
    // silent: not heard from for longer than the maximum silence; ended: reaped earlier.
    await db.execute(sql`insert into sessions (id, worker_id, deadline, last_heard_at, ended_at) values
      ('waiting', 'w1', ${at(GRACE_MS)}::timestamptz, ${at(-1000)}::timestamptz, null),
      ('back', 'w2', ${at(GRACE_MS + 2000)}::timestamptz, ${at(2000)}::timestamptz, null),
      ('silent', 'w3', ${at(GRACE_MS)}::timestamptz, ${at(-MAX_SILENCE_MS + 8000)}::timestamptz, null),
      ('ended', 'w4', ${at(-5000)}::timestamptz, ${at(-1000)}::timestamptz, ${at(-5000)}::timestamptz)`);

    clock.advance(GRACE_MS / 2);
    const options = { graceMs: GRACE_MS, maxSilenceMs: MAX_SILENCE_MS };
    expect(await extendAwaitedSessions(db, clock, start, options)).toBe(2);
    clock.advance(GRACE_MS / 2);
    // `silent` has now been silent for longer than the maximum: the cap holds.
    expect(await extendAwaitedSessions(db, clock, start, options)).toBe(1);

    const rows = await queryRows<{ id: string; deadline: unknown }>(
      db,
      sql`select id, deadline from sessions order by id`,
    );
    const deadlines = Object.fromEntries(
      rows.map((r) => [r.id, toDate(r.deadline).getTime() - start.getTime()]),
    );
    expect(deadlines).toEqual({
      waiting: GRACE_MS + GRACE_MS,
      back: GRACE_MS + 2000,
      silent: GRACE_MS / 2 + GRACE_MS,
      ended: -5000,
    });
  });
});
