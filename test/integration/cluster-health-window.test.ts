import { sql } from "drizzle-orm";
import { pino } from "pino";
import { beforeEach, describe, expect, it } from "vitest";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import { HEALTH_WINDOW_MS, readClusterHealth, refreshFadingClusterHealth } from "../../src/store/clusters.js";
import type { Db } from "../../src/store/database.js";
import type { ReapResult } from "../../src/store/queries/reap-sessions.js";
import { queryRows } from "../../src/store/rows.js";
import type { ChangeFeed } from "../../src/work/change-feed.js";
import type { HostedSessions } from "../../src/work/lease/hosted.js";
import { createReaper, type Reaper } from "../../src/work/lease/reaper.js";
import { useFreshDatabase } from "../helpers/database.js";

/**
 * A cluster's stored health (and its cluster_health_changed events) follows
 * the 5-minute window as `clusters list` computes it: the reaper's tick
 * records the recovery once the expiries leave the window, and a later
 * degradation gets its event again.
 */
describe("cluster health follows its window", () => {
  const database = useFreshDatabase();
  let clock: FakeClock;
  let db: Db;
  let cluster: string;
  let published: string[];
  let counter = 0;

  const reaperOn = (): Reaper =>
    createReaper({
      db,
      clock,
      log: pino({ level: "silent" }),
      feed: { publish: (topic: string) => published.push(topic) } as unknown as ChangeFeed,
      hosted: { get: () => undefined } as unknown as HostedSessions,
      graceMs: 10_000,
      heartbeatIntervalMs: 2_000,
      maxSilenceMs: 100_000,
      partitionShare: 0.5,
      timersOn: false,
      expiries: { inc() {} },
      keepHosted: () => undefined,
      publishActions: () => {},
    });

  /** Lease expiries of `workers` distinct workers, stamped now by the fake clock, reported as a reap does. */
  async function expire(reaper: Reaper, workers: number): Promise<void> {
    const expired = [];
    for (let i = 0; i < workers; i++) {
      const workerId = `${cluster}-w${++counter}`;
      await db.execute(sql`
        insert into events (kind, worker_id, cluster, message, details, at)
        values ('lease_expired', ${workerId}, ${cluster}, 'lease expired', '{"cause":"deadline"}'::jsonb,
                ${clock.now()})`);
      expired.push({
        actionId: `a${counter}`,
        epoch: 1,
        workerId,
        sessionId: `s${counter}`,
        cluster,
        state: "QUEUED" as const,
        silentServer: undefined,
      });
    }
    const result: ReapResult = {
      sessions: [],
      expired,
      partitions: [],
      nextDeadline: null,
      dbNow: clock.current(),
    };
    await reaper.report(result);
  }

  const healthEvents = async () =>
    (
      await queryRows<{ message: string }>(
        db,
        sql`select message from events where cluster = ${cluster} and kind = 'cluster_health_changed' order by sequence`,
      )
    ).map((r) => r.message);
  const storedHealth = async () =>
    (await queryRows<{ health: string }>(db, sql`select health from clusters where name = ${cluster}`))[0]
      ?.health;

  beforeEach(async () => {
    clock = createFakeClock();
    db = database.current.db;
    cluster = `c${++counter}`;
    published = [];
    // Each test's clusters alone: an earlier test's, stamped by its own fake clock, would count.
    await db.execute(sql`delete from events`);
    await db.execute(sql`update clusters set health = 'HEALTHY', health_reason = ''`);
    await db.execute(sql`insert into clusters (name) values (${cluster})`);
  });

  it("records the recovery once when the expiries leave the window, and a second degradation again", async () => {
    const reaper = reaperOn();
    await expire(reaper, 3);
    expect(await healthEvents()).toEqual([
      `cluster ${cluster} is now DEGRADED: 3 lease expiries of 3 workers in the last 5 minutes`,
    ]);
    // Within the window: still DEGRADED, however many ticks.
    clock.advance(HEALTH_WINDOW_MS - 1000);
    await reaper.reap();
    await reaper.reap();
    expect(await storedHealth()).toBe("DEGRADED");
    // The window passes: the reaper's tick records the recovery, once.
    clock.advance(2000);
    published = [];
    await reaper.reap();
    await reaper.reap();
    clock.advance(60_000);
    await reaper.reap();
    expect(await storedHealth()).toBe("HEALTHY");
    // What the leasehold_cluster_health gauge reads.
    expect(await readClusterHealth(db)).toContainEqual({ cluster, health: "HEALTHY" });
    expect(published).toContain("events");
    expect(await healthEvents()).toEqual([
      `cluster ${cluster} is now DEGRADED: 3 lease expiries of 3 workers in the last 5 minutes`,
      `cluster ${cluster} is now HEALTHY`,
    ]);
    // A second degradation gets its event.
    await expire(reaper, 3);
    expect((await healthEvents()).at(-1)).toBe(
      `cluster ${cluster} is now DEGRADED: 3 lease expiries of 3 workers in the last 5 minutes`,
    );
    expect(await healthEvents()).toHaveLength(3);
  });

  it("records a transition once when two reapers judge the same cluster", async () => {
    const [one, two] = [reaperOn(), reaperOn()];
    await expire(one, 3);
    clock.advance(HEALTH_WINDOW_MS + 1000);
    await Promise.all([one.reap(), two.reap()]);
    expect(await healthEvents()).toEqual([
      `cluster ${cluster} is now DEGRADED: 3 lease expiries of 3 workers in the last 5 minutes`,
      `cluster ${cluster} is now HEALTHY`,
    ]);
  });

  it("keeps a cluster whose window moved but still counts enough workers, and says when to look next", async () => {
    const reaper = reaperOn();
    const first = clock.current().getTime();
    await expire(reaper, 3);
    clock.advance(60_000);
    await expire(reaper, 3);
    // The first three leave the window; three workers are left in it: still DEGRADED, until they leave too.
    clock.advance(HEALTH_WINDOW_MS - 30_000);
    const early = await refreshFadingClusterHealth(db, clock);
    expect(early.changed).toEqual([]);
    expect(early.next?.getTime()).toBe(first + 60_000 + HEALTH_WINDOW_MS);
    clock.advance(31_000);
    const late = await refreshFadingClusterHealth(db, clock);
    expect(late).toEqual({ changed: [{ cluster, health: "HEALTHY" }], next: undefined });
    expect(await healthEvents()).toEqual([
      `cluster ${cluster} is now DEGRADED: 3 lease expiries of 3 workers in the last 5 minutes`,
      `cluster ${cluster} is now HEALTHY`,
    ]);
  });
});
