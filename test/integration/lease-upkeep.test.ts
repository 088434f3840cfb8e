import { sql } from "drizzle-orm";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { RejectReason, RevokeReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import type { ServerOverrides } from "../../src/server.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { intercepting } from "../helpers/intercept-db.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { statusDetails } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const GRACE_MS = 10_000;
/** The reaper's fallback poll with a 10 s grace: min(1 s, grace / 10). */
const REAP_POLL_MS = 1000;

/**
 * How the server keeps leases accounted for between reports: revoked leases
 * let go by omission (rule 9), expiries wherever they are decided (rule 3),
 * the reaper's wake-ups (§6) and renewal failures (rule 7). Fake clock; the
 * loops run when the test says.
 */
describe("lease upkeep", () => {
  let clock: FakeClock;
  let t: TestServer;
  let workers: TestWorker[];

  const start = async (overrides: ServerOverrides = {}) =>
    startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false, ...overrides },
    });
  const worker = async (
    workerId: string,
    extra: {
      capacity?: number;
      held?: { actionId: string; epoch: bigint }[];
      labels?: Record<string, string>;
    } = {},
  ) => {
    const w = await connectWorker(t.address, {
      workerId,
      cluster: "east",
      capacity: extra.capacity ?? 1,
      labels: extra.labels ?? {},
      heldLeases: extra.held ?? [],
    });
    workers.push(w);
    return w;
  };
  const api = () => t.client(ActionService);
  const submit = async (request: Parameters<ReturnType<typeof api>["submitAction"]>[0] = {}) =>
    (await api().submitAction({ cluster: "east", ...request })).action?.id ?? "";
  const getAction = async (id: string) => api().getAction({ actionId: id });
  const tick = () => t.server.leases.tick;
  /** The fencing token of a grant, as a heartbeat or hello lists it. */
  const lease = (g: { actionId: string; epoch: bigint }) => ({ actionId: g.actionId, epoch: g.epoch });
  const expiredActions = async () =>
    (await t.client(EventService).listEvents({ kind: EventKind.LEASE_EXPIRED })).events.map(
      (e) => e.actionId,
    );
  /** Waits for an event about an action, via WatchEvents replaying from the start. */
  const eventOf = async (actionId: string, kind: EventKind) => {
    for await (const m of t.client(EventService).watchEvents({ actionId, kind, afterSequence: 0n }))
      return m.event;
    throw new Error("the event stream ended");
  };
  /** Restarts the test's server with a reap statement that fails while `broken` (the database is gone). */
  const restartWithBreakableReap = async () => {
    await t[Symbol.asyncDispose]();
    const reap = { broken: false };
    t = await start({
      wrapDb: intercepting((text, execute) =>
        reap.broken && /with watched as/.test(text)
          ? Promise.reject(new Error("connection lost (injected)"))
          : execute(),
      ),
    });
    return reap;
  };
  /** Waits for the `times`th line `msg` of this test's server (earlier lines count too). */
  const waitForLog = async (msg: string, times = 1) => {
    const until = Date.now() + 10_000;
    while (t.logs.filter((l) => l.msg === msg).length < times) {
      if (Date.now() > until) throw new Error(`no log line "${msg}"`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };

  /** Starts the server again with renewals that fail while `broken` is set (the database gone). */
  const withBreakableRenewal = async () => {
    await t[Symbol.asyncDispose]();
    const renewal = { broken: false };
    t = await start({
      wrapDb: intercepting((text, execute) =>
        renewal.broken && RENEWAL.test(text)
          ? Promise.reject(new Error("connection lost (injected)"))
          : execute(),
      ),
    });
    return renewal;
  };

  /**
   * Starts the server again, with a grace period of 3 s and an interval of 1 s, and renewals
   * that wait `ms` for the database while `slow` is set, or until `wait` resolves.
   */
  const withSlowRenewal = async (ms: number, wait?: Promise<unknown>) => {
    await t[Symbol.asyncDispose]();
    const renewal = { slow: false };
    t = await startTestServer({
      config: { gracePeriod: "3s", heartbeatInterval: "1s" },
      overrides: {
        clock,
        timers: false,
        wrapDb: intercepting(async (text, execute) => {
          if (renewal.slow && RENEWAL.test(text))
            await (wait ?? new Promise((resolve) => setTimeout(resolve, ms)));
          return execute();
        }),
      },
    });
    return renewal;
  };

  beforeEach(async () => {
    clock = createFakeClock();
    workers = [];
    t = await start();
  });
  afterEach(async () => {
    for (const w of workers) w.drop();
    await t[Symbol.asyncDispose]();
  });

  it("forgets workers not seen for --worker-retention with their sessions, a drained one too, but never a connected one", async () => {
    await t[Symbol.asyncDispose]();
    let db: Db | undefined;
    t = await start({ wrapDb: (d) => (db = d) });
    const leave = async (w: TestWorker) => {
      w.goodbye();
      await w.ended;
    };
    await leave(await worker("gone"));
    const drained = await worker("drained");
    await t.client(ClusterService).drainWorker({ workerId: "drained", reason: "maintenance" });
    await leave(drained);
    await worker("connected");
    // Eight days later (the retention is 7 by default), one more comes and goes.
    clock.advance(8 * 86_400_000);
    await leave(await worker("recent"));
    await tick().forget();

    const { workers: kept } = await t.client(ClusterService).listWorkers({});
    // The drain ended with the drained worker's session: it is forgotten as the others.
    expect(kept.map((w) => w.workerId)).toEqual(["connected", "recent"]);
    const sessions = await queryRows<{ worker_id: string; live: boolean }>(
      db as Db,
      sql`select worker_id, ended_at is null as live from sessions order by worker_id`,
    );
    expect(sessions).toEqual([
      { worker_id: "connected", live: true },
      { worker_id: "recent", live: false },
    ]);
    await waitForLog("forgot workers and sessions past --worker-retention");
    expect(t.logs.find((l) => l.msg === "forgot workers and sessions past --worker-retention")).toMatchObject(
      {
        workers: 2,
        sessions: 2,
      },
    );
  });

  it("counts a report it refuses as INVALID as hearing from the worker: the renewal's deadline runs from it", async () => {
    const w = await worker("garbled");
    // A second of silence after the hello, then a report the server refuses itself.
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    clock.advance(1_000);
    w.send({ message: { case: "completion", value: { reportId: 1n, actionId: "x", epoch: 0n } } });
    expect(await w.next("reportResult")).toMatchObject({
      accepted: false,
      rejectReason: RejectReason.INVALID,
    });
    await tick().renew();
    const { worker: got } = await t.client(ClusterService).getWorker({ workerId: "garbled" });
    const deadline = got?.session?.deadline;
    const deadlineMs = Number(deadline?.seconds) * 1000 + Math.floor((deadline?.nanos ?? 0) / 1e6);
    // Counted from the hello, the deadline would be at least a second short of the grace period.
    expect(deadlineMs).toBeGreaterThan(clock.current().getTime() + GRACE_MS - 500);
  });

  describe("a revoked lease the worker stops listing counts as released (rule 9)", () => {
    it("cancels the action and frees the slot when the worker obeys a cancel without a release", async () => {
      const w = await worker("w1");
      const id = await submit();
      await tick().dispatch();
      const grant = await w.next("grant");
      await w.heartbeat(1, [lease(grant)]);
      await api().cancelAction({ actionId: id, reason: "user asked" });
      expect(await w.next("revoke")).toMatchObject({ actionId: id, reason: RevokeReason.CANCELLED });
      // The worker stops the work and says so only by no longer listing the lease.
      await w.heartbeat(2, []);
      await eventOf(id, EventKind.ACTION_CANCELLED);
      const got = await getAction(id);
      expect(got.action).toMatchObject({
        state: ActionState.CANCELLED,
        failureReason: "action cancelled: user asked",
      });
      expect(got.attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.CANCELLED]);
      // Its only slot is free again.
      const next = await submit();
      await tick().dispatch();
      expect(await w.next("grant")).toMatchObject({ actionId: next, epoch: 1n });
    });

    it("lets a cancelled grant still on its way go at the first heartbeat after the revoke; the worker's own release is a repeat", async () => {
      const w = await worker("w1", { capacity: 2 });
      const first = await submit();
      await tick().dispatch();
      const grant = await w.next("grant");
      const other = await submit();
      await tick().dispatch();
      const otherGrant = await w.next("grant");
      expect(otherGrant.actionId).toBe(other);
      await api().cancelAction({ actionId: first });
      await w.next("revoke");
      // A heartbeat composed before the grant arrived lists nothing of it. After CANCELLED that
      // is a release all the same (worker.proto, Revoke): no epoch follows a cancelled action.
      await w.heartbeat(1, [lease(otherGrant)]);
      await eventOf(first, EventKind.ACTION_CANCELLED);
      expect((await getAction(first)).action?.state).toBe(ActionState.CANCELLED);
      // The other lease is untouched, and the worker's own release of the first, sent once it
      // read the revoke, is answered as a repeat.
      expect(await w.complete(otherGrant, { output: {} })).toMatchObject({ accepted: true });
      expect(await w.release(grant, "stopped")).toMatchObject({ accepted: true });
    });

    it("keeps a lease the worker still lists after a cancel, and takes its release report as ever", async () => {
      const w = await worker("w1");
      const id = await submit();
      await tick().dispatch();
      const grant = await w.next("grant");
      await w.heartbeat(1, [lease(grant)]);
      await api().cancelAction({ actionId: id });
      await w.next("revoke");
      await w.heartbeat(2, [lease(grant)]);
      await w.heartbeat(3, [lease(grant)]);
      expect((await getAction(id)).action?.state).toBe(ActionState.LEASED);
      expect(await w.release(grant, "stopped")).toMatchObject({ accepted: true });
      expect((await getAction(id)).action?.state).toBe(ActionState.CANCELLED);
      // Not listing it any more changes nothing now.
      await w.heartbeat(4, []);
      expect((await getAction(id)).attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.CANCELLED]);
    });
  });

  it("reports an expiry decided when the worker reconnects like any other: line, metric, prompt re-grant (rule 3)", async () => {
    const a = await worker("wa", { labels: { pool: "x" } });
    const id = await submit({ labelSelector: { pool: "x" } });
    await tick().dispatch();
    const grant = await a.next("grant");
    const b = await worker("wb", { labels: { pool: "x" } });
    a.drop();
    await waitForLog("worker stream lost");
    clock.advance(GRACE_MS + 1000);
    await b.heartbeat(1);
    await tick().renew();
    // No reaper tick: wa's hello finds its own session past the deadline and reaps it.
    const back = await worker("wa", { held: [lease(grant)] });
    expect(back.welcome).toMatchObject({ sessionResumed: false, revoked: [{ actionId: id, epoch: 1n }] });
    // The other worker gets it from the expiry's wake-up alone (the test runs no dispatch poll).
    expect(await b.next("grant")).toMatchObject({ actionId: id, epoch: 2n, attempt: 2 });
    expect(await expiredActions()).toEqual([id]);
    expect(t.logs.map((l) => l.msg)).toContain(
      `lease expired for action ${id} (worker wa, cluster east, epoch 1)`,
    );
    const metrics = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/^leasehold_lease_expiries_total 1$/m);
  });

  it("ends the open stream of a session it reaps, saying what the worker must do with its leases", async () => {
    const a = await worker("wa");
    await submit();
    await tick().dispatch();
    await a.next("grant");
    await a.heartbeat(1);
    await tick().renew();
    // The worker stops heartbeating (a paused process); its stream stays open.
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    const ended = await a.ended;
    expect(ended.code).toBe(Code.Aborted);
    expect(statusDetails(ended.metadata).reason).toBe("SESSION_REAPED");
    expect(ended.details).toBe(
      "this session passed its deadline and was reaped: its leases expired and may run elsewhere; " +
        "stop their work at once, report nothing more of them and do not list them in the next hello (it opens a new session)",
    );
  });

  it("wakes the reaper at the earliest deadline it knows, bounded by its poll (SPEC §6)", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    await a.next("grant");
    a.drop();
    await waitForLog("worker stream lost");
    const deadline = (await t.client(ClusterService).getWorker({ workerId: "wa" })).worker?.session?.deadline;
    const deadlineMs = Number(deadline?.seconds) * 1000 + Math.floor((deadline?.nanos ?? 0) / 1e6);
    // The lost stream brought its deadline.
    expect(t.server.leases.nextReap()?.getTime()).toBe(deadlineMs);
    // A reap finds nothing due yet; the deadline is further than the poll, which bounds the wait.
    await tick().reap();
    expect(t.server.leases.nextReap()?.getTime()).toBe(clock.current().getTime() + REAP_POLL_MS);
    // Within a poll of the deadline, the reaper is due exactly at it.
    clock.advance(deadlineMs - clock.current().getTime() - REAP_POLL_MS / 2);
    await tick().reap();
    expect(t.server.leases.nextReap()?.getTime()).toBe(deadlineMs);
    expect(await expiredActions()).toEqual([]);
    clock.advance(REAP_POLL_MS / 2 + 1);
    await tick().reap();
    expect(await expiredActions()).toEqual([id]);
  });

  it("warns as soon as a renewal has waited more than half the grace period, not when it ends", async () => {
    // A lock on sessions held until the warning: more than half of the 3 s grace period.
    let letGo = () => {};
    const renewal = await withSlowRenewal(0, new Promise<void>((resolve) => (letGo = resolve)));
    await worker("w1");
    await tick().renew();
    // (A PostgreSQL without autovacuum gets a warning of its own at start.)
    const renewalWarnings = () => t.logs.filter((l) => l.level === 40 && /renewal/.test(String(l.msg)));
    expect(renewalWarnings()).toEqual([]);
    renewal.slow = true;
    let ended = false;
    const renewing = tick()
      .renew()
      .finally(() => {
        ended = true;
      });
    const warning =
      "a renewal has been waiting for more than half the grace period (for the database, or for this process's own busy event loop): stored deadlines lag by as much, and agents may self-fence";
    await waitForLog(warning);
    expect(ended).toBe(false);
    expect(renewalWarnings()).toMatchObject([{ msg: warning, graceMs: 3000 }]);
    letGo();
    await renewing;
    await waitForLog("the slow renewal has ended");
  });

  it("counts the time its renewal waited against the time left it promises, not in its favour", async () => {
    await t[Symbol.asyncDispose]();
    let slow = false;
    /** performance.now() when the slowed renewal was sent, and when its answer was let through. */
    let sentAt = 0;
    let answeredAt = 0;
    t = await start({
      wrapDb: intercepting(async (text, execute) => {
        if (!slow || !RENEWAL.test(text)) return execute();
        // The statement read now() at once; its answer arrives 1.5 s later (a lock, a
        // busy pool, a late event loop: the statement's time on the way back).
        sentAt = performance.now();
        const result = await execute();
        await new Promise((resolve) => setTimeout(resolve, 1500));
        answeredAt = performance.now();
        return result;
      }),
    });
    const w = await worker("w1");
    slow = true;
    await w.heartbeat(1);
    await tick().renew();
    const ack = await w.heartbeat(2);
    const remainingMs = Number(ack.remaining?.seconds ?? 0n) * 1000 + (ack.remaining?.nanos ?? 0) / 1e6;
    // The stored deadline is at most the statement's now() + grace; the wait is spent already.
    expect(answeredAt - sentAt).toBeGreaterThanOrEqual(1500);
    expect(remainingMs).toBeLessThanOrEqual(GRACE_MS - (answeredAt - sentAt));
  });

  it("never reaps a session it hosts while it cannot write its renewal, but reaps it once its stream is gone (rule 7)", async () => {
    const renewal = await withBreakableRenewal();
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    renewal.broken = true;
    await w.heartbeat(1, [lease(grant)]);
    await expect(tick().renew()).rejects.toThrow(/injected/);
    clock.advance(GRACE_MS + 1000);
    await w.heartbeat(2, [lease(grant)]);
    await expect(tick().renew()).rejects.toThrow(/injected/);
    // Past the stored deadline, but the worker is here: its silence is this process's failure.
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    expect((await getAction(id)).action).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
    expect(await w.complete(grant, { output: { ok: true } })).toMatchObject({ accepted: true });
    // A stream that is gone is no longer this process's to vouch for: its session is reaped as usual.
    const second = await submit();
    await tick().dispatch();
    await w.next("grant", (g) => g.actionId === second);
    w.drop();
    await waitForLog("worker stream lost");
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([second]);
  });

  describe("a renewal stored late answers the last heartbeat again, so a worker need not wait for its next one", () => {
    const ms = (d: { seconds: bigint; nanos: number } | undefined) =>
      Number(d?.seconds ?? 0n) * 1000 + (d?.nanos ?? 0) / 1e6;
    const acks = (w: TestWorker) =>
      w.received.flatMap((m) => (m.message.case === "heartbeatAck" ? [m.message.value.sequence] : []));

    it("after a renewal that failed", async () => {
      const renewal = await withBreakableRenewal();
      const w = await worker("w1");
      await w.heartbeat(1);
      // A renewal that works answers nothing again.
      await tick().renew();
      renewal.broken = true;
      await expect(tick().renew()).rejects.toThrow(/injected/);
      await w.heartbeat(2);
      renewal.broken = false;
      await tick().renew();
      const again = await w.next("heartbeatAck", (a) => a.sequence === 2n);
      expect(ms(again.remaining)).toBeGreaterThan(GRACE_MS - 1000);
      expect(again.databaseUnreachable).toBe(false);
      await tick().renew();
      await w.heartbeat(3);
      expect(acks(w)).toEqual([1n, 2n, 2n, 3n]);
    });

    it("after a renewal that waited longer than an interval", async () => {
      // Longer than the 1 s interval.
      const renewal = await withSlowRenewal(1100);
      const w = await worker("w1");
      await w.heartbeat(1);
      await tick().renew();
      await w.heartbeat(2);
      renewal.slow = true;
      await tick().renew();
      await w.next("heartbeatAck", (a) => a.sequence === 2n);
      expect(acks(w)).toEqual([1n, 2n, 2n]);
    });
  });

  describe("a worker heard again after most of a grace period of silence (rule 1: deadline = last heard + grace)", () => {
    const ms = (d: { seconds: bigint; nanos: number } | undefined) =>
      Number(d?.seconds ?? 0n) * 1000 + (d?.nanos ?? 0) / 1e6;
    /** How far this process's steady clock is moved ahead of the real one. */
    let ahead = 0;
    beforeEach(() => {
      ahead = 0;
      const real = performance.now.bind(performance);
      vi.spyOn(performance, "now").mockImplementation(() => real() + ahead);
    });
    afterEach(() => {
      vi.restoreAllMocks();
    });
    /**
     * Time passes: the fake clock (the database's) and the steady clock the server counts
     * silences and the acks' time left by (performance.now()) move together, as they do.
     */
    const pass = (delayMs: number) => {
      clock.advance(delayMs);
      ahead += delayMs;
    };
    const options = { config: { gracePeriod: "10s", heartbeatInterval: "2s" } };
    const reaped = (server: TestServer) =>
      server.client(EventService).listEvents({ kind: EventKind.SESSION_REAPED });

    /**
     * A worker silent for 9 s of its 10 s grace (a paused process), then heard: the ticks
     * meanwhile stored the deadline of its last heartbeat, a second away. Returns its stream.
     */
    const silentThenHeard = async (host: TestServer) => {
      const w = await connectWorker(host.address, { workerId: "paused", cluster: "east", capacity: 1 });
      workers.push(w);
      await w.heartbeat(1);
      await host.server.leases.tick.renew();
      pass(GRACE_MS - 1000);
      await host.server.leases.tick.renew();
      const ack = await w.heartbeat(2);
      // Answered at once, from what the deadline stored before leaves.
      expect(ms(ack.remaining)).toBeLessThanOrEqual(1000);
      return w;
    };

    // On PostgreSQL in every run (two processes need it), once when a PostgreSQL pass follows.
    it.runIf(runsPostgresTests())(
      "stores its deadline at once: no process reaps it at the stale one, and work granted meanwhile is not taken back",
      async () => {
        // Two processes on one PostgreSQL database (and clock): the worker's and another.
        const store = await freshPostgresDatabase({ migrated: true });
        const overrides = { clock, timers: false };
        const host = await startTestServer({ store, ...options, overrides });
        const other = await startTestServer({ store, ...options, overrides });
        try {
          const w = await silentThenHeard(host);
          const id = (await host.client(ActionService).submitAction({ cluster: "east" })).action?.id;
          await host.server.leases.tick.dispatch();
          const grant = await w.next("grant");
          expect(grant).toMatchObject({ actionId: id, epoch: 1n });
          // Past the deadline stored before it was heard, within a grace period of it.
          pass(2000);
          await host.server.leases.tick.reap();
          await other.server.leases.tick.reap();
          expect((await reaped(host)).events).toEqual([]);
          const got = await host.client(ActionService).getAction({ actionId: id ?? "" });
          expect(got.action).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
          expect(await w.complete(grant, { output: {} })).toMatchObject({ accepted: true });
          // Stored before the grant went out, and heartbeat 2 answered again with it: the worker
          // would otherwise self-fence before its next heartbeat is answered.
          const seen = w.received.flatMap((m) => {
            if (m.message.case === "grant") return ["grant"];
            if (m.message.case !== "heartbeatAck") return [];
            const ack = m.message.value;
            return [`ack ${ack.sequence} ${ms(ack.remaining) > GRACE_MS - 1000 ? "fresh" : "short"}`];
          });
          expect(seen).toEqual(["ack 1 fresh", "ack 2 short", "ack 2 fresh", "grant"]);
        } finally {
          await other[Symbol.asyncDispose]();
          await host[Symbol.asyncDispose]();
          await store.drop();
        }
      },
    );

    it("grants it nothing and does not reap it while it cannot store that deadline, until a renewal does (rule 7)", async () => {
      const renewal = await withBreakableRenewal();
      const id = await submit();
      const w = await worker("paused");
      await tick().dispatch();
      const grant = await w.next("grant");
      await w.heartbeat(1, [lease(grant)]);
      await tick().renew();
      pass(GRACE_MS - 1000);
      renewal.broken = true;
      // It lets its lease go a second before the deadline stored: its slot would be refilled at once.
      expect(await w.release(grant)).toMatchObject({ accepted: true });
      await tick().dispatch();
      expect((await getAction(id)).action).toMatchObject({ state: ActionState.QUEUED, epoch: 1n });
      await waitForLog(
        "could not store at once the deadlines of workers heard just before them; the next renewal tries again, and this process reaps none of them meanwhile",
      );
      pass(2000);
      await tick().reap();
      expect((await reaped(t)).events).toEqual([]);
      // The database answers again: the tick stores the deadline, and the slot is filled.
      renewal.broken = false;
      await tick().renew();
      await tick().dispatch();
      expect(await w.next("grant")).toMatchObject({ actionId: id, epoch: 2n });
      await tick().reap();
      expect(await expiredActions()).toEqual([]);
    });
  });

  it("reaps nothing when starting the reap waited for the database longer than a heartbeat interval", async () => {
    await t[Symbol.asyncDispose]();
    // The database hangs as the reap asks for it: its transaction starts after the hang, by
    // when the deadlines passed, as the renewals stuck behind the same hang could not move them.
    let hangs = false;
    t = await start({
      wrapDb: (db) =>
        new Proxy(db, {
          get(target, property, receiver) {
            if (property !== "transaction" || !hangs) return Reflect.get(target, property, receiver);
            hangs = false;
            return async (...args: Parameters<Db["transaction"]>) => {
              clock.advance(GRACE_MS + 1000);
              await new Promise((resolve) => setTimeout(resolve, 2100));
              return target.transaction(...args);
            };
          },
        }),
    });
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    await w.heartbeat(1, [lease(grant)]);
    await tick().renew();
    hangs = true;
    await expect(tick().reap()).rejects.toThrow(
      /^starting the reap waited \d+ms \(for the database, or for this/,
    );
    expect(await expiredActions()).toEqual([]);
    // Awake again: the worker's next heartbeat is renewed, and the reap after the failure
    // extends every live session before it judges any.
    await w.heartbeat(2, [lease(grant)]);
    await tick().renew();
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    expect((await getAction(id)).action).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
  });

  it("after a database outage the first reap gives every live session a grace period from now, so a short outage expires nothing", async () => {
    const reap = await restartWithBreakableReap();
    // Its stream gone, the session's stored deadline is what another process would have renewed
    // had the database answered: here nobody vouches for it, as for another process's session.
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    w.drop();
    await waitForLog("worker stream lost");

    // The reaper's own statement fails (the database is gone) and the deadline passes meanwhile.
    reap.broken = true;
    await expect(tick().reap()).rejects.toThrow(/injected/);
    clock.advance(GRACE_MS + 1000);
    reap.broken = false;
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    await waitForLog(
      "since the last reap, a reap failed (connection lost (injected)): live sessions get a grace period from now before any is reaped",
    );

    // The worker is back within the grace period counted from the database's return: nothing lost.
    const back = await worker("w1", { held: [lease(grant)] });
    expect(back.welcome.resumed.map((l) => l.actionId)).toEqual([id]);
    back.drop();
    // The second stream loss of this server: the first one's line must not answer for it.
    await waitForLog("worker stream lost", 2);

    // A failed check of the database watch does the same; without one, expiry is as usual.
    t.server.leases.databaseChecked(false);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    // Checks that go on failing (this process cannot reach the database, the others can) extend
    // no more: otherwise every check would push every deadline of the cluster back again.
    t.server.leases.databaseChecked(false);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([id]);

    // A check that succeeded ends that failure: the next failed check extends again.
    // (The expired action went back to the queue: w2 gets it again, at its next epoch.)
    const w2 = await worker("w2");
    await tick().dispatch();
    const regrant = await w2.next("grant", (g) => g.actionId === id);
    expect(regrant.epoch).toBe(grant.epoch + 1n);
    w2.drop();
    await waitForLog("worker stream lost", 3);
    t.server.leases.databaseChecked(true);
    t.server.leases.databaseChecked(false);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([id]);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([id, id]);
  });

  it("after a database outage longer than the maximum silence, still counts no session's silence through it", async () => {
    const reap = await restartWithBreakableReap();
    // Two sessions whose streams are gone, as another process's look from here: one silent
    // for longer than the maximum silence (100 s) before the outage, one heard just before it.
    const silent = await worker("silent");
    const silentId = await submit();
    await tick().dispatch();
    const silentGrant = await silent.next("grant", (g) => g.actionId === silentId);
    silent.drop();
    await waitForLog("worker stream lost");
    clock.advance(101_000);
    const heard = await worker("heard");
    const heardId = await submit();
    await tick().dispatch();
    const heardGrant = await heard.next("grant", (g) => g.actionId === heardId);
    await heard.heartbeat(1, [lease(heardGrant)]);
    await tick().renew();
    heard.drop();
    await waitForLog("worker stream lost", 2);

    // The database is gone for longer than the maximum silence: nobody could renew meanwhile.
    reap.broken = true;
    await expect(tick().reap()).rejects.toThrow(/injected/);
    clock.advance(111_000);
    reap.broken = false;
    await tick().reap();
    // The session heard just before the outage gets a grace period from now; the one already
    // silent past the maximum before it does not.
    expect(await expiredActions()).toEqual([silentId]);
    expect(silentGrant.epoch).toBe(1n);
    const back = await worker("heard", { held: [lease(heardGrant)] });
    expect(back.welcome.resumed.map((l) => l.actionId)).toEqual([heardId]);
    back.drop();
  });
});

/** The renewal's statement. */
const RENEWAL = /update sessions s set\s+last_heard_at/;
