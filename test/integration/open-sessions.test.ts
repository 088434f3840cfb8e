import { sql } from "drizzle-orm";
import { beforeAll, describe, expect, inject, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { databaseClock as clock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { type HelloInput, openSession } from "../../src/store/queries/open-session.js";
import { type BatchOutcome, openSessions } from "../../src/store/queries/open-sessions.js";
import { queryRows } from "../../src/store/rows.js";
import { useFreshDatabase } from "../helpers/database.js";

const hello = (workerId: string, cluster: string, held: [string, number][] = []): HelloInput => ({
  workerId,
  cluster,
  capacity: 4,
  labels: { zone: "a" },
  agentVersion: "test",
  instanceId: "",
  heldLeases: held.map(([actionId, epoch]) => ({ actionId, epoch })),
});

const BATCH_LIMITS = 10_000;
const LIMITS = { graceMs: BATCH_LIMITS, partitionShare: 1, maxSilenceMs: 600_000 };

const opened = (o: BatchOutcome | undefined) => {
  if (!o || !("opened" in o)) throw new Error(`not opened: ${JSON.stringify(o)}`);
  return o.opened;
};
/** A hello of instance `instanceId` (a process of the worker). */
const as = (workerId: string, instanceId: string): HelloInput => ({ ...hello(workerId, "east"), instanceId });

/** A sender that may run any worker id in any cluster (no credentials configured). */
const anywhere = () => true;

const refused = (o: BatchOutcome | undefined) => {
  if (!o || !("refused" in o)) throw new Error(`not refused: ${JSON.stringify(o)}`);
  return o.refused as LeaseholdError;
};

/** Hellos opened together: each gets what a hello alone would get (open-session.ts), in one transaction. */
describe("a batch of hellos", () => {
  const database = useFreshDatabase();
  let db: Db;
  beforeAll(() => {
    db = database.current.db;
  });
  /** A hello alone (the way a batch leaves some), as instance `instanceId`. */
  const alone = (workerId: string, instanceId: string) =>
    openSession(db, clock, "this-server", LIMITS, as(workerId, instanceId), "anonymous", anywhere);

  /** A worker with a live session (deadline in `deadlineSecs`), and LEASED actions held by it. */
  async function liveWorker(
    workerId: string,
    options: {
      cluster?: string;
      principal?: string;
      streamLost?: boolean;
      deadlineSecs?: number;
      draining?: boolean;
      leases?: [string, number][];
    } = {},
  ): Promise<string> {
    const cluster = options.cluster ?? "east";
    const sessionId = `s-${workerId}`;
    await db.execute(sql`insert into clusters (name) values (${cluster}) on conflict do nothing`);
    await db.execute(sql`insert into workers (worker_id, cluster, capacity, draining)
                         values (${workerId}, ${cluster}, 4, ${options.draining ?? false})`);
    await db.execute(sql`
      insert into sessions (id, worker_id, server_id, stream_token, deadline, stream_lost_at, principal)
      values (${sessionId}, ${workerId}, 'old-server', ${`t-${workerId}`},
              now() + make_interval(secs => ${options.deadlineSecs ?? 30}),
              ${options.streamLost === false ? null : sql`now()`}, ${options.principal ?? "anonymous"})`);
    for (const [id, epoch] of options.leases ?? []) {
      await db.execute(sql`
        insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
                             max_system_retries, state, epoch, attempt_count, session_id, worker_id, granted_at)
        values (${id}, ${cluster}, 3, 1000, 2, 10000, 3, 'LEASED', ${epoch}, 1, ${sessionId}, ${workerId}, now())`);
    }
    return sessionId;
  }

  it("opens, resumes and takes over in one transaction, refuses what it must, and leaves reaps to a hello alone", async () => {
    const resumedId = await liveWorker("resuming", {
      draining: true,
      leases: [
        ["A1", 1],
        ["A2", 2],
        ["A3", 1],
      ],
    });
    const takenId = await liveWorker("taken", { streamLost: false });
    await liveWorker("owned", { principal: "alice" });
    await liveWorker("moved", { cluster: "west" });
    await liveWorker("expired", { deadlineSecs: -5 });
    const statements: string[] = [];
    const outcomes = await openSessions(counting(db, statements), clock, "this-server", BATCH_LIMITS, [
      { hello: hello("fresh", "north"), principal: "anonymous", mayRunIn: anywhere },
      {
        hello: hello("resuming", "east", [
          ["A1", 1],
          ["A2", 1],
        ]),
        principal: "anonymous",
        mayRunIn: anywhere,
      },
      { hello: hello("taken", "east"), principal: "anonymous", mayRunIn: anywhere },
      { hello: hello("owned", "east"), principal: "bob", mayRunIn: anywhere },
      { hello: hello("moved", "east"), principal: "anonymous", mayRunIn: anywhere },
      { hello: hello("expired", "east"), principal: "anonymous", mayRunIn: anywhere },
      { hello: hello("fresh", "north"), principal: "anonymous", mayRunIn: anywhere },
    ]);

    const fresh = opened(outcomes[0]);
    expect(fresh).toMatchObject({ resumed: false, tookOver: false, previousServerId: null, draining: false });
    const resumed = opened(outcomes[1]);
    expect(resumed).toMatchObject({ sessionId: resumedId, resumed: true, tookOver: false, draining: true });
    expect(resumed.previousServerId).toBe("old-server");
    expect(resumed.resumedLeases.map((l) => [l.actionId, l.epoch])).toEqual([["A1", 1]]);
    expect(resumed.revokedLeases).toEqual([{ actionId: "A2", epoch: 1 }]);
    // A2 listed at an older epoch: its grant at epoch 2 is sent again, as A3's never listed.
    expect(resumed.unlistedLeases.map((l) => [l.actionId, l.epoch]).sort()).toEqual([
      ["A2", 2],
      ["A3", 1],
    ]);
    expect(resumed.deadline.getTime() - resumed.dbNow.getTime()).toBeGreaterThanOrEqual(10_000);
    expect(opened(outcomes[2])).toMatchObject({ sessionId: takenId, resumed: true, tookOver: true });

    const notOwner = refused(outcomes[3]);
    expect(notOwner).toBeInstanceOf(LeaseholdError);
    expect([notOwner.code, notOwner.reason]).toEqual([Code.PermissionDenied, "SESSION_OWNED_BY_OTHER"]);
    const elsewhere = refused(outcomes[4]);
    expect([elsewhere.code, elsewhere.reason]).toEqual([Code.FailedPrecondition, "WORKER_IN_OTHER_CLUSTER"]);
    // A reap, and a second hello for one worker (it may take the first one's session over), go alone.
    expect(outcomes[5]).toEqual({ alone: true });
    expect(outcomes[6]).toEqual({ alone: true });
    // However many hellos: three reads (two locking), the writes, the held leases and the events.
    expect(statements.length).toBeLessThanOrEqual(6);

    const sessions = await queryRows<{
      worker_id: string;
      server_id: string;
      stream_token: string;
      principal: string;
    }>(
      db,
      sql`select worker_id, server_id, stream_token, principal from sessions where ended_at is null order by worker_id`,
    );
    const byWorker = Object.fromEntries(sessions.map((s) => [s.worker_id, s]));
    expect(byWorker.fresh).toMatchObject({ server_id: "this-server", stream_token: fresh.streamToken });
    expect(byWorker.resuming).toMatchObject({ server_id: "this-server", stream_token: resumed.streamToken });
    // Nothing written for the refused and the left-alone.
    expect(byWorker.owned).toMatchObject({
      server_id: "old-server",
      stream_token: "t-owned",
      principal: "alice",
    });
    expect(byWorker.moved).toMatchObject({ server_id: "old-server", stream_token: "t-moved" });
    expect(byWorker.expired).toMatchObject({ server_id: "old-server", stream_token: "t-expired" });
    const workers = await queryRows<{
      worker_id: string;
      cluster: string;
      draining: boolean;
      labels: unknown;
    }>(db, sql`select worker_id, cluster, draining, labels from workers order by worker_id`);
    expect(workers.find((w) => w.worker_id === "fresh")).toMatchObject({
      cluster: "north",
      labels: { zone: "a" },
    });
    expect(workers.find((w) => w.worker_id === "resuming")?.draining).toBe(true);
    expect(workers.find((w) => w.worker_id === "moved")?.cluster).toBe("west");

    const events = await queryRows<{
      kind: string;
      worker_id: string;
      action_id: string | null;
      session_id: string;
    }>(db, sql`select kind, worker_id, action_id, session_id from events order by sequence`);
    expect(events.map((e) => [e.kind, e.worker_id, e.action_id])).toEqual([
      ["session_started", "fresh", null],
      ["session_resumed", "resuming", null],
      ["lease_resumed", "resuming", "A1"],
      ["lease_revoked", "resuming", "A2"],
      ["session_taken_over", "taken", null],
    ]);
    expect(events.find((e) => e.worker_id === "fresh")?.session_id).toBe(fresh.sessionId);
  });

  // PGlite runs one transaction at a time: only PostgreSQL can hold a lock while a batch runs.
  it.runIf(inject("driver") === "postgres")(
    "leaves alone a hello whose session another statement holds locked, instead of waiting for it",
    async () => {
      await liveWorker("locked");
      let release!: () => void;
      const held = new Promise<void>((r) => {
        release = r;
      });
      let locked!: () => void;
      const lockTaken = new Promise<void>((r) => {
        locked = r;
      });
      // A renewal of the stream the worker is leaving, say, holding the session's row.
      const holder = db.transaction(async (tx) => {
        await tx.execute(sql`select id from sessions where worker_id = 'locked' for update`);
        locked();
        await held;
      });
      await lockTaken;
      const outcomes = await openSessions(db, clock, "this-server", BATCH_LIMITS, [
        { hello: hello("locked", "east"), principal: "anonymous", mayRunIn: anywhere },
        { hello: hello("beside-locked", "east"), principal: "anonymous", mayRunIn: anywhere },
      ]);
      release();
      await holder;
      expect(outcomes[0]).toEqual({ alone: true });
      expect(opened(outcomes[1]).resumed).toBe(false);
    },
  );

  it("refuses a hello from another instance while the session's stream is open, in a batch and alone", async () => {
    // Streams open and renewed, attached to instance "first".
    for (const id of ["twin-batch", "twin-alone", "same", "unnamed"])
      await liveWorker(id, { streamLost: false });
    await liveWorker("lost", { streamLost: true });
    await db.execute(sql`update sessions set instance_id = 'first' where worker_id in
                         ('twin-batch', 'twin-alone', 'same', 'lost')`);
    const outcomes = await openSessions(db, clock, "this-server", BATCH_LIMITS, [
      { hello: as("twin-batch", "second"), principal: "anonymous", mayRunIn: anywhere },
      { hello: as("same", "first"), principal: "anonymous", mayRunIn: anywhere },
      { hello: as("unnamed", "second"), principal: "anonymous", mayRunIn: anywhere },
      { hello: as("lost", "second"), principal: "anonymous", mayRunIn: anywhere },
    ]);
    const inUse = refused(outcomes[0]);
    expect([inUse.code, inUse.reason]).toEqual([Code.AlreadyExists, "WORKER_ID_IN_USE"]);
    expect(inUse.message).toMatch(/worker "twin-batch" is connected from another process/);
    // The same process coming back on a new stream takes its own session over, as before.
    expect(opened(outcomes[1])).toMatchObject({ resumed: true, tookOver: true });
    // A session whose stream said no instance is taken over, as before instance ids.
    expect(opened(outcomes[2])).toMatchObject({ resumed: true, tookOver: true });
    // A new process whose predecessor's stream is gone: its session is reaped first, alone.
    expect(outcomes[3]).toEqual({ alone: true });
    // The hello alone (openSession) refuses the same way, and writes nothing.
    const error = await alone("twin-alone", "second").then(
      () => undefined,
      (e: unknown) => e as LeaseholdError,
    );
    expect([error?.code, error?.reason]).toEqual([Code.AlreadyExists, "WORKER_ID_IN_USE"]);
    const rows = await queryRows<{ worker_id: string; instance_id: string; stream_token: string }>(
      db,
      sql`select worker_id, instance_id, stream_token from sessions
          where worker_id in ('twin-batch', 'twin-alone') and ended_at is null order by worker_id`,
    );
    expect(rows).toEqual([
      { worker_id: "twin-alone", instance_id: "first", stream_token: "t-twin-alone" },
      { worker_id: "twin-batch", instance_id: "first", stream_token: "t-twin-batch" },
    ]);
  });

  it("ends the session of a process that is gone when a new process of its worker says hello: its leases expire", async () => {
    // Its stream recorded lost; past its deadline. Each held a lease.
    const lost = await liveWorker("gone-lost", { streamLost: true, leases: [["L1", 1]] });
    await liveWorker("gone-expired", { streamLost: false, deadlineSecs: -1, leases: [["L3", 1]] });
    // Its stream still open but silent for long (a crashed server, a half-open connection): its
    // process may still run its lease until its own deadline, so the new one waits for that.
    const silent = await liveWorker("gone-silent", { streamLost: false, leases: [["L2", 1]] });
    await db.execute(sql`update sessions set instance_id = 'first' where worker_id like 'gone-%'`);
    await db.execute(
      sql`update sessions set last_heard_at = now() - interval '9 seconds' where id = ${silent}`,
    );
    for (const [workerId, sessionId, action] of [
      ["gone-lost", lost, "L1"],
      ["gone-expired", "s-gone-expired", "L3"],
    ] as const) {
      const opened = await alone(workerId, "second");
      // A new session: the lease is not sent again with the same epoch, as it was to a reconnect.
      expect(opened).toMatchObject({ resumed: false, unlistedLeases: [] });
      expect(opened.sessionId).not.toBe(sessionId);
      expect(opened.reaped?.expired).toMatchObject([{ actionId: action, epoch: 1, state: "QUEUED" }]);
      const [row] = await queryRows<{ state: string; system_retry_count: number; session_id: string | null }>(
        db,
        sql`select state, system_retry_count, session_id from actions where id = ${action}`,
      );
      // Charged to the system retries: an action that kills its worker every time fails in the end.
      expect(row).toEqual({ state: "QUEUED", system_retry_count: 1, session_id: null });
    }
    const error = await alone("gone-silent", "second").then(
      () => undefined,
      (e: unknown) => e as LeaseholdError,
    );
    expect(error?.reason).toBe("WORKER_ID_IN_USE");
    const [ended] = await queryRows<{ end_reason: string; message: string }>(
      db,
      sql`select s.end_reason, e.message from sessions s join events e on e.session_id = s.id
          where s.id = ${lost} and e.kind = 'session_reaped'`,
    );
    expect(ended).toEqual({
      end_reason: "reaped",
      message:
        "session of worker gone-lost reaped: a new process of the worker connected while the stream of this one was gone",
    });
  });

  it("lets two processes' batches race for the same workers: both finish, and the later takes each session over", async () => {
    const ids = Array.from({ length: 40 }, (_, i) => `racer-${String(i).padStart(2, "0")}`);
    for (const id of ids) await liveWorker(id);
    for (let round = 0; round < 3; round++) {
      const forward = ids.map((id) => ({
        hello: hello(id, "east"),
        principal: "anonymous",
        mayRunIn: anywhere,
      }));
      const [a, b] = await Promise.all([
        openSessions(db, clock, "server-a", BATCH_LIMITS, forward),
        openSessions(db, clock, "server-b", BATCH_LIMITS, [...forward].reverse()),
      ]);
      const rows = await queryRows<{ worker_id: string; server_id: string; stream_token: string }>(
        db,
        sql`select worker_id, server_id, stream_token from sessions
            where worker_id like 'racer-%' and ended_at is null order by worker_id`,
      );
      // One live session per worker, held by whichever batch committed last, which found the
      // other's stream open and took it over.
      expect(rows.map((r) => r.worker_id)).toEqual(ids);
      const winner = rows[0]?.server_id;
      expect(rows.every((r) => r.server_id === winner)).toBe(true);
      const [later, earlier] = winner === "server-a" ? [a, [...b].reverse()] : [[...b].reverse(), a];
      for (const i of ids.keys()) {
        const mine = opened(later[i]);
        expect(mine.streamToken).toBe(rows[i]?.stream_token);
        expect(mine.tookOver).toBe(true);
        expect(mine.previousServerId).toBe(winner === "server-a" ? "server-b" : "server-a");
        expect(opened(earlier[i]).sessionId).toBe(mine.sessionId);
      }
    }
  });
});

/** `db`, recording each statement it runs (transactions pass through). */
function counting(db: Db, statements: string[]): Db {
  return new Proxy(db, {
    get(target, key, receiver) {
      if (key === "transaction") {
        return (run: (tx: Db) => Promise<unknown>) =>
          target.transaction((tx) =>
            run(
              new Proxy(tx as unknown as Db, {
                get(t, k, r) {
                  if (k === "execute") {
                    return (query: Parameters<Db["execute"]>[0]) => {
                      statements.push(String(k));
                      return t.execute(query);
                    };
                  }
                  return Reflect.get(t, k, r);
                },
              }),
            ),
          );
      }
      return Reflect.get(target, key, receiver);
    },
  }) as Db;
}
