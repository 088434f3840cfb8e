import { once } from "node:events";
import net from "node:net";
import { sql } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { renewSessions } from "../../src/store/queries/renew-sessions.js";
import { queryRows } from "../../src/store/rows.js";
import type { Hosted, HostedSessions } from "../../src/work/lease/hosted.js";
import { createRenewal, RENEW_CHUNK } from "../../src/work/lease/renewal.js";
import { intercepting } from "../helpers/intercept-db.js";
import { useSessionsDatabase } from "../helpers/sessions.js";

/** The renewal statement: one row back, naming only the sessions that are not last heard + grace. */
describe("renewSessions", () => {
  const store = useSessionsDatabase();
  let db: Db;
  beforeAll(() => {
    db = store.db;
  });
  const session = store.session;

  const stored = async (id: string) => {
    const [row] = await queryRows<{ ms: unknown }>(
      db,
      sql`select floor(extract(epoch from deadline) * 1000)::float8 as ms from sessions where id = ${id}`,
    );
    return Number(row?.ms);
  };

  it("renews to last heard + grace, keeps a later deadline, and says why it did not renew the others", async () => {
    await session("plain", 1);
    await session("extended", 600); // a restart's take-back extension: later than heard + grace
    await session("ended", 30, true);
    await session("moved", 30); // now attached to another stream: the token below is stale
    await session("quiet", 1);
    await session("reaped", 30, true);
    await session("left", 30, true); // another stream took it, then said goodbye
    await db.execute(sql`update sessions set end_reason = 'reaped', stream_token = null where id = 'reaped'`);
    await db.execute(sql`update sessions set end_reason = 'goodbye', stream_token = null where id = 'left'`);
    const nowMs = performance.now();
    const heard = [
      { sessionId: "plain", streamToken: "t-plain", heardAt: nowMs - 250 },
      { sessionId: "extended", streamToken: "t-extended", heardAt: nowMs },
      { sessionId: "ended", streamToken: "t-ended", heardAt: nowMs },
      { sessionId: "moved", streamToken: "t-elsewhere", heardAt: nowMs },
      { sessionId: "gone", streamToken: "t-gone", heardAt: nowMs },
      { sessionId: "quiet", streamToken: "t-quiet", heardAt: nowMs - 4_000 },
      { sessionId: "reaped", streamToken: "t-reaped", heardAt: nowMs },
      { sessionId: "left", streamToken: "t-left", heardAt: nowMs },
    ];
    const { deadlinesMs, dbNowMs, notRenewed } = await renewSessions(db, clock, 10_000, heard, nowMs);

    expect(Math.abs(dbNowMs - Date.now())).toBeLessThan(60_000);
    expect(deadlinesMs[0]).toBe(dbNowMs + 10_000 - 250);
    expect(deadlinesMs[0]).toBe(await stored("plain"));
    expect(deadlinesMs[1]).toBe(await stored("extended"));
    expect(deadlinesMs[1]).toBeGreaterThan(dbNowMs + 500_000);
    expect(deadlinesMs[2]).toBeNaN();
    expect(deadlinesMs[3]).toBeNaN();
    expect(deadlinesMs[4]).toBeNaN();
    // Silent for 4 s: the deadline counts from when it was last heard, not from now.
    expect(deadlinesMs[5]).toBe(dbNowMs + 10_000 - 4_000);
    expect(deadlinesMs[5]).toBe(await stored("quiet"));
    expect(deadlinesMs[6]).toBeNaN();
    expect(deadlinesMs[7]).toBeNaN();
    // Why: the stream of a session another stream took ends as the takeover notice would end it.
    expect([...notRenewed].sort(([a], [b]) => a - b)).toEqual([
      [2, "ended"],
      [3, "taken over"],
      [4, "ended"],
      [6, "reaped"],
      [7, "taken over"],
    ]);
    // A deadline never moves back: renewing "plain" as heard long ago leaves it where it is.
    const again = await renewSessions(
      db,
      clock,
      10_000,
      [{ sessionId: "plain", streamToken: "t-plain", heardAt: nowMs - 60_000 }],
      nowMs,
    );
    expect(again.deadlinesMs[0]).toBe(await stored("plain"));
    expect(again.deadlinesMs[0]).toBe(deadlinesMs[0]);
  });

  it("renews with a grace period and a silence longer than 2^31 ms (a 32-bit integer)", async () => {
    await session("long-grace", 1);
    const graceMs = 600 * 3_600_000; // --grace-period 600h
    const nowMs = performance.now();
    const silentMs = 2 ** 31 + 1_000; // about 25 days
    const heard = [{ sessionId: "long-grace", streamToken: "t-long-grace", heardAt: nowMs - silentMs }];
    const { deadlinesMs, dbNowMs } = await renewSessions(db, clock, graceMs, heard, nowMs);
    expect(deadlinesMs[0]).toBe(dbNowMs + graceMs - silentMs);
    expect(deadlinesMs[0]).toBe(await stored("long-grace"));
  });

  it("says a renewal with no stream hosted wrote nothing, whatever the database does", async () => {
    // A database refusing connections: a renewal that sent a statement would fail.
    const touched: string[] = [];
    const refusing = new Proxy(db, {
      get(_target, key) {
        touched.push(String(key));
        return () =>
          Promise.reject(Object.assign(new Error("connect ECONNREFUSED"), { code: "ECONNREFUSED" }));
      },
    });
    const sessions: Hosted[] = [];
    const hosted = { values: () => sessions.values() } as unknown as HostedSessions;
    const renewal = createRenewal({
      db: refusing,
      clock,
      hosted,
      graceMs: 10_000,
      heartbeatIntervalMs: 1000,
      serverId: "this-server",
    });
    // Every stream drained (a process shutting down): nothing to write, so no proof it works.
    expect(await renewal.renew()).toBe(false);
    expect(touched).toEqual([]);
  });

  it("renews a process's sessions in chunks, and ends the stream of a session another took", async () => {
    const count = 2 * RENEW_CHUNK + 500;
    await db.execute(sql`
      insert into workers (worker_id, cluster, capacity)
      select 'cw-' || n, 'east', 1 from generate_series(1, ${count}) n`);
    await db.execute(sql`
      insert into sessions (id, worker_id, server_id, stream_token, deadline, principal)
      select 'cs-' || n, 'cw-' || n, 'this-server', 'ct-' || n, now() + interval '1 second', 'anonymous'
      from generate_series(1, ${count}) n`);
    // One session of the last chunk moved to another stream since: its stream here must end.
    const moved = `cs-${count - 7}`;
    await db.execute(sql`update sessions set stream_token = 'elsewhere' where id = ${moved}`);
    const heardAt = performance.now();
    const sessions = Array.from({ length: count }, (_, i) => ({
      sessionId: `cs-${i + 1}`,
      streamToken: `ct-${i + 1}`,
      heardAt,
      ended: false,
      deadlineMs: 0,
      dbOffsetMs: 0,
    }));
    const ended: string[] = [];
    const hosted = {
      values: () => sessions.values(),
      end: (s: Hosted, reason: string) => {
        (s as { ended: boolean }).ended = true;
        ended.push(`${s.sessionId} ${reason}`);
      },
    } as unknown as HostedSessions;
    // A slow database: each statement starts 150 ms after it is sent.
    const slowDb = new Proxy(db, {
      get(target, key, receiver) {
        const value = Reflect.get(target, key, receiver);
        if (key !== "execute") return value;
        return async (...args: unknown[]) => {
          await new Promise((resolve) => setTimeout(resolve, 150));
          return (value as (...a: unknown[]) => unknown).apply(target, args);
        };
      },
    });
    const renewal = createRenewal({
      db: slowDb,
      clock,
      hosted,
      graceMs: 60_000,
      // Longer than the chunks take even on a busy machine: one renewal, not one again at once.
      heartbeatIntervalMs: 20_000,
      serverId: "this-server",
    });
    await renewal.renew();

    // Its notice lost, the takeover is told to the old stream as the notice would have told it.
    expect(ended).toEqual([`${moved} SESSION_TAKEN_OVER`]);
    expect(renewal.keepHosted()).toBeUndefined();
    const rows = await queryRows<{ id: string; ms: unknown }>(
      db,
      sql`select id, floor(extract(epoch from deadline) * 1000)::float8 as ms from sessions where id like 'cs-%'`,
    );
    const stored = new Map(rows.map((r) => [r.id, Number(r.ms)]));
    for (const s of sessions) {
      if (s.sessionId === moved) continue;
      // What the process keeps is what was stored, in every chunk.
      expect(s.deadlineMs, s.sessionId).toBe(stored.get(s.sessionId));
    }
    // Heard at one instant: every chunk's deadline is that instant + grace (+ the 150 ms its
    // statement took to start), whatever the time the chunks before it took (300 ms and more).
    const deadlines = sessions.filter((s) => s.sessionId !== moved).map((s) => s.deadlineMs);
    expect(Math.max(...deadlines) - Math.min(...deadlines)).toBeLessThan(100);
  });

  it("renews again at once after a renewal that took longer than an interval: what it stored was stale", async () => {
    await session("slow", 1);
    const s = {
      sessionId: "slow",
      streamToken: "t-slow",
      heardAt: performance.now(),
      ended: false,
      deadlineMs: 0,
      dbOffsetMs: 0,
    };
    const hosted = { values: () => [s].values(), end: () => {} } as unknown as HostedSessions;
    let statements = 0;
    // The first renewal statement stalls past the interval; the worker's heartbeats are heard
    // meanwhile.
    const stallingDb = intercepting(async (text, execute) => {
      if (!text.includes("update sessions s set")) return execute();
      statements += 1;
      if (statements === 1) {
        await new Promise((resolve) => setTimeout(resolve, 20));
        s.heardAt = performance.now();
      }
      return execute();
    })(db);
    const renewal = createRenewal({
      db: stallingDb,
      clock,
      hosted,
      graceMs: 10_000,
      heartbeatIntervalMs: 10,
      serverId: "this-server",
    });
    await renewal.renew();
    expect(statements).toBe(2);
    // Counted from the heartbeat heard during the stall, not from the one before it.
    expect(s.deadlineMs).toBe(await stored("slow"));
    expect(renewal.keepHosted()).toBeUndefined();
  });

  it("counts a heartbeat that waited in its socket while the tick came due", async () => {
    await session("stalled", 1);
    // Last heard 5 s ago, before a stall of the event loop; the next heartbeat waits in the socket.
    const s = {
      sessionId: "stalled",
      streamToken: "t-stalled",
      heardAt: performance.now() - 5_000,
      ended: false,
      deadlineMs: 0,
      dbOffsetMs: 0,
    };
    const hosted = { values: () => [s].values(), end: () => {} } as unknown as HostedSessions;
    const renewal = createRenewal({
      db,
      clock,
      hosted,
      graceMs: 10_000,
      heartbeatIntervalMs: 1_000,
      serverId: "this-server",
    });
    const listener = net.createServer();
    await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve));
    const accepted = once(listener, "connection");
    const worker = net.connect((listener.address() as net.AddressInfo).port, "127.0.0.1");
    const [stream] = (await accepted) as [net.Socket];
    await once(worker, "connect");
    stream.on("data", () => {
      s.heardAt = performance.now();
    });
    try {
      // One timer callback, as after a stall: the heartbeat is in the socket, unread, when the
      // overdue tick runs (timers run before the loop polls its sockets).
      const renewed = await new Promise<Promise<boolean>>((resolve) =>
        setTimeout(() => {
          worker.write("heartbeat");
          resolve(renewal.renew());
        }, 0),
      );
      await renewed;
      expect(await stored("stalled")).toBe(s.deadlineMs);
      // Heard just now: a whole grace period from now, not the 5 s left from before the stall.
      expect(s.deadlineMs - Date.now()).toBeGreaterThan(9_000);
    } finally {
      worker.destroy();
      stream.destroy();
      listener.close();
    }
  });

  it("renews nothing and sends no statement for no sessions", async () => {
    const { deadlinesMs } = await renewSessions(db, clock, 10_000, [], performance.now());
    expect(deadlinesMs).toHaveLength(0);
  });
});
