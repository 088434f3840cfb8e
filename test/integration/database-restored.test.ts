import { sql } from "drizzle-orm";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { RevokeReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { emptyStore, freshStore, type TestStore } from "../helpers/database.js";
import { migrateWithFirst, queryStore, shippedJournal } from "../helpers/migrations.js";
import { runCli } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

/**
 * A database that went back in time (restored from an older backup, or a
 * standby promoted after losing commits) under running agents. The restore is
 * simulated by putting an action's row back as it was before its grant: what
 * the backup holds of an action granted after it was taken.
 */
describe("a database that went back in time", () => {
  let clock: FakeClock;
  let t: TestServer;
  let db: Db;
  let workers: TestWorker[];

  const start = () =>
    startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false, wrapDb: (d) => (db = d) },
    });
  const worker = async (workerId: string, held: { actionId: string; epoch: bigint }[] = []) => {
    const w = await connectWorker(t.address, { workerId, cluster: "rr", capacity: 1, heldLeases: held });
    workers.push(w);
    return w;
  };
  const submit = async () => (await t.client(ActionService).submitAction({ cluster: "rr" })).action?.id ?? "";
  const action = async (id: string) => (await t.client(ActionService).getAction({ actionId: id })).action;
  const events = async (actionId: string, kind: EventKind) =>
    (await t.client(EventService).listEvents({ actionId, kind, pageSize: 100 })).events;
  /** Puts the action's row back as a backup taken before its first grant holds it. */
  const rollBack = async (id: string) => {
    await db.execute(sql`delete from attempts where action_id = ${id}`);
    await db.execute(
      sql`update actions set state = 'QUEUED', epoch = 0, attempt_count = 0, session_id = null, worker_id = null,
            granted_at = null where id = ${id}`,
    );
  };
  const scrape = async () => (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();

  beforeEach(async () => {
    clock = createFakeClock();
    workers = [];
    t = await start();
  });
  afterEach(async () => {
    for (const w of workers) w.drop();
    await t[Symbol.asyncDispose]();
  });

  it("a worker that lists an epoch above the stored one raises it, and the next grant is above it", async () => {
    const p = await worker("rr-p");
    const x = await submit();
    await t.server.leases.tick.dispatch();
    const grant = await p.next("grant");
    expect(grant.epoch).toBe(1n);
    await rollBack(x);

    p.drop();
    const back = await worker("rr-p", [{ actionId: x, epoch: 1n }]);
    expect(back.welcome.revoked).toMatchObject([{ actionId: x, epoch: 1n }]);
    // Looked at before the new stream took any grant: X comes back to it above the listed epoch.
    expect(await back.next("grant")).toMatchObject({ actionId: x, epoch: 2n });

    const [regression] = await events(x, EventKind.EPOCH_REGRESSION);
    expect(regression?.message).toMatch(
      /listed a lease at epoch 1, above the stored epoch 0: the database lost grants/,
    );
    expect(regression?.message).toMatch(/the epoch is raised to 1/);
    // Not "a lease it never held": it held it, the database forgot.
    const [revoked] = await events(x, EventKind.LEASE_REVOKED);
    expect(revoked?.message).toMatch(/this database has no record of granting it: the database lost grants/);
    expect(
      t.logs.some((l) => l.level === 50 && /went back in time.*leasehold db restored/.test(String(l.msg))),
    ).toBe(true);
    expect(await scrape()).toMatch(/^leasehold_epoch_regressions_total 1$/m);
  });

  it("a lease granted again at the epoch a reconnecting worker lists is named, and left to its holder", async () => {
    const p = await worker("rr-p");
    const x = await submit();
    await t.server.leases.tick.dispatch();
    expect((await p.next("grant")).epoch).toBe(1n);
    await rollBack(x);
    // The restored database grants X again, at the same epoch, while p still runs it.
    const r = await worker("rr-r");
    await t.server.leases.tick.dispatch();
    expect((await r.next("grant")).epoch).toBe(1n);

    p.drop();
    const back = await worker("rr-p", [{ actionId: x, epoch: 1n }]);
    // p is told to stop its copy; r's lease is named in the error, not ended on p's word.
    expect(back.welcome.revoked).toMatchObject([{ actionId: x, epoch: 1n }]);
    await t.server.leases.tick.regressions();
    const [regression] = await events(x, EventKind.EPOCH_REGRESSION);
    expect(regression?.message).toMatch(/which this database granted to another worker or never granted/);
    expect(regression?.message).toMatch(
      /the lease of worker rr-r at epoch 1 may run the same action .* left to its holder/,
    );
    expect(r.received.some((m) => m.message.case === "revoke")).toBe(false);
    expect(await action(x)).toMatchObject({ state: ActionState.LEASED, epoch: 1n, systemRetryCount: 0 });
    expect(
      t.logs.some(
        (l) =>
          l.level === 50 && /rr-r at epoch 1 .*left to its holder.*leasehold db restored/.test(String(l.msg)),
      ),
    ).toBe(true);
  });

  it("a worker listing another's lease at a made-up epoch ends nothing: its word is no proof", async () => {
    const r = await worker("rr-r");
    const x = await submit();
    await t.server.leases.tick.dispatch();
    const grant = await r.next("grant");
    expect(grant).toMatchObject({ actionId: x, epoch: 1n });
    const evil = await worker("rr-evil");
    await evil.heartbeat(1, [{ actionId: x, epoch: 1_000_000n }]);
    expect(await evil.next("revoke")).toMatchObject({ actionId: x, epoch: 1_000_000n });
    await t.server.leases.tick.regressions();
    // Reported, as a listing above the stored epoch is; r's lease and the epoch are as they were.
    expect(await events(x, EventKind.EPOCH_REGRESSION)).toHaveLength(1);
    expect(r.received.some((m) => m.message.case === "revoke")).toBe(false);
    expect(await action(x)).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
    expect((await r.complete(grant, { output: { ok: true } })).accepted).toBe(true);
  });

  it("a queued action a worker lists above its stored epoch is granted above it", async () => {
    const q = await worker("rr-q");
    // q's one slot is taken: X stays queued.
    const y = await submit();
    const held = await q.next("grant");
    expect(held.actionId).toBe(y);
    const x = await submit();
    const mine = { actionId: y, epoch: held.epoch };
    // q lists X at epoch 3, which the database lost: X, still queued, is raised past it.
    await q.heartbeat(1, [mine, { actionId: x, epoch: 3n }]);
    expect(await q.next("revoke")).toMatchObject({ actionId: x, epoch: 3n, reason: RevokeReason.SUPERSEDED });
    await t.server.leases.tick.regressions();
    expect(await events(x, EventKind.EPOCH_REGRESSION)).toHaveLength(1);
    // Looked at once per stream: a later heartbeat listing it again costs nothing more.
    await q.heartbeat(2, [mine, { actionId: x, epoch: 3n }]);
    await t.server.leases.tick.regressions();
    expect(await events(x, EventKind.EPOCH_REGRESSION)).toHaveLength(1);
    expect((await q.complete(held, { output: {} })).accepted).toBe(true);
    await t.server.leases.tick.dispatch();
    expect(await q.next("grant", (g) => g.actionId === x)).toMatchObject({ actionId: x, epoch: 4n });
  });

  it("`leasehold db restored` raises epochs, ends sessions, requeues leases without a retry and holds grants", async () => {
    const p = await worker("rr-p");
    const x = await submit();
    await t.server.leases.tick.dispatch();
    expect((await p.next("grant")).epoch).toBe(1n);
    // Queued behind it (p has one slot): never granted.
    const y = await submit();

    await t.stop();
    const store = t.store;
    const ran = await runCli([
      "db",
      "restored",
      ...(store.url ? ["--database-url", store.url] : ["--data-dir", store.dataDir]),
      "--grace-period",
      "10s",
    ]);
    expect(ran).toMatchObject({ code: 0, stderr: "" });
    expect(ran.stdout).toMatch(
      /^database marked restored: 1 live sessions ended, 1 leases revoked, the epochs of 2 queued or leased actions raised by 1000000; no grant before /,
    );
    t = await t.restart();

    // p still runs X at epoch 1: its new session is told to stop it, with nothing to detect.
    const back = await worker("rr-p", [{ actionId: x, epoch: 1n }]);
    expect(back.welcome.sessionResumed).toBe(false);
    expect(back.welcome.revoked).toMatchObject([{ actionId: x, epoch: 1n }]);
    await t.server.leases.tick.regressions();
    expect(await events(x, EventKind.EPOCH_REGRESSION)).toHaveLength(0);
    expect(await action(x)).toMatchObject({
      state: ActionState.QUEUED,
      epoch: 1_000_001n,
      systemRetryCount: 0,
    });
    expect((await action(y))?.epoch).toBe(1_000_000n);
    const [restored] = (
      await t.client(EventService).listEvents({ kind: EventKind.DATABASE_RESTORED, pageSize: 10 })
    ).events;
    expect(restored?.actor).toMatch(/.@./);
    expect(restored?.details).toMatchObject({
      sessions_ended: 1,
      leases_revoked: 1,
      actions_renumbered: 2,
      epoch_margin: 1_000_000,
    });
    const [revoked, listed] = await events(x, EventKind.LEASE_REVOKED);
    expect(revoked?.message).toMatch(/the database was restored from a backup/);
    // The backup has its grant: it held that lease, and holds it no longer.
    expect(listed?.message).toBe("worker rr-p listed a lease it no longer holds (epoch 1); revoked");

    // Nothing is granted during the hold, which covers every old holder's guarantee.
    await t.server.leases.tick.dispatch();
    expect((await action(x))?.state).toBe(ActionState.QUEUED);
    clock.advance(60_000);
    await back.heartbeat(1);
    await t.server.leases.tick.renew();
    await t.server.leases.tick.dispatch();
    expect(await back.next("grant")).toMatchObject({ actionId: x, epoch: 1_000_002n });
  });
});

/**
 * `leasehold db restored` on a restored backup of an older build: it must leave the schema as it
 * is, so that the older build (which has no such command) serves it after a rollback. That build
 * is not run here: what it needs is a database with its migrations, no more, and marked.
 */
// The timeout is a hang guard: on PGlite each step opens the database again, seconds on a busy machine.
describe("`leasehold db restored` on a database of another build", { timeout: 300_000 }, () => {
  const entries = shippedJournal.entries;
  /** How many migrations a database at the oldest one the mark needs has. */
  const markable = entries.findIndex((e) => e.tag === "0006_authorization") + 1;
  const where = (store: TestStore) =>
    store.url ? ["--database-url", store.url] : ["--data-dir", store.dataDir];
  const markRestored = (store: TestStore) =>
    runCli(["db", "restored", ...where(store), "--grace-period", "10s"]);
  /** A worker's live session holding a lease, and an action queued behind it, as builds from 0006 on write them. */
  const seed = [
    `insert into workers (worker_id, cluster, capacity) values ('old-p', 'old', 1)`,
    `insert into sessions (id, worker_id, server_id, deadline, stream_token)
     values ('s-old', 'old-p', 'server-old', now() + interval '1 hour', 'token')`,
    `insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier, max_backoff_ms,
       max_system_retries, state, epoch, attempt_count, session_id, worker_id, granted_at)
     values ('a-leased', 'old', 3, 1000, 2, 60000, 10, 'LEASED', 1, 1, 's-old', 'old-p', now()),
            ('a-queued', 'old', 3, 1000, 2, 60000, 10, 'QUEUED', 0, 0, null, null, null)`,
    `insert into attempts (action_id, epoch, worker_id, session_id, outcome) values ('a-leased', 1, 'old-p', 's-old', 'RUNNING')`,
  ];

  it("marks a database at the oldest migration it needs without applying any, with every effect of the mark", async () => {
    await using store = await emptyStore();
    await migrateWithFirst(store, markable, seed);

    const ran = await markRestored(store);
    expect(ran).toMatchObject({ code: 0, stderr: "" });
    expect(ran.stdout).toMatch(
      /^database marked restored: 1 live sessions ended, 1 leases revoked, the epochs of 2 queued or leased actions raised by 1000000; /,
    );

    // One query (on PGlite each opens the database again, seconds on a busy machine).
    const [after] = await queryStore(
      store,
      `select (select count(*)::int from drizzle.__drizzle_migrations) as applied,
         to_regclass('history') is null as no_history,
         not exists (select 1 from information_schema.columns
                     where table_name = 'sessions' and column_name = 'instance_id') as no_instance,
         (select json_agg(json_build_object('id', id, 'state', state, 'epoch', epoch, 'session_id', session_id,
            'worker_id', worker_id, 'system_retry_count', system_retry_count,
            'held', not_before = (select ended_at from sessions) + interval '10 seconds') order by id)
          from actions) as actions,
         (select json_agg(json_build_object('end_reason', end_reason, 'server_id', server_id,
            'stream_token', stream_token, 'ended', ended_at is not null)) from sessions) as sessions,
         (select json_agg(json_build_object('outcome', outcome, 'ended', ended_at is not null)) from attempts) as attempts,
         (select json_agg(json_build_object('kind', kind, 'action_id', action_id, 'has_actor', actor <> '') order by kind)
          from events) as events`,
    );
    expect(after).toEqual({
      applied: markable,
      // Nothing of a later migration: 0012's column, 0013's table.
      no_history: true,
      no_instance: true,
      actions: [
        {
          id: "a-leased",
          state: "QUEUED",
          epoch: 1_000_001,
          session_id: null,
          worker_id: null,
          system_retry_count: 0,
          held: true,
        },
        {
          id: "a-queued",
          state: "QUEUED",
          epoch: 1_000_000,
          session_id: null,
          worker_id: null,
          system_retry_count: 0,
          held: true,
        },
      ],
      sessions: [{ end_reason: "database_restored", server_id: null, stream_token: null, ended: true }],
      attempts: [{ outcome: "LEASE_EXPIRED", ended: true }],
      events: [
        { kind: "database_restored", action_id: null, has_actor: true },
        { kind: "lease_revoked", action_id: "a-leased", has_actor: true },
      ],
    });
  });

  it("refuses a database older than the oldest migration it needs, saying what to do, and changes nothing", async () => {
    await using store = await emptyStore();
    await migrateWithFirst(store, markable - 1, seed);
    const ran = await markRestored(store);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toContain(
      `the database's schema is too old to mark: its newest migration is migration ${entries[markable - 2]?.tag}, and the mark needs 0006_authorization (1 migration later) or newer. Nothing was changed.`,
    );
    expect(ran.stderr).toContain("run this command again");
    const [after] = await queryStore(
      store,
      `select (select count(*)::int from drizzle.__drizzle_migrations) as applied,
         (select count(*)::int from sessions where ended_at is null) as live`,
    );
    expect(after).toEqual({ applied: markable - 1, live: 1 });
  });

  it("refuses a database with no Leasehold schema, creating none", async () => {
    await using store = await emptyStore();
    await queryStore(store, "create table unrelated (id int)");
    const ran = await markRestored(store);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toContain("the database has no Leasehold schema");
    const [left] = await queryStore(
      store,
      "select to_regclass('drizzle.__drizzle_migrations') is null as no_migrations, to_regclass('actions') is null as no_actions",
    );
    expect(left).toEqual({ no_migrations: true, no_actions: true });
  });

  it("refuses a database a newer build migrated, naming the command to run instead", async () => {
    await using store = await freshStore();
    const newest = entries.at(-1)?.when ?? 0;
    await queryStore(
      store,
      `insert into drizzle.__drizzle_migrations (hash, created_at) values ('f0e1d2c3b4a5', ${newest + 86_400_000})`,
    );
    const ran = await markRestored(store);
    expect(ran.code).toBe(2);
    expect(ran.stderr).toContain(
      "the database was migrated by a newer leasehold: it has 1 migration this build does not know",
    );
    expect(ran.stderr).toContain(
      "Run `leasehold db restored` of a build at least as new as the one that migrated it: it marks the database on the schema it has",
    );
    expect(
      await queryStore(store, "select count(*)::int as n from events where kind = 'database_restored'"),
    ).toEqual([{ n: 0 }]);
  });
});
