import { sql } from "drizzle-orm";
import { beforeAll, beforeEach, describe, expect, it } from "vitest";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { type LostStream, markStreamsLost } from "../../src/store/queries/mark-stream-lost.js";
import { reapSessions } from "../../src/store/queries/reap-sessions.js";
import { queryRows, toDate } from "../../src/store/rows.js";
import { useSessionsDatabase } from "../helpers/sessions.js";

const GRACE_MS = 3_000;

/**
 * The mass-disconnect valve (SPEC rule 10) and streams a server ended on
 * purpose: a rolling restart's handover, or a rebalancing move, tells the
 * worker to reconnect elsewhere with its session intact. Such a session is
 * not lost until its deadline passes; one lost by the transport is.
 */
describe("the partition valve and handed-over streams", () => {
  const store = useSessionsDatabase();
  let db: Db;
  let clock: FakeClock;
  let round = 0;
  /** This test's session ids (each test its own: the workers of the others stay behind, ended). */
  let ids: { a: string; b: string; c: string; d: string };
  beforeAll(() => {
    db = store.db;
  });
  beforeEach(async () => {
    round++;
    // What the previous test left: its sessions end, its leases go, the cluster is not partitioned.
    await db.execute(sql`update clusters set partitioned_at = null where name = 'east'`);
    await db.execute(
      sql`update actions set state = 'QUEUED', session_id = null, worker_id = null where state = 'LEASED'`,
    );
    await db.execute(sql`update sessions set ended_at = now() where ended_at is null`);
    // The deadlines of a, b and c are a second away: each loss below sets its own (heard + grace).
    ids = { a: `a${round}`, b: `b${round}`, c: `c${round}`, d: `d${round}` };
    for (const id of Object.values(ids)) {
      // d stays connected: its renewals are not the point, a deadline far off stands for them.
      await store.session(id, id === ids.d ? 60 : 1);
      await db.execute(sql`
        insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
                             max_system_retries, state, session_id, worker_id, epoch, granted_at)
        values (${`x-${id}`}, 'east', 3, 1000, 2, 10000, 3, 'LEASED', ${id}, ${`w-${id}`}, 1, now())`);
    }
    clock = createFakeClock(
      toDate((await queryRows<{ now: unknown }>(db, sql`select now() as now`))[0]?.now),
    );
  });

  const lose = (id: string, how: Partial<LostStream> = {}) =>
    markStreamsLost(db, clock, [{ sessionId: id, streamToken: `t-${id}`, agoMs: 0, ...how }], GRACE_MS);
  const reap = () =>
    reapSessions(db, clock, { limit: 100, partitionShare: 0.5, maxSilenceMs: 100_000, graceMs: GRACE_MS });
  const partitioned = async () =>
    (
      await queryRows<{ p: boolean }>(
        db,
        sql`select partitioned_at is not null as p from clusters where name = 'east'`,
      )
    )[0]?.p;
  const handedOver = async (id: string) =>
    (
      await queryRows<{ h: boolean }>(db, sql`select stream_handed_over as h from sessions where id = ${id}`)
    )[0]?.h;

  it("does not count sessions handed over at a close or moved by a rebalance as lost while their agents may reconnect", async () => {
    // A killed agent: its stream closes by transport. 2.6 s later a server stops and hands over
    // its two streams (one of them moved by a rebalance would be the same).
    expect(await lose(ids.a)).toHaveLength(1);
    clock.advance(2_600);
    await lose(ids.b, { endedBy: "SHUTTING_DOWN" });
    clock.advance(300);
    await lose(ids.c, { rebalanced: true });
    expect([await handedOver(ids.a), await handedOver(ids.b), await handedOver(ids.c)]).toEqual([
      false,
      true,
      true,
    ]);

    // The killed agent's deadline passes while the others may still reconnect (a quarter of the
    // grace period, 750 ms): 1 of 4 lost, not 3 of 4. It is reaped at its deadline.
    clock.advance(200);
    const result = await reap();
    expect(result.partitions).toEqual([]);
    expect(result.sessions.map((s) => s.sessionId)).toEqual([ids.a]);
    expect(await partitioned()).toBe(false);

    // Handed over and not back: when the first of their deadlines comes, the other, whose agent
    // has had its time to reconnect, counts as lost too (2 of 3), though its own deadline is
    // 300 ms later: deadlines spread over an interval would otherwise be judged one by one, and
    // never add up to a partition.
    clock.advance(2_510);
    const later = await reap();
    expect(later.partitions).toEqual([{ cluster: "east", partitioned: true, lost: 2, live: 3 }]);
    expect(later.sessions).toEqual([]);
  });

  it("partitions a cluster when most of its sessions holding leases lost their streams by transport", async () => {
    await lose(ids.a);
    clock.advance(2_000);
    await lose(ids.b);
    await lose(ids.c);
    clock.advance(1_500);
    const result = await reap();
    expect(result.partitions).toEqual([{ cluster: "east", partitioned: true, lost: 3, live: 4 }]);
    expect(result.sessions).toEqual([]);
    expect(await partitioned()).toBe(true);
  });
});
