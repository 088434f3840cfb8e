import { sql } from "drizzle-orm";
import { afterEach, describe, expect, it } from "vitest";
import type { RawServerOptions } from "../../src/config.js";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { queryRows, toNumber } from "../../src/store/rows.js";
import { ACTION_BATCH, EVENT_SCAN } from "../../src/work/history.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus, failure } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const DAY_MS = 86_400_000;

/**
 * --history-retention (src/store/queries/remove-history.ts): what ended
 * before it goes, with everything written about it; nothing else does. Fake
 * clock; the pass runs when the test says.
 */
describe("history retention", () => {
  let clock: FakeClock;
  let t: TestServer | undefined;
  let db: Db;
  const workers: TestWorker[] = [];

  const start = async (config: RawServerOptions = {}) => {
    clock = createFakeClock();
    t = await startTestServer({
      config: { historyRetention: "7d", ...config },
      overrides: { clock, timers: false, wrapDb: (d) => (db = d) },
    });
    return t;
  };
  afterEach(async () => {
    for (const w of workers.splice(0)) w.drop();
    await t?.[Symbol.asyncDispose]();
    t = undefined;
  });

  const server = () => t as TestServer;
  const actions = () => server().client(ActionService);
  const submit = async (requestId = "") =>
    (await actions().submitAction({ cluster: "east", requestId })).action?.id ?? "";
  const count = async (query: ReturnType<typeof sql>) =>
    toNumber((await queryRows<{ n: unknown }>(db, query))[0]?.n ?? 0);
  const removedThrough = async () => count(sql`select events_removed_through as n from history`);

  it("removes actions ended before it, with their attempts and events, and keeps the rest", async () => {
    await start();
    const w = await connectWorker(server().address, { workerId: "w1", cluster: "east", capacity: 2 });
    workers.push(w);
    const succeeded = await submit("first");
    await server().server.leases.tick.dispatch();
    const grant = await w.next("grant");
    expect(await w.complete(grant, { output: { ok: true } })).toMatchObject({ accepted: true });
    const running = await submit();
    await server().server.leases.tick.dispatch();
    const runningGrant = await w.next("grant");
    const endsLater = await submit();
    await server().server.leases.tick.dispatch();
    const laterGrant = await w.next("grant");
    // Both slots are taken: this one is cancelled while queued. No worker serves west.
    const cancelled = await submit();
    await actions().cancelAction({ actionId: cancelled });
    const queued = (await actions().submitAction({ cluster: "west" })).action?.id ?? "";

    clock.advance(8 * DAY_MS);
    // Ends now, a day inside the retention.
    await w.heartbeat(1, [runningGrant, laterGrant]);
    await server().server.leases.tick.renew();
    expect(await w.complete(laterGrant, { output: {} })).toMatchObject({ accepted: true });

    expect(await server().server.history.removeDue()).toMatchObject({ actions: 2 });
    for (const gone of [succeeded, cancelled]) {
      await expectStatus(actions().getAction({ actionId: gone }), Code.NotFound, /action/);
      expect(await count(sql`select count(*) as n from attempts where action_id = ${gone}`)).toBe(0);
      expect(await count(sql`select count(*) as n from events where action_id = ${gone}`)).toBe(0);
    }
    for (const [id, state] of [
      [running, ActionState.LEASED],
      [endsLater, ActionState.SUCCEEDED],
      [queued, ActionState.QUEUED],
    ] as const) {
      const got = await actions().getAction({ actionId: id });
      expect(got.action?.state).toBe(state);
      expect(await count(sql`select count(*) as n from events where action_id = ${id}`)).toBeGreaterThan(0);
    }
    // The request id of a removed action is free: the same call queues a new one.
    const again = await actions().submitAction({ cluster: "east", requestId: "first" });
    expect(again).toMatchObject({ created: true });
    expect(again.action?.id).not.toBe(succeeded);
    const metrics = await server().server.metrics.registry.getSingleMetricAsString(
      "leasehold_history_removed_total",
    );
    expect(metrics).toContain('leasehold_history_removed_total{record="action"} 2');
    expect(server().logs.find((l) => l.msg === "removed history past --history-retention")).toMatchObject({
      actions: 2,
    });
  });

  it("keeps an ended action that has a newer event, or whose deployment still exists", async () => {
    await start();
    const [newer, deployed, plain] = [await submit(), await submit(), await submit()];
    for (const id of [newer, deployed, plain]) await actions().cancelAction({ actionId: id });
    clock.advance(8 * DAY_MS);
    // An event written now about an old action (as a deployment's delete writes one).
    await db.execute(
      sql`insert into events (kind, action_id, cluster, message, at)
          values ('resource_deleted', ${newer}, 'east', 'now', ${clock.current().toISOString()}::timestamptz)`,
    );
    await db.execute(
      sql`insert into resources (id, kind, ownership, action_id) values ('d1', 'deployment', 'WORKSPACE', ${deployed})`,
    );
    expect(await server().server.history.removeDue()).toMatchObject({ actions: 1 });
    await expectStatus(actions().getAction({ actionId: plain }), Code.NotFound, /action/);
    for (const id of [newer, deployed])
      expect((await actions().getAction({ actionId: id })).action?.id).toBe(id);
  });

  it("removes scope leases closed before it with their events, and keeps open ones", async () => {
    await start();
    const leases = server().client(LeaseService);
    const open = async () => (await leases.createLease({ runtime: "east" })).lease?.id ?? "";
    const [committed, rolledBack, stillOpen] = [await open(), await open(), await open()];
    await leases.commitLease({ leaseId: committed });
    await leases.rollbackLease({ leaseId: rolledBack });
    clock.advance(8 * DAY_MS);

    expect(await server().server.history.removeDue()).toMatchObject({ leases: 2 });
    for (const gone of [committed, rolledBack]) {
      await expectStatus(leases.getLease({ leaseId: gone }), Code.NotFound, /lease/);
      expect(await count(sql`select count(*) as n from events where lease_id = ${gone}`)).toBe(0);
    }
    expect((await leases.getLease({ leaseId: stillOpen })).lease?.id).toBe(stillOpen);
    expect(await count(sql`select count(*) as n from events where lease_id = ${stillOpen}`)).toBeGreaterThan(
      0,
    );
  });

  it("removes other events by age, and refuses a watch that would resume before them", async () => {
    await start();
    const w = await connectWorker(server().address, { workerId: "w1", cluster: "east", capacity: 1 });
    workers.push(w);
    w.goodbye();
    await w.ended;
    const queued = await submit();
    clock.advance(8 * DAY_MS);
    const before = await count(sql`select count(*) as n from events where action_id is null`);
    expect(before).toBeGreaterThan(0);

    const removed = await server().server.history.removeDue();
    expect(removed.events).toBe(before);
    expect(await count(sql`select count(*) as n from events where action_id is null`)).toBe(0);
    const through = await removedThrough();
    expect(through).toBeGreaterThan(1);

    const events = server().client(EventService);
    const first = async (afterSequence: bigint) => {
      for await (const m of events.watchEvents({ afterSequence })) return m.event;
      return undefined;
    };
    const refused = await failure(first(1n));
    expect(refused).toMatchObject({
      code: Code.OutOfRange,
      reason: "EVENTS_REMOVED",
      info: { removed_through: String(through) },
    });
    expect(refused.message).toContain(`after_sequence ${through}`);
    // From the mark, or from 0, the watch is served: the queued action's submit is kept.
    expect((await first(BigInt(through)))?.actionId).toBe(queued);
    expect((await first(0n))?.actionId).toBe(queued);
  });

  it("refuses a watch resuming before removed events even when nothing newer is stored", async () => {
    await start();
    const id = await submit();
    await actions().cancelAction({ actionId: id });
    clock.advance(8 * DAY_MS);
    expect(await server().server.history.removeDue()).toMatchObject({ actions: 1 });
    expect(await count(sql`select count(*) as n from events`)).toBe(0);
    const through = await removedThrough();
    // Caught up with the log (empty), the watch would have waited for the next event instead.
    const watch = server().client(EventService).watchEvents({ afterSequence: 1n });
    const refused = await failure(async () => {
      for await (const _ of watch) return;
    });
    expect(refused).toMatchObject({ code: Code.OutOfRange, reason: "EVENTS_REMOVED" });
    expect(refused.info.removed_through).toBe(String(through));
    // From the mark itself the watch is served: the log ends there, not at the empty table's 0.
    const resumed = server()
      .client(EventService)
      .watchEvents({ afterSequence: BigInt(through) })
      [Symbol.asyncIterator]();
    const next = resumed.next();
    const later = await submit();
    expect((await next).value?.event?.actionId).toBe(later);
    await resumed.return?.();
  });

  it("works through a backlog larger than a batch", async () => {
    await start();
    const total = ACTION_BATCH * 2 + 1;
    const ids: string[] = [];
    for (let i = 0; i < total; i += 1000) {
      const n = Math.min(1000, total - i);
      const { results } = await actions().submitActions({
        actions: Array.from({ length: n }, () => ({ cluster: "east" })),
      });
      ids.push(...results.map((r) => r.action?.id ?? ""));
    }
    await db.execute(sql`update actions set state = 'SUCCEEDED', finished_at = now()`);
    // Events about no record, more than one statement looks at.
    await db.execute(
      sql`insert into events (kind, cluster, message) select 'stream_lost', 'east', 'old' from generate_series(1, ${EVENT_SCAN + 10})`,
    );
    clock.advance(8 * DAY_MS);
    expect(await server().server.history.removeDue()).toEqual({
      actions: total,
      leases: 0,
      events: total + EVENT_SCAN + 10,
      // And "east", which nothing is left of.
      clusters: 1,
    });
    expect(await count(sql`select count(*) as n from actions`)).toBe(0);
    expect(await count(sql`select count(*) as n from events`)).toBe(0);
    expect(ids).toHaveLength(total);
  });

  it("forgets a cluster nothing is left of, and keeps one with a worker, an action or a partition", async () => {
    await start();
    const w = await connectWorker(server().address, { workerId: "w1", cluster: "worked", capacity: 1 });
    workers.push(w);
    for (const cluster of ["typo", "split"]) {
      const { action } = await actions().submitAction({ cluster });
      await actions().cancelAction({ actionId: action?.id ?? "" });
    }
    await actions().submitAction({ cluster: "busy" });
    await db.execute(sql`update clusters set partitioned_at = now() where name = 'split'`);
    const names = async () =>
      (await queryRows<{ name: string }>(db, sql`select name from clusters order by name`)).map(
        (r) => r.name,
      );
    expect(await names()).toEqual(["busy", "split", "typo", "worked"]);
    // Within the retention nothing goes, not even the cluster of a cancelled action alone.
    clock.advance(DAY_MS);
    expect(await server().server.history.removeDue()).toMatchObject({ clusters: 0 });
    clock.advance(7 * DAY_MS);
    expect(await server().server.history.removeDue()).toMatchObject({ actions: 2, clusters: 1 });
    expect(await names()).toEqual(["busy", "split", "worked"]);
    // Used again, it is made again.
    await actions().submitAction({ cluster: "typo" });
    expect(await names()).toEqual(["busy", "split", "typo", "worked"]);
  });

  it("keeps everything with 0", async () => {
    await start({ historyRetention: "0" });
    const id = await submit();
    await actions().cancelAction({ actionId: id });
    clock.advance(3650 * DAY_MS);
    expect(await server().server.history.removeDue()).toEqual({
      actions: 0,
      leases: 0,
      events: 0,
      clusters: 0,
    });
    expect((await actions().getAction({ actionId: id })).action?.id).toBe(id);
  });
});
