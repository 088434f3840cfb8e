import { sql } from "drizzle-orm";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { type Database, type Db, openDatabase } from "../../src/store/database.js";
import { type ChangeFeed, createChangeFeed, EVENTS_TOPIC } from "../../src/work/change-feed.js";
import type { EventFilter, EventRecord } from "../../src/work/event.js";
import { CATCH_UP_READS, createEventService, type EventService } from "../../src/work/event-service.js";
import { GAP_WAIT_MS } from "../../src/work/event-tail.js";
import { silentBus } from "../helpers/bus.js";
import { freshStore, type TestStore } from "../helpers/database.js";

/**
 * Watches of the event log share one reader per process (src/work/event-tail.ts):
 * each new event is read once and filtered in memory for every watch; a watch
 * behind what memory holds reads the database until it catches up.
 */
describe("watching the event log", () => {
  let store: TestStore;
  let database: Database;
  beforeAll(async () => {
    store = await freshStore();
    database = await openDatabase({ url: store.url, dataDir: store.dataDir });
  });
  afterAll(async () => {
    await database?.close();
    await store?.drop();
  });

  /** Appends an event as the server's statements do, and wakes the watches. */
  async function append(feed: ChangeFeed, cluster: string, kind = "action_submitted"): Promise<number> {
    const result: unknown = await database.db.execute(
      sql`insert into events (kind, cluster, message) values (${kind}, ${cluster}, 'test') returning sequence`,
    );
    const rows = Array.isArray(result) ? result : (result as { rows: unknown[] }).rows;
    feed.publish(EVENTS_TOPIC);
    return Number((rows[0] as { sequence: unknown }).sequence);
  }

  /** Takes the next sequence number as an insert would, without storing anything. */
  async function takeSequence(): Promise<number> {
    const result: unknown = await database.db.execute(
      sql`select nextval(pg_get_serial_sequence('events', 'sequence')) as taken`,
    );
    const rows = Array.isArray(result) ? result : (result as { rows: unknown[] }).rows;
    return Number((rows[0] as { taken: unknown }).taken);
  }

  /** Stores an event with a sequence number taken earlier (the insert of a slow transaction). */
  async function insertAt(sequence: number, cluster: string): Promise<void> {
    await database.db.execute(
      sql`insert into events (sequence, kind, cluster, message) values (${sequence}, 'action_submitted', ${cluster}, 'late')`,
    );
  }

  async function lastSequence(): Promise<number> {
    const result: unknown = await database.db.execute(
      sql`select coalesce(max(sequence), 0) as last from events`,
    );
    const rows = Array.isArray(result) ? result : (result as { rows: unknown[] }).rows;
    return Number((rows[0] as { last: unknown }).last);
  }

  /** A watch as an iterator the test pulls from, one event at a time. */
  function open(events: EventService, filter: EventFilter, after?: number) {
    const stop = new AbortController();
    const iterator = events.watch(filter, after, stop.signal)[Symbol.asyncIterator]();
    return {
      async take(n: number): Promise<EventRecord[]> {
        const taken: EventRecord[] = [];
        while (taken.length < n) {
          const next = await iterator.next();
          if (next.done) throw new Error("the watch ended");
          taken.push(next.value);
        }
        return taken;
      },
      async close() {
        stop.abort();
        await iterator.return?.();
      },
    };
  }

  /** The database handle, counting the statements run through it. */
  function counting(db: Db): { db: Db; readonly statements: number } {
    const counter = { statements: 0, db };
    counter.db = new Proxy(db, {
      get(target, property, receiver) {
        const value = Reflect.get(target, property, receiver);
        if (property !== "execute") return value;
        return (...args: unknown[]) => {
          counter.statements++;
          return (value as (...a: unknown[]) => unknown).apply(target, args);
        };
      },
    });
    return counter;
  }

  it("gives every watch its own filter's events, in order, reading each new event once for all of them", async () => {
    const feed = createChangeFeed();
    const counted = counting(database.db);
    const events = createEventService({ db: counted.db, feed });
    // The first watch starts the shared reader; once it has seen an event, the reader is past it.
    const all = open(events, {});
    const started = await firstFromNow(feed, all, "marker");
    // Markers appended after the first one the watch got are still ahead of it.
    const ahead = started.appended.filter((n) => n > started.first.sequence);
    expect((await all.take(ahead.length)).map((e) => e.sequence)).toEqual(ahead);
    const marker = started.appended.at(-1) as number;
    const east = open(events, { cluster: "east" }, marker);
    const westGrants = open(events, { cluster: "west", kind: "lease_granted" }, marker);
    const pending = [all.take(6), east.take(2), westGrants.take(1)] as const;

    const before = counted.statements;
    const appended: number[] = [];
    for (const [cluster, kind] of [
      ["east", "action_submitted"],
      ["west", "action_submitted"],
      ["west", "lease_granted"],
      ["north", "lease_granted"],
      ["east", "lease_granted"],
      ["west", "action_submitted"],
    ] as const) {
      appended.push(await append(feed, cluster, kind));
    }
    const [everything, eastEvents, grantsInWest] = await Promise.all(pending);

    expect(everything.map((e) => e.sequence)).toEqual(appended);
    expect(eastEvents.map((e) => [e.sequence, e.cluster])).toEqual([
      [appended[0], "east"],
      [appended[4], "east"],
    ]);
    expect(grantsInWest.map((e) => [e.sequence, e.cluster, e.kind])).toEqual([
      [appended[2], "west", "lease_granted"],
    ]);
    // At most one read of the log per append (fewer when wake-ups merge), not one per watch; and
    // two looks each, as they start, for the two watches that resume after a sequence: at how far
    // --history-retention removed the log, and at its newest event (a resume past it is refused).
    expect(counted.statements - before).toBeLessThanOrEqual(appended.length + 1 + 2 * 2);
    await Promise.all([all.close(), east.close(), westGrants.close()]);
  });

  it("replays from an old sequence beyond what memory holds, then follows live, without gaps or repeats", async () => {
    const feed = createChangeFeed();
    const events = createEventService({ db: database.db, feed, tailCapacity: 8 });
    const first = await append(feed, "replay");
    const stored = [first];
    for (let i = 0; i < 29; i++) stored.push(await append(feed, "replay"));
    // A watch already following keeps the tail running while the second one replays.
    const live = open(events, { cluster: "replay" });
    const startLive = live.take(1);
    await Promise.resolve();
    const replay = open(events, { cluster: "replay" }, first - 1);
    expect((await replay.take(30)).map((e) => e.sequence)).toEqual(stored);

    const later: number[] = [];
    for (let i = 0; i < 20; i++) later.push(await append(feed, "replay"));
    expect((await replay.take(20)).map((e) => e.sequence)).toEqual(later);
    expect((await startLive).map((e) => e.sequence)).toEqual([later[0]]);
    await Promise.all([live.close(), replay.close()]);
  });

  it("lets only a few watches read the log at once while many replay it from the start", async () => {
    const feed = createChangeFeed();
    let reading = 0;
    let most = 0;
    // Counts the statements in flight; each waits a turn, so that overlapping reads overlap.
    const db = new Proxy(database.db, {
      get(target, property, receiver) {
        const value = Reflect.get(target, property, receiver);
        if (property !== "execute") return value;
        return async (...args: unknown[]) => {
          most = Math.max(most, ++reading);
          try {
            await new Promise((resolve) => setImmediate(resolve));
            return await (value as (...a: unknown[]) => Promise<unknown>).apply(target, args);
          } finally {
            reading--;
          }
        };
      },
    });
    const events = createEventService({ db, feed, tailCapacity: 8 });
    const first = await append(feed, "crowd");
    for (let i = 0; i < 1_199; i++) await append(feed, "crowd");
    const watches = Array.from({ length: 12 }, () => open(events, { cluster: "crowd" }, first - 1));
    const replayed = await Promise.all(watches.map((w) => w.take(1_200)));
    for (const events of replayed) expect(events[1_199]?.sequence).toBe(first + 1_199);
    // The shared tail's read, and at most CATCH_UP_READS of the replays (12 before).
    expect(most).toBeLessThanOrEqual(CATCH_UP_READS + 1);
    await Promise.all(watches.map((w) => w.close()));
  });

  /**
   * The first event a watch from now yields, appending one event after another until it does
   * (when its start is read is up to it): none of those stored before the watch opened.
   */
  async function firstFromNow(feed: ChangeFeed, watch: ReturnType<typeof open>, cluster: string) {
    let first: EventRecord | undefined;
    const taken = watch.take(1).then(([e]) => {
      first = e;
    });
    const appended: number[] = [];
    while (first === undefined) {
      appended.push(await append(feed, cluster));
      await Promise.race([taken, new Promise<void>((resolve) => setImmediate(resolve))]);
    }
    return { first, appended };
  }

  it("starts a watch from now, not from where the shared reader started, when it joins late", async () => {
    const feed = createChangeFeed();
    const events = createEventService({ db: database.db, feed, tailCapacity: 8 });
    const early = open(events, { cluster: "late" }, await lastSequence());
    const earlyTakes = early.take(20);
    const before: number[] = [];
    for (let i = 0; i < 20; i++) before.push(await append(feed, "late"));
    expect((await earlyTakes).map((e) => e.sequence)).toEqual(before);
    // The reader has read all 20 (and dropped some from memory); a watch from now sees none of them.
    const late = open(events, { cluster: "late" });
    const { first, appended } = await firstFromNow(feed, late, "late");
    expect(appended).toContain(first.sequence);
    await Promise.all([early.close(), late.close()]);
  });

  it("starts a watch from now at the end of the log while the shared reader waits at a hole", async () => {
    const feed = createChangeFeed();
    const events = createEventService({ db: database.db, feed });
    const live = open(events, { cluster: "gap" }, await lastSequence());
    const liveTakes = live.take(2);
    // A sequence number taken by a transaction not committed yet: the reader waits at it.
    const hole = await takeSequence();
    const stored = await append(feed, "gap");
    expect(stored).toBe(hole + 1);
    const late = open(events, { cluster: "gap" });
    const lateFirst = firstFromNow(feed, late, "gap");
    // The transaction holding the hole commits: the reader goes on; the late watch opened after
    // both were stored (or taken), so it gets neither.
    await insertAt(hole, "gap");
    feed.publish(EVENTS_TOPIC);
    expect((await liveTakes).map((e) => e.sequence)).toEqual([hole, stored]);
    const { first, appended } = await lateFirst;
    expect(appended).toContain(first.sequence);
    expect(first.sequence).toBeGreaterThan(stored);
    await Promise.all([live.close(), late.close()]);
  });

  it("lets a watch that stopped reading fall behind memory and still get every event in order", async () => {
    const feed = createChangeFeed();
    const events = createEventService({ db: database.db, feed, tailCapacity: 8 });
    const from = await lastSequence();
    const slow = open(events, { cluster: "slow" }, from);
    const fast = open(events, { cluster: "slow" }, from);
    const slowFirst = slow.take(1);
    const fastAll = fast.take(40);
    const appended: number[] = [];
    for (let i = 0; i < 40; i++) appended.push(await append(feed, "slow"));
    // The fast watch has taken all 40, so the tail has read past what it keeps of them.
    expect((await fastAll).map((e) => e.sequence)).toEqual(appended);
    const slowEvents = [...(await slowFirst), ...(await slow.take(39))];
    expect(slowEvents.map((e) => e.sequence)).toEqual(appended);
    await Promise.all([slow.close(), fast.close()]);
  });

  it("ends every watch with the database's error when the log cannot be read", async () => {
    const feed = createChangeFeed();
    let failing = false;
    const db = new Proxy(database.db, {
      get(target, property, receiver) {
        const value = Reflect.get(target, property, receiver);
        if (property !== "execute") return value;
        return (...args: unknown[]) =>
          failing
            ? Promise.reject(new Error("connection lost"))
            : (value as (...a: unknown[]) => unknown).apply(target, args);
      },
    });
    const events = createEventService({ db, feed });
    const a = open(events, {});
    const b = open(events, { cluster: "x" });
    const pending = [a.take(1), b.take(1)].map((p) => p.catch((e: unknown) => e));
    await Promise.resolve();
    await new Promise<void>((resolve) => setImmediate(resolve));
    failing = true;
    feed.publish(EVENTS_TOPIC);
    for (const outcome of await Promise.all(pending)) {
      expect(outcome).toBeInstanceOf(Error);
      expect((outcome as Error).message).toBe("connection lost");
    }
    // A new watch starts a new reader, which reads again once the database answers.
    failing = false;
    const c = open(events, { cluster: "after" }, await lastSequence());
    const next = c.take(1);
    const sequence = await append(feed, "after");
    expect((await next).map((e) => e.sequence)).toEqual([sequence]);
    await c.close();
  });

  it("resumes from an old sequence across old holes without waiting at each of them", async () => {
    // Rolled-back inserts left holes long ago; each was waited at for GAP_WAIT_MS, one after the
    // other. Numbers below an end of the log seen that long ago cannot still commit.
    const feed = createChangeFeed();
    const events = createEventService({ db: database.db, feed });
    const from = await lastSequence();
    const stored: number[] = [];
    const holes = 6;
    for (let i = 0; i < holes; i++) {
      await takeSequence();
      stored.push(await append(feed, "old-holes"));
    }
    const started = performance.now();
    const watch = open(events, { cluster: "old-holes" }, from);
    expect((await watch.take(holes)).map((e) => e.sequence)).toEqual(stored);
    // Before, a wait at each hole: holes × GAP_WAIT_MS. Now one, while the new tail's first look
    // at the end of the log grows old enough.
    expect(performance.now() - started).toBeLessThan((holes * GAP_WAIT_MS) / 2);
    await watch.close();
  });

  it("reads an event whose wake-up never came, when other processes share the database", async () => {
    // Another process stored the event, and its NOTIFY was lost (it failed, or the process was
    // killed after its commit): no wake-up arrives, and the reader must look again by itself.
    const feed = createChangeFeed(silentBus(), 20);
    const events = createEventService({ db: database.db, feed });
    const watch = open(events, { cluster: "unheard" }, await lastSequence());
    // One event heard of, read: the reader has caught up and waits for the next wake-up.
    const heard = await append(feed, "unheard");
    expect((await watch.take(1)).map((e) => e.sequence)).toEqual([heard]);
    const next = watch.take(1);
    const result: unknown = await database.db.execute(
      sql`insert into events (kind, cluster, message) values ('action_submitted', 'unheard', 'no wake-up') returning sequence`,
    );
    const rows = Array.isArray(result) ? result : (result as { rows: unknown[] }).rows;
    expect((await next).map((e) => e.sequence)).toEqual([
      Number((rows[0] as { sequence: unknown }).sequence),
    ]);
    await watch.close();
  });

  // PGlite has one connection: no transaction can hold a sequence number while another commits.
  it.runIf(inject("driver") === "postgres")(
    "waits at a hole for the transaction that holds the lower sequence, then sends both in order",
    async () => {
      const feed = createChangeFeed();
      const events = createEventService({ db: database.db, feed });
      const watch = open(events, { cluster: "hole" }, await lastSequence());
      const two = watch.take(2);
      const other = postgres(store.url as string, { max: 1, onnotice: () => {} });
      try {
        let releaseLow!: () => void;
        const lowCommitted = other.begin(async (tx) => {
          const [row] =
            await tx`insert into events (kind, cluster, message) values ('action_submitted', 'hole', 'low') returning sequence`;
          await new Promise<void>((resolve) => {
            releaseLow = resolve;
          });
          return Number(row?.sequence);
        });
        // The low sequence is taken and not yet visible; the high one commits first.
        while (releaseLow === undefined) await new Promise<void>((resolve) => setImmediate(resolve));
        const high = await append(feed, "hole");
        releaseLow();
        const low = await lowCommitted;
        feed.publish(EVENTS_TOPIC);
        expect(low).toBeLessThan(high);
        expect((await two).map((e) => e.sequence)).toEqual([low, high]);
      } finally {
        await other.end();
        await watch.close();
      }
    },
  );
});
