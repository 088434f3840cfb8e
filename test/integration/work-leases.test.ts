import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import { type SQL, sql } from "drizzle-orm";
import { PgDialect } from "drizzle-orm/pg-core";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterHealth, ClusterService, WorkerState } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import {
  ConnectRequestSchema,
  RejectReason,
  RevokeReason,
  WorkerService,
} from "../../src/gen/leasehold/v1/worker_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import type { Db } from "../../src/store/database.js";
import { MAX_REVOKE_EVENTS_PER_HELLO } from "../../src/store/queries/open-session.js";
import { MAX_SUPERSEDED_PER_HEARTBEAT } from "../../src/work/lease/stream.js";
import { deferred } from "../helpers/deferred.js";
import { intercepting } from "../helpers/intercept-db.js";
import { startTestServer, type TestServer, waitForLog } from "../helpers/server.js";
import { expectStatus, failure, statusDetails } from "../helpers/status.js";
import { connectWorker, framedRequest, sendAndHalfClose, type TestWorker } from "../helpers/worker.js";

const GRACE_MS = 10_000;

/**
 * SPEC §2 rules, one behaviour each, on a real server and real streams. Time
 * is a fake clock and the loops (renew, reap, dispatch) run when the test says.
 */
describe("work leases", () => {
  let clock: FakeClock;
  let t: TestServer;
  let workers: TestWorker[];

  const start = async () =>
    startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false },
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
  const events = async (actionId: string) =>
    (await t.client(EventService).listEvents({ actionId, pageSize: 1000 })).events;
  const { tick } = { tick: () => t.server.leases.tick };
  /** Heartbeats from each worker, then one renewal tick: they stay alive across a clock jump. */
  const keepAlive = async (...alive: TestWorker[]) => {
    for (const w of alive) await w.heartbeat(Date.now());
    await tick().renew();
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

  it("ends a stream whose first message is not a hello with INVALID_ARGUMENT", async () => {
    const { connectWorker: _ } = await import("../helpers/worker.js");
    const { createClient } = await import("../../src/rpc/client.js");
    const { WorkerService } = await import("../../src/gen/leasehold/v1/worker_pb.js");
    const { create } = await import("@bufbuild/protobuf");
    const client = createClient(WorkerService, t.address);
    const call = client.connect();
    const status = new Promise<{ code: number; details: string }>((resolve) => call.on("status", resolve));
    call.on("error", () => {});
    call.write(
      create(WorkerService.method.connect.input, { message: { case: "heartbeat", value: { sequence: 1n } } }),
    );
    expect(await status).toMatchObject({
      code: Code.InvalidArgument,
      details: expect.stringMatching(
        /^message: the first message on Connect must be a hello \(got heartbeat\)/,
      ),
    });
    client.close();
  });

  it("ends a stream that sends no hello within the bound with RESOURCE_EXHAUSTED, and only such a stream", async () => {
    t = await t.replace({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false, limits: { helloTimeoutMs: 300 } },
    });
    const w = await worker("w1");
    const client = t.client(WorkerService);
    const call = client.connect();
    call.on("error", () => {});
    const status = await new Promise<grpc.StatusObject>((resolve) => call.on("status", resolve));
    expect(status).toMatchObject({
      code: Code.ResourceExhausted,
      details:
        "no hello came in the 300 ms after the stream opened: send the hello as the first message, within 300 ms",
    });
    expect(statusDetails(status.metadata)).toMatchObject({
      reason: "HELLO_TIMEOUT",
      info: { timeout_ms: "300" },
    });
    // w1's stream, open longer than that, said its hello in time: it goes on.
    expect(await w.heartbeat(1)).toMatchObject({ sequence: 1n });
  });

  it("rejects a hello with invalid fields, naming each", async () => {
    await expect(
      connectWorker(t.address, { workerId: "", cluster: "bad cluster", capacity: 20_000 }),
    ).rejects.toMatchObject({
      code: Code.InvalidArgument,
      details: expect.stringMatching(
        /hello\.worker_id: is required; hello\.cluster: may contain only.*hello\.capacity: must be at most 10000/,
      ),
    });
  });

  it("refuses a hello with capacity 0", async () => {
    await expect(
      connectWorker(t.address, { workerId: "w0", cluster: "east", capacity: 0 }),
    ).rejects.toMatchObject({
      code: Code.InvalidArgument,
      details: "hello.capacity: must be at least 1 (got 0)",
    });
  });

  it("counts a lease listed several times in a hello or heartbeat once", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const { epoch } = await w.next("grant");
    w.drop();
    await waitForEvent(t, id, "w1", EventKind.STREAM_LOST);
    const thrice = Array.from({ length: 3 }, () => ({ actionId: id, epoch }));
    const back = await worker("w1", { capacity: 1, held: thrice });
    expect(back.welcome).toMatchObject({
      sessionResumed: true,
      resumed: [{ actionId: id, epoch }],
      revoked: [],
    });
    expect(await back.heartbeat(1, thrice)).toMatchObject({ sequence: 1n });
  });

  it("lets a worker back with a smaller capacity list every lease it holds, and bounds its heartbeats by them", async () => {
    const w = await worker("w1", { capacity: 4 });
    const ids = [await submit(), await submit(), await submit(), await submit()];
    await tick().dispatch();
    const held = [];
    for (let i = 0; i < 4; i++) {
      const { actionId, epoch } = await w.next("grant");
      held.push({ actionId, epoch });
    }
    expect(held.map((l) => l.actionId).sort()).toEqual([...ids].sort());
    w.drop();
    await waitForEvent(t, ids[0] ?? "", "w1", EventKind.STREAM_LOST);
    const back = await worker("w1", { capacity: 1, held });
    expect(back.welcome.resumed).toHaveLength(4);
    expect(back.welcome.revoked).toEqual([]);
    expect(await back.heartbeat(1, held)).toMatchObject({ sequence: 1n });
    expect(back.received.filter((m) => m.message.case === "revoke")).toEqual([]);
    // Twice the 4 leases held at the hello: a ninth distinct one is more than any worker holds.
    const nine = [...held, ...Array.from({ length: 5 }, (_, i) => ({ actionId: `x${i}`, epoch: 1n }))];
    back.send({ message: { case: "heartbeat", value: { sequence: 2n, heldLeases: nine } } });
    expect(await back.ended).toMatchObject({
      code: Code.InvalidArgument,
      details: expect.stringMatching(
        /^heartbeat\.held_leases: must list at most 8 distinct leases .*got 9\)$/,
      ),
    });
  });

  it("welcomes a worker, registers it and its cluster, and shows it connected with its deadline", async () => {
    const w = await worker("w1", { capacity: 4, labels: { gpu: "a100" } });
    expect(w.welcome).toMatchObject({
      sessionResumed: false,
      heartbeatInterval: { seconds: 2n },
      gracePeriod: { seconds: 10n },
    });
    const listed = await t.client(ClusterService).getWorker({ workerId: "w1" });
    expect(listed.worker).toMatchObject({
      workerId: "w1",
      cluster: "east",
      capacity: 4,
      labels: { gpu: "a100" },
      state: WorkerState.CONNECTED,
      session: { sessionId: w.welcome.sessionId },
    });
    const deadline = Number(listed.worker?.session?.deadline?.seconds) * 1000;
    expect(deadline - clock.current().getTime()).toBeGreaterThan(GRACE_MS - 1000);
    const clusters = await t.client(ClusterService).listClusters({});
    expect(clusters.clusters).toEqual([
      expect.objectContaining({ name: "east", connectedWorkers: 1, health: ClusterHealth.HEALTHY }),
    ]);
  });

  it("acks heartbeats with the sequence and the time left on the persisted deadline", async () => {
    const w = await worker("w1");
    const ack = await w.heartbeat(7);
    expect(ack.sequence).toBe(7n);
    const remainingMs = Number(ack.remaining?.seconds) * 1000 + (ack.remaining?.nanos ?? 0) / 1e6;
    expect(remainingMs).toBeGreaterThan(GRACE_MS - 2000);
    expect(remainingMs).toBeLessThanOrEqual(GRACE_MS);
  });

  it("revokes at most 64 listed leases that are not the session's per heartbeat, the first listed", async () => {
    const w = await worker("w1", { capacity: 10_000 });
    const made = Array.from({ length: 20_000 }, (_, i) => ({ actionId: `made-up-${i}`, epoch: 1n }));
    await w.heartbeat(1, made);
    await w.heartbeat(2, made.slice(100));
    // A heartbeat's revokes go out right after its ack, before the next heartbeat's ack.
    await w.heartbeat(3);
    const revoked = w.received.flatMap((m) => (m.message.case === "revoke" ? [m.message.value] : []));
    expect(revoked).toHaveLength(2 * MAX_SUPERSEDED_PER_HEARTBEAT);
    expect(revoked.every((r) => r.reason === RevokeReason.SUPERSEDED)).toBe(true);
    expect(revoked.map((r) => r.actionId)).toEqual([
      ...made.slice(0, MAX_SUPERSEDED_PER_HEARTBEAT).map((l) => l.actionId),
      ...made.slice(100, 100 + MAX_SUPERSEDED_PER_HEARTBEAT).map((l) => l.actionId),
    ]);
  });

  it("revokes every lease a hello lists that is not the session's, recording the first 64 as events", async () => {
    const made = Array.from({ length: 20_000 }, (_, i) => ({ actionId: `listed-${i}`, epoch: 1n }));
    const w = await worker("w-many", { capacity: 10_000, held: made });
    expect(w.welcome.revoked).toHaveLength(made.length);
    const events = [];
    let pageToken = "";
    do {
      const page = await t.client(EventService).listEvents({ workerId: "w-many", pageSize: 1000, pageToken });
      events.push(...page.events);
      pageToken = page.nextPageToken;
    } while (pageToken);
    // No action of east has these ids: the events do not name them.
    const revoked = events.filter((e) => e.kind === EventKind.LEASE_REVOKED);
    expect(revoked).toHaveLength(MAX_REVOKE_EVENTS_PER_HELLO);
    expect(revoked.map((e) => e.actionId)).toEqual(revoked.map(() => ""));
    expect(events.find((e) => e.kind === EventKind.SESSION_STARTED)?.message).toMatch(
      /listed 20000 leases it does not hold, all revoked, the first 64 recorded as events/,
    );
  });

  it("names no other cluster's action in the events of a worker that lists or reports on it, and says it never held it", async () => {
    const west = await connectWorker(t.address, { workerId: "ww", cluster: "west", capacity: 1 });
    workers.push(west);
    const westId = await submit({ cluster: "west" });
    const eastId = await submit();
    const holder = await worker("we-holder");
    await tick().dispatch();
    const westGrant = await west.next("grant");
    const eastGrant = await holder.next("grant");
    // A worker of east lists west's lease, then reports on it and on another east worker's lease.
    const w = await worker("we", { held: [{ actionId: westId, epoch: westGrant.epoch }] });
    expect(w.welcome.revoked).toMatchObject([{ actionId: westId }]);
    expect(await w.complete(westGrant, { output: {} })).toMatchObject({ rejectReason: RejectReason.FENCED });
    expect(await w.complete(eastGrant, { output: {} })).toMatchObject({ rejectReason: RejectReason.FENCED });
    await waitForEvent(t, "", "we", EventKind.REPORT_FENCED, 2);

    const east = (await t.client(EventService).listEvents({ cluster: "east", workerId: "we" })).events;
    expect(east.map((e) => e.actionId)).not.toContain(westId);
    expect(east.map((e) => e.message).join("\n")).not.toContain(westId);
    expect(
      east.filter((e) => e.kind !== EventKind.SESSION_STARTED).map((e) => [e.actionId, e.message]),
    ).toEqual([
      ["", "worker we listed a lease it never held (not an action of cluster east); revoked"],
      ["", "completion from worker we rejected: a lease it never held (not an action of cluster east)"],
      [eastId, "completion from worker we rejected: epoch 1 is a lease it never held"],
    ]);
    // West's action has only west's events.
    const westEvents = (await events(westId)).map((e) => e.cluster);
    expect(new Set(westEvents)).toEqual(new Set(["west"]));
  });

  it("says why it fenced a late report: the action ended, or its epoch is older than the current one", async () => {
    const w = await worker("wf", { capacity: 2 });
    const done = await submit();
    await submit();
    await tick().dispatch();
    const grants = [await w.next("grant"), await w.next("grant")];
    const finished = grants.find((g) => g.actionId === done);
    const given = grants.find((g) => g.actionId !== done);
    if (!finished || !given) throw new Error("both actions are granted to wf");
    expect(await w.complete(finished, { output: {} })).toMatchObject({ accepted: true });
    expect(await w.release(given)).toMatchObject({ accepted: true });
    // The freed slot takes the released action again, under epoch 2.
    expect(await w.next("grant")).toMatchObject({ actionId: given.actionId, epoch: 2n });
    // Late progress on both leases, under the epochs they were granted with.
    for (const [n, g] of [finished, given].entries()) {
      const reportId = BigInt(9000 + n);
      w.send({
        message: {
          case: "progress",
          value: { reportId, actionId: g.actionId, epoch: g.epoch, phase: "late" },
        },
      });
      expect(await w.next("reportResult", (r) => r.reportId === reportId)).toMatchObject({
        rejectReason: RejectReason.FENCED,
      });
    }
    await waitForEvent(t, "", "wf", EventKind.REPORT_FENCED, 2);
    const fenced = (
      await t.client(EventService).listEvents({ workerId: "wf", kind: EventKind.REPORT_FENCED })
    ).events;
    expect(new Map(fenced.map((e) => [e.actionId, e.message]))).toEqual(
      new Map([
        [
          finished.actionId,
          "progress from worker wf rejected: the action already ended SUCCEEDED (under epoch 1)",
        ],
        [given.actionId, "progress from worker wf rejected: epoch 1 is older than the current epoch 2"],
      ]),
    );
  });

  it("grants a queued action with epoch 1 and accepts its completion once (a resent copy too)", async () => {
    const w = await worker("w1");
    const id = await submit({ payload: { argv: ["true"] } });
    await tick().dispatch();
    const grant = await w.next("grant");
    expect(grant).toMatchObject({ actionId: id, epoch: 1n, attempt: 1, payload: { argv: ["true"] } });
    const done = await w.complete(grant, { output: { exit: 0 } });
    expect(done).toMatchObject({ accepted: true, epoch: 1n });
    // The same report sent again (its answer lost on a broken connection) is accepted again, changing nothing.
    const resent = await w.complete(grant, { output: { exit: 0 } });
    expect(resent).toMatchObject({ accepted: true, epoch: 1n });
    const again = await w.complete(grant, { output: { exit: 1 } });
    expect(again).toMatchObject({ accepted: false, rejectReason: RejectReason.FENCED });
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.SUCCEEDED, output: { exit: 0 }, epoch: 1n });
    expect(got.attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.SUCCEEDED]);
  });

  /**
   * Restarts the server on the same kind of store, with every `execute` of its database
   * passed to `intercept` with the statement's text: the faults the tests below inject.
   */
  async function serverWithStatements(
    intercept: (query: SQL, text: string, db: Db) => Promise<unknown>,
    config: { gracePeriod?: string; heartbeatInterval?: string; dispatchHangMs?: number } = {},
  ) {
    await t[Symbol.asyncDispose]();
    const dialect = new PgDialect();
    t = await startTestServer({
      config: {
        gracePeriod: config.gracePeriod ?? "10s",
        heartbeatInterval: config.heartbeatInterval ?? "2s",
      },
      overrides: {
        clock,
        timers: false,
        ...(config.dispatchHangMs ? { dispatchHangMs: config.dispatchHangMs } : {}),
        wrapDb: (db) =>
          new Proxy(db, {
            get(target, property, receiver) {
              if (property !== "execute") return Reflect.get(target, property, receiver);
              return (query: SQL) => intercept(query, dialect.sqlToQuery(query).sql, target);
            },
          }),
      },
    });
  }

  /** A server whose progress statements wait for `release` once `hold.armed`; `started` when one does. */
  async function serverHoldingProgress(log: string[] = []) {
    let started!: () => void;
    const progressStarted = new Promise<void>((r) => {
      started = r;
    });
    let release!: () => void;
    const mayRun = new Promise<void>((r) => {
      release = r;
    });
    const hold = { armed: true };
    await serverWithStatements(async (query, text, db) => {
      if (hold.armed && text.includes("checkpoint = coalesce")) {
        started();
        await mayRun;
        log.push("progress");
      } else if (hold.armed && text.includes("f_input")) log.push("finish");
      return db.execute(query);
    });
    return { progressStarted, release, hold };
  }

  it("applies a progress report and the release after it in the order sent, keeping the checkpoint", async () => {
    // The progress statement is held until the test lets it run: the release that follows
    // could otherwise commit first, fence the progress and lose its checkpoint.
    const { progressStarted, release: letProgressRun } = await serverHoldingProgress();
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    const { epoch } = grant;
    w.send({
      message: {
        case: "progress",
        value: { reportId: 101n, actionId: id, epoch, phase: "half way", checkpoint: { step: 5 } },
      },
    });
    await progressStarted;
    w.send({
      message: { case: "release", value: { reportId: 102n, actionId: id, epoch, reason: "give back" } },
    });
    // The server has read the release (an ack comes after it), and every settlement it asked
    // for is done: out of order, the release has committed by now.
    await w.heartbeat(1);
    await tick().settled();
    letProgressRun();
    expect(await w.next("reportResult", (r) => r.reportId === 101n)).toMatchObject({ accepted: true });
    expect(await w.next("reportResult", (r) => r.reportId === 102n)).toMatchObject({ accepted: true });
    await tick().dispatch();
    const again = await w.next("grant", (g) => g.epoch === 2n);
    expect(again.checkpoint).toEqual({ step: 5 });
  });

  it("leaves out a checkpoint that would take the grant past a client's default receive limit", async () => {
    // Within the limits (1 Mi characters each), but of 3-byte characters: 5.7 MB together.
    const payload = { text: "\u4e00".repeat(1_000_000) };
    const w = await worker("w1");
    const id = await submit({ payload });
    await tick().dispatch();
    const { epoch } = await w.next("grant");
    const checkpoint = { text: "\u4e00".repeat(900_000) };
    w.send({
      message: { case: "progress", value: { reportId: 1n, actionId: id, epoch, phase: "p", checkpoint } },
    });
    expect(await w.next("reportResult", (r) => r.reportId === 1n)).toMatchObject({ accepted: true });
    expect(await w.release({ actionId: id, epoch })).toMatchObject({ accepted: true });
    // The worker's client has the default 4 MiB receive limit: the grant comes, without the checkpoint.
    await tick().dispatch();
    const again = await w.next("grant", (g) => g.epoch === 2n);
    expect({ actionId: again.actionId, checkpoint: again.checkpoint }).toEqual({
      actionId: id,
      checkpoint: undefined,
    });
    expect(again.payload).toEqual(payload);
    expect((await w.heartbeat(1)).sequence).toBe(1n);
  });

  it("applies a progress report before the release a heartbeat implies by leaving its revoked lease out", async () => {
    const { progressStarted, release, hold } = await serverHoldingProgress();
    hold.armed = false;
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const { epoch } = await w.next("grant");
    await api().cancelAction({ actionId: id, reason: "user asked" });
    await w.next("revoke");
    await w.heartbeat(1, [{ actionId: id, epoch }]); // the worker shows it has the lease
    hold.armed = true;
    // A checkpoint, then a heartbeat without the lease: a release, after the checkpoint.
    w.send({
      message: {
        case: "batch",
        value: {
          messages: [
            {
              message: {
                case: "progress",
                value: { reportId: 11n, actionId: id, epoch, phase: "p", checkpoint: { n: 1 } },
              },
            },
            { message: { case: "heartbeat", value: { sequence: 2n, heldLeases: [] } } },
          ],
        },
      },
    });
    await w.next("heartbeatAck", (a) => a.sequence === 2n);
    await progressStarted;
    await tick().settled(); // out of order, the release has committed by now
    release();
    expect(await w.next("reportResult", (r) => r.reportId === 11n)).toMatchObject({ accepted: true });
  });

  it("closes only once every report it received was applied, those waiting for their action's turn too", async () => {
    const log: string[] = [];
    const { progressStarted, release, hold } = await serverHoldingProgress(log);
    hold.armed = false;
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const { epoch } = await w.next("grant");
    hold.armed = true;
    w.send({ message: { case: "progress", value: { reportId: 1n, actionId: id, epoch, phase: "p" } } });
    w.send({
      message: {
        case: "completion",
        value: { reportId: 2n, actionId: id, epoch, outcome: { case: "succeeded", value: {} } },
      },
    });
    await w.heartbeat(1, [{ actionId: id, epoch }]); // both reports were read
    await progressStarted;
    const closing = t.server.leases.close().then(() => log.push("closed"));
    release();
    await closing;
    expect(log).toEqual(["progress", "finish", "closed"]);
  });

  /**
   * A server whose next grant statement fails in one of two ways: its commit lands but the
   * answer is lost (the connection breaks around COMMIT), or it fails before COMMIT and rolls back.
   */
  async function serverLosingAGrant(
    when: "after commit" | "before commit",
    options: {
      gracePeriod?: string;
      heartbeatInterval?: string;
      dispatchHangMs?: number;
      lookFails?: () => boolean;
      /** The look gets no answer, ever (a statement the driver dropped), while this says so. */
      lookHangs?: () => boolean;
    } = {},
  ) {
    let armed = true;
    let fired!: () => void;
    const faulted = new Promise<void>((r) => {
      fired = r;
    });
    const injected = () => {
      armed = false;
      fired();
      return new Error(`connection lost ${when} (injected)`);
    };
    // Grants are single statements: "before commit" runs the grant in a transaction that
    // rolls back; "after commit" lets it commit and loses the answer. While `lookFails`
    // says so, the look for in-doubt grants fails as if the database were gone.
    await serverWithStatements(async (query, text, db) => {
      if (options.lookFails?.() && text.includes("where state = 'LEASED'"))
        throw new Error("connection lost (injected)");
      if (options.lookHangs?.() && text.includes("where state = 'LEASED'")) return new Promise(() => {});
      if (!armed || !text.includes("insert into attempts")) return db.execute(query);
      if (when === "after commit") {
        const result = await db.execute(query);
        if (armed) throw injected();
        return result;
      }
      return db.transaction(async (tx) => {
        const result = await tx.execute(query);
        if (armed) throw injected();
        return result;
      });
    }, options);
    return { faulted };
  }

  it("sends a grant whose commit landed but whose answer was lost, with the same epoch, once", async () => {
    const { faulted } = await serverLosingAGrant("after commit");
    const id = await submit();
    const w = await worker("w1"); // its hello wakes the dispatch that fails
    await faulted;
    // Leased to a worker that was told nothing: only the in-doubt check can tell it.
    expect((await getAction(id)).action).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
    await tick().dispatch();
    const grant = await w.next("grant");
    expect(grant).toMatchObject({ actionId: id, epoch: 1n, attempt: 1 });
    expect(t.logs.map((l) => l.msg)).toContain("sending a grant again whose commit was in doubt");
    expect(await w.complete(grant, { output: { ok: true } })).toMatchObject({ accepted: true });
    await tick().dispatch();
    expect(w.received.filter((m) => m.message.case === "grant")).toHaveLength(1);
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n });
    expect(got.attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.SUCCEEDED]);
  });

  it("sends such a grant even when the database stayed gone past the window a late commit has", async () => {
    // The window is twice the grace period; every look within it fails, and so does one after it.
    let looksFail = true;
    const { faulted } = await serverLosingAGrant("after commit", {
      gracePeriod: "2s",
      heartbeatInterval: "500ms",
      lookFails: () => looksFail,
    });
    const id = await submit();
    const w = await worker("w1");
    await faulted;
    await tick().dispatch();
    const windowEnds = Date.now() + 2 * 2000;
    while (Date.now() <= windowEnds) await new Promise((r) => setTimeout(r, windowEnds - Date.now() + 1));
    await tick().dispatch();
    // Back: the first look that succeeds finds the grant, past its window or not.
    looksFail = false;
    await tick().dispatch();
    const grant = await w.next("grant");
    expect(grant).toMatchObject({ actionId: id, epoch: 1n, attempt: 1 });
    expect(t.logs.map((l) => l.msg)).toContain("sending a grant again whose commit was in doubt");
    await tick().dispatch();
    expect(w.received.filter((m) => m.message.case === "grant")).toHaveLength(1);
  });

  it("gives up a look for such a grant that never gets an answer, and sends the grant once a later look finds it", async () => {
    // After a run of connection resets the driver lost a statement: the look waited forever, and
    // every round of the process with it (no grant, no answer to a completion), with no log line.
    let lookHangs = true;
    const { faulted } = await serverLosingAGrant("after commit", {
      dispatchHangMs: 300,
      lookHangs: () => lookHangs,
    });
    const id = await submit();
    const w = await worker("w1");
    await faulted;
    // Unpatched: never resolves (the test's own timeout fails it).
    await tick().dispatch();
    expect(t.logs.map((l) => l.msg)).toContain(
      "the look for grants whose commit was in doubt got no answer; given up, it is tried again on the next wake-up",
    );
    lookHangs = false;
    await tick().dispatch();
    const grant = await w.next("grant");
    expect(grant).toMatchObject({ actionId: id, epoch: 1n, attempt: 1 });
    expect(await w.complete(grant, { output: {} })).toMatchObject({ accepted: true });
    await tick().dispatch();
    expect(w.received.filter((m) => m.message.case === "grant")).toHaveLength(1);
  });

  it("logs an error while a round's statement goes unanswered, and shows how long it has waited", async () => {
    const held = deferred();
    const mayRun = deferred();
    let armed = false;
    await serverWithStatements(
      async (query, text, db) => {
        if (armed && text.includes("f_input")) {
          held.resolve();
          await mayRun.promise;
        }
        return db.execute(query);
      },
      { dispatchHangMs: 300 },
    );
    await submit();
    const w = await worker("w1");
    await tick().dispatch();
    const grant = await w.next("grant");
    armed = true;
    const answer = w.complete(grant, { output: {} });
    await held.promise;
    await waitFor(async () => t.server.leases.stats().dispatchWaitingMs > 300);
    // The dispatch poll's tick: it looks first, then waits for the round like any other.
    const ticked = tick().dispatch();
    await waitForLog(t.logs, (l) => String(l.msg).startsWith("the lease dispatcher has waited too long"));
    mayRun.resolve();
    expect(await answer).toMatchObject({ accepted: true });
    await ticked;
    await tick().dispatch();
    expect(t.logs.map((l) => l.msg)).toContain("the lease dispatcher's hung statement ended");
    expect(t.server.leases.stats().dispatchWaitingMs).toBe(0);
  });

  it("grants again normally when a grant transaction failed before its commit, sending it once", async () => {
    const { faulted } = await serverLosingAGrant("before commit");
    const id = await submit();
    const w = await worker("w1"); // its hello wakes the dispatch that fails
    await faulted;
    await tick().dispatch();
    const grant = await w.next("grant");
    expect(grant).toMatchObject({ actionId: id, epoch: 1n, attempt: 1 });
    await tick().dispatch();
    expect(w.received.filter((m) => m.message.case === "grant")).toHaveLength(1);
    expect(await w.complete(grant, { output: {} })).toMatchObject({ accepted: true });
    expect((await getAction(id)).attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.SUCCEEDED]);
  });

  it("records a lost stream at once and keeps the deadline (rule 1)", async () => {
    const w = await worker("w1");
    const before = (await t.client(ClusterService).getWorker({ workerId: "w1" })).worker?.session?.deadline;
    w.drop();
    await waitFor(
      async () =>
        (await t.client(ClusterService).getWorker({ workerId: "w1" })).worker?.state === WorkerState.IN_GRACE,
    );
    const after = (await t.client(ClusterService).getWorker({ workerId: "w1" })).worker;
    expect(after?.session?.streamLostTime).toBeDefined();
    expect(Number(after?.session?.deadline?.seconds)).toBeGreaterThanOrEqual(Number(before?.seconds));
    const lost = await t.client(EventService).listEvents({ workerId: "w1", kind: EventKind.STREAM_LOST });
    expect(lost.events).toHaveLength(1);
  });

  it("resumes a worker that reconnects within grace with the same epoch, and the work finishes once (rule 2)", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    w.drop();
    await w.ended;
    await waitForEvent(t, id, "w1", EventKind.STREAM_LOST);
    clock.advance(GRACE_MS / 2);
    await tick().reap();
    const back = await worker("w1", { held: [{ actionId: id, epoch: grant.epoch }] });
    expect(back.welcome).toMatchObject({
      sessionResumed: true,
      sessionId: w.welcome.sessionId,
      resumed: [{ actionId: id, epoch: 1n }],
      revoked: [],
    });
    await tick().dispatch();
    expect(back.received.filter((m) => m.message.case === "grant")).toHaveLength(0);
    expect(await back.complete(grant, { output: { ok: true } })).toMatchObject({ accepted: true });
    const got = await getAction(id);
    expect(got.action?.state).toBe(ActionState.SUCCEEDED);
    expect(got.attempts).toHaveLength(1);
    expect((await events(id)).map((e) => e.kind)).not.toContain(EventKind.LEASE_EXPIRED);
  });

  it("expires at once the leases of a worker process that restarted, charged to system retries, until the action fails", async () => {
    // An action whose handler kills its process every time: each new process of w1 comes back
    // within grace. Its predecessor's lease is not sent again with the same epoch: it expires.
    const id = await submit({ maxSystemRetries: 1 });
    const process = async (instanceId: string) => {
      const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1, instanceId });
      workers.push(w);
      return w;
    };
    const first = await process("first");
    await tick().dispatch();
    expect(await first.next("grant")).toMatchObject({ actionId: id, epoch: 1n });
    first.drop();
    await waitForEvent(t, id, "w1", EventKind.STREAM_LOST);
    const second = await process("second");
    expect(second.welcome).toMatchObject({ sessionResumed: false, resumed: [], revoked: [] });
    await tick().dispatch();
    expect(await second.next("grant")).toMatchObject({ actionId: id, epoch: 2n });
    let got = await getAction(id);
    expect(got.action).toMatchObject({ systemRetryCount: 1 });
    expect(got.attempts.map((a) => a.outcome)[0]).toBe(AttemptOutcome.LEASE_EXPIRED);
    second.drop();
    await waitForEvent(t, id, "w1", EventKind.STREAM_LOST, 2);
    await process("third");
    got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.FAILED, systemRetryCount: 2 });
    // The same process coming back resumes, as before: see the test above.
  });

  it("sends the newer grant again to a worker that comes back listing an older epoch of the action", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const first = await w.next("grant");
    expect(await w.release(first)).toMatchObject({ accepted: true });
    await tick().dispatch();
    const second = await w.next("grant", (g) => g.epoch === 2n);
    // The worker lost both on a broken stream: the answer to its release and the new grant.
    w.drop();
    await w.ended;
    const back = await worker("w1", { held: [{ actionId: id, epoch: first.epoch }] });
    expect(back.welcome).toMatchObject({ resumed: [], revoked: [{ actionId: id, epoch: 1n }] });
    expect(await back.next("grant")).toMatchObject({ actionId: id, epoch: second.epoch });
  });

  it("expires the lease at the deadline with the documented line and re-grants it with epoch + 1 (rule 3)", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    const b = await worker("wb");
    a.drop();
    await waitForEvent(t, id, "wa", EventKind.STREAM_LOST);
    clock.advance(GRACE_MS - 500);
    await keepAlive(b);
    await tick().reap();
    expect((await getAction(id)).action?.state).toBe(ActionState.LEASED);
    clock.advance(1000);
    await keepAlive(b);
    await tick().reap();
    const line = `lease expired for action ${id} (worker wa, cluster east, epoch 1)`;
    const expired = (await events(id)).filter((e) => e.kind === EventKind.LEASE_EXPIRED);
    expect(expired.map((e) => e.message)).toEqual([line]);
    expect(t.logs.map((l) => l.msg)).toContain(line);
    // The reap wakes the dispatcher, which hands the action to the healthy worker.
    await tick().dispatch();
    const regrant = await b.next("grant");
    expect(regrant).toMatchObject({ actionId: id, epoch: grant.epoch + 1n, attempt: 2 });
    const got = await getAction(id);
    expect(got.attempts.map((a) => [a.workerId, a.epoch, a.outcome])).toEqual([
      ["wa", 1n, AttemptOutcome.LEASE_EXPIRED],
      ["wb", 2n, AttemptOutcome.RUNNING],
    ]);
    expect(got.action).toMatchObject({
      state: ActionState.LEASED,
      systemRetryCount: 1,
      lease: { workerId: "wb", epoch: 2n },
    });
  });

  it("accepts a completion the same worker sends again from a new session after its old one was reaped", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    // Applied; say its answer was lost with the stream, which stays broken past the deadline.
    expect(await a.complete(grant, { output: { n: 1 } })).toMatchObject({ accepted: true });
    a.drop();
    await waitForEvent(t, id, "wa", EventKind.STREAM_LOST);
    clock.advance(GRACE_MS + 1);
    await tick().reap();
    const back = await worker("wa", { held: [{ actionId: id, epoch: grant.epoch }] });
    expect(back.welcome).toMatchObject({ sessionResumed: false, revoked: [{ actionId: id, epoch: 1n }] });
    expect(await back.complete(grant, { output: { n: 1 } })).toMatchObject({ accepted: true });
    // The answer says what happened and what to do.
    expect(await back.complete(grant, { output: { n: 2 } })).toMatchObject({
      accepted: false,
      rejectReason: RejectReason.FENCED,
      message: expect.stringMatching(
        /^completion for action \S+ epoch 1 refused: .*a different report of it landed first.*; stop its work and report nothing more of it$/,
      ),
    });
    // Another worker sending the same report is no repeat of its own.
    const other = await worker("wo", { held: [{ actionId: id, epoch: grant.epoch }] });
    expect(await other.complete(grant, { output: { n: 1 } })).toMatchObject({
      accepted: false,
      rejectReason: RejectReason.FENCED,
    });
    expect((await getAction(id)).action).toMatchObject({ state: ActionState.SUCCEEDED, output: { n: 1 } });
  });

  it("rejects the stale owner's late completion and keeps the new owner's result (rule 4)", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const stale = await a.next("grant");
    const b = await worker("wb");
    a.drop();
    await waitForEvent(t, id, "wa", EventKind.STREAM_LOST);
    clock.advance(GRACE_MS + 1);
    await keepAlive(b);
    await tick().reap();
    await tick().dispatch();
    const current = await b.next("grant");
    // The stale worker comes back too late: its lease is revoked in the welcome.
    const late = await worker("wa", { held: [{ actionId: id, epoch: stale.epoch }] });
    expect(late.welcome).toMatchObject({ sessionResumed: false, revoked: [{ actionId: id, epoch: 1n }] });
    const rejected = await late.complete(stale, { output: { from: "stale" } });
    expect(rejected).toMatchObject({ accepted: false, rejectReason: RejectReason.FENCED });
    expect(await late.next("revoke")).toMatchObject({
      actionId: id,
      epoch: 1n,
      reason: RevokeReason.SUPERSEDED,
    });
    expect((await getAction(id)).action).toMatchObject({ state: ActionState.LEASED, epoch: 2n });
    expect(await b.complete(current, { output: { from: "new owner" } })).toMatchObject({ accepted: true });
    expect((await getAction(id)).action).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { from: "new owner" },
    });
    expect((await events(id)).map((e) => e.kind)).toContain(EventKind.REPORT_FENCED);
    // It did hold that lease once: the event says so.
    expect((await events(id)).find((e) => e.kind === EventKind.LEASE_REVOKED)?.message).toBe(
      "worker wa listed a lease it no longer holds (epoch 1); revoked",
    );
  });

  it("fails the action with a reason once expiries exhaust its system-retry budget", async () => {
    const id = await submit({ maxSystemRetries: 1 });
    for (const name of ["w1", "w2"]) {
      const w = await worker(name);
      await tick().dispatch();
      await w.next("grant");
      w.drop();
      await waitForEvent(t, id, name, EventKind.STREAM_LOST);
      clock.advance(GRACE_MS + 1);
      await tick().reap();
    }
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.FAILED, systemRetryCount: 2 });
    expect(got.action?.failureReason).toMatch(
      /^lease expired 2 times .*the system-retry budget of 1 is exhausted$/,
    );
  });

  it("retries a retryable failure after its backoff, and fails when attempts run out", async () => {
    const w = await worker("w1");
    const id = await submit({ retryPolicy: { maxAttempts: 2, initialBackoff: { seconds: 30n } } });
    await tick().dispatch();
    const first = await w.next("grant");
    expect(await w.complete(first, { error: "flaky", retryable: true })).toMatchObject({ accepted: true });
    expect((await getAction(id)).action).toMatchObject({ state: ActionState.QUEUED, failureCount: 1 });
    await tick().dispatch();
    expect(w.received.filter((m) => m.message.case === "grant")).toHaveLength(1);
    clock.advance(31_000);
    await tick().dispatch();
    const second = await w.next("grant");
    expect(second.epoch).toBe(2n);
    await w.complete(second, { error: "still flaky", retryable: true });
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.FAILED, failureCount: 2 });
    expect(got.action?.failureReason).toBe("failed after 2 attempts (max_attempts 2): still flaky");
    expect(got.attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.FAILED, AttemptOutcome.FAILED]);
  });

  it("says one attempt in the singular when a retryable failure has no attempt left", async () => {
    const w = await worker("w1");
    const id = await submit({ retryPolicy: { maxAttempts: 1 } });
    await tick().dispatch();
    await w.complete(await w.next("grant"), { error: "flaky", retryable: true });
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.FAILED, failureCount: 1 });
    expect(got.action?.failureReason).toBe("failed after 1 attempt (max_attempts 1): flaky");
  });

  it("fails a non-retryable failure at once", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    await w.complete(await w.next("grant"), { error: "bad input", retryable: false });
    expect((await getAction(id)).action).toMatchObject({
      state: ActionState.FAILED,
      failureReason: "failed (not retryable): bad input",
    });
  });

  it("causes no expiry when the server restarts with live sessions (rule 6)", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    await t.stop();
    await w.ended;
    clock.advance(GRACE_MS - 1000);
    t = await t.restart();
    clock.advance(GRACE_MS - 1000);
    await tick().reap();
    expect((await getAction(id)).action?.state).toBe(ActionState.LEASED);
    const back = await worker("w1", { held: [{ actionId: id, epoch: grant.epoch }] });
    expect(back.welcome).toMatchObject({ sessionResumed: true, resumed: [{ actionId: id, epoch: 1n }] });
    expect((await events(id)).map((e) => e.kind)).not.toContain(EventKind.LEASE_EXPIRED);
  });

  it("gives no restart extension to a session silent longer than the maximum silence", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    await w.next("grant");
    await t.stop();
    clock.advance(10 * GRACE_MS + 1000);
    t = await t.restart();
    await tick().reap();
    expect((await getAction(id)).action?.state).toBe(ActionState.QUEUED);
  });

  it("lets a second stream take the session over and closes the older one (rule 8)", async () => {
    const first = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await first.next("grant");
    const second = await worker("w1", { held: [{ actionId: id, epoch: grant.epoch }] });
    expect(second.welcome).toMatchObject({
      sessionResumed: true,
      sessionId: first.welcome.sessionId,
      resumed: [{ actionId: id }],
    });
    expect(await first.ended).toMatchObject({
      code: Code.Aborted,
      details: expect.stringMatching(
        /^a newer stream of this worker id took the session over; if this process did not open it, another process uses the same worker id: stop all work at once and connect again no sooner than one grace period later$/,
      ),
    });
    expect(await second.complete(grant, { output: {} })).toMatchObject({ accepted: true });
    const kinds = (await t.client(EventService).listEvents({ workerId: "w1" })).events.map((e) => e.kind);
    expect(kinds).toContain(EventKind.SESSION_TAKEN_OVER);
  });

  it("revokes a cancelled leased action from its owner, and cancels it when the owner lets go (rule 9)", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    const { action } = await api().cancelAction({ actionId: id, reason: "user asked" });
    expect(action).toMatchObject({ state: ActionState.LEASED, cancelRequested: true });
    expect(await w.next("revoke")).toMatchObject({ actionId: id, epoch: 1n, reason: RevokeReason.CANCELLED });
    expect(await w.release(grant, "revoked")).toMatchObject({ accepted: true });
    const got = await getAction(id);
    expect(got.action).toMatchObject({
      state: ActionState.CANCELLED,
      failureReason: "action cancelled: user asked",
    });
    expect(got.attempts[0]?.outcome).toBe(AttemptOutcome.CANCELLED);
  });

  it("cancels an action whose owner acknowledged the grant, then leaves it out of a heartbeat after the revoke (rule 9)", async () => {
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    // The grant ack shows the worker has the lease; no heartbeat listed it before the revoke.
    w.send({ message: { case: "grantAck", value: { reportId: 1000n, actionId: id, epoch: grant.epoch } } });
    expect(await w.next("reportResult", (r) => r.reportId === 1000n)).toMatchObject({ accepted: true });
    await api().cancelAction({ actionId: id, reason: "user asked" });
    expect(await w.next("revoke")).toMatchObject({ actionId: id, reason: RevokeReason.CANCELLED });
    await w.heartbeat(1, []);
    await tick().settled();
    expect((await getAction(id)).action?.state).toBe(ActionState.CANCELLED);
  });

  it("cancels an action whose grant was revoked before the worker acknowledged it, once a heartbeat leaves it out (rule 9)", async () => {
    // A worker that read the grant and the revoke together, and dropped both without a word.
    await withGrantAckLimit(300);
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    await api().cancelAction({ actionId: id, reason: "user asked" });
    expect(await w.next("revoke")).toMatchObject({ actionId: id, reason: RevokeReason.CANCELLED });
    // Heartbeats without it for three times the limit on unacknowledged grants (the scenario's
    // length, not an assertion on time): the first one releases it, and the stream stays.
    await heartbeatUntil(w, new Promise((r) => setTimeout(r, 900)));
    await tick().settled();
    expect(await Promise.race([w.heartbeat(100), w.ended.then((e) => `ended: ${e.details}`)])).toMatchObject({
      sequence: 100n,
    });
    const got = await getAction(id);
    expect(got.action?.state).toBe(ActionState.CANCELLED);
    expect(got.attempts[0]?.outcome).toBe(AttemptOutcome.CANCELLED);
    // A report that crossed it (a worker that had not read the grant yet) is its repeat.
    for (const report of [() => w.release(grant, "revoked"), () => w.complete(grant, { output: {} })]) {
      expect(await report()).toMatchObject({ accepted: true, message: "action is now CANCELLED" });
    }
  });

  it("keeps a stream whose cancelled grant, never acknowledged, waits past the limit for its release to commit", async () => {
    // The release a heartbeat implies fails (the database refuses it) and is tried again on every
    // heartbeat: the grant is no sign of a stream that does not read.
    let failing = true;
    await t[Symbol.asyncDispose]();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: {
        clock,
        timers: false,
        limits: { grantAckLimitMs: 300 },
        wrapDb: intercepting(async (text, execute) => {
          if (failing && text.includes("f_updated")) throw new Error("refused for the test");
          return execute();
        }),
      },
    });
    const w = await worker("w1");
    const id = await submit();
    await tick().dispatch();
    await w.next("grant");
    await api().cancelAction({ actionId: id, reason: "user asked" });
    await w.next("revoke");
    await heartbeatUntil(w, new Promise((r) => setTimeout(r, 900)));
    expect(
      t.logs.filter((l) => l.msg === "could not release a lease the worker let go of; will retry").length,
    ).toBeGreaterThan(1);
    failing = false;
    expect(await Promise.race([w.heartbeat(100), w.ended.then((e) => `ended: ${e.details}`)])).toMatchObject({
      sequence: 100n,
    });
    await tick().settled();
    expect((await getAction(id)).action?.state).toBe(ActionState.CANCELLED);
  });

  it("accepts a report sent again as its repeat, on a cancelled action whatever it said, and fences a different one", async () => {
    const w = await worker("w1", { capacity: 2 });
    const done = await submit();
    const cancelled = await submit();
    await tick().dispatch();
    const first = await w.next("grant", (g) => g.actionId === done);
    const second = await w.next("grant", (g) => g.actionId === cancelled);
    expect(await w.complete(first, { output: { n: 1 } })).toMatchObject({ accepted: true });
    expect(await w.complete(first, { output: { n: 1 } })).toMatchObject({
      accepted: true,
      message: "action is now SUCCEEDED",
    });
    expect(await w.complete(first, { output: { n: 2 } })).toMatchObject({
      accepted: false,
      rejectReason: RejectReason.FENCED,
    });
    await api().cancelAction({ actionId: cancelled, reason: "not needed" });
    await w.next("revoke", (r) => r.actionId === cancelled);
    // The completion crossed the revoke: it lands, and the action is cancelled all the same.
    expect(await w.complete(second, { output: { n: 3 } })).toMatchObject({
      accepted: true,
      message: "action is now CANCELLED",
    });
    // Sent again after a reconnect, it must tell the worker it landed, not that it was fenced.
    for (const again of [{ output: { n: 3 } }, { error: "stopped", retryable: true }]) {
      expect(await w.complete(second, again)).toMatchObject({
        accepted: true,
        message: "action is now CANCELLED",
      });
    }
    expect(await w.release(second, "revoked")).toMatchObject({
      accepted: true,
      message: "action is now CANCELLED",
    });
    // Another session's copy is fenced: the repeat is the same attempt's.
    const other = await worker("w2");
    expect(await other.complete(second, { output: { n: 3 } })).toMatchObject({
      accepted: false,
      rejectReason: RejectReason.FENCED,
    });
  });

  it("stops new grants to a drained worker and asks it to finish", async () => {
    const w = await worker("w1", { capacity: 2 });
    const first = await submit();
    await tick().dispatch();
    const grant = await w.next("grant");
    const drained = await t.client(ClusterService).drainWorker({ workerId: "w1", reason: "maintenance" });
    expect(drained.worker).toMatchObject({ draining: true, heldLeases: [{ actionId: first, epoch: 1n }] });
    expect(await w.next("drain")).toMatchObject({ reason: "maintenance" });
    const second = await submit();
    await tick().dispatch();
    expect((await getAction(second)).action?.state).toBe(ActionState.QUEUED);
    // Back on a new stream within grace: the drain, and the operator's reason, still hold.
    w.drop();
    await w.ended;
    const back = await worker("w1", { capacity: 2, held: [{ actionId: first, epoch: 1n }] });
    expect(await back.next("drain")).toMatchObject({ reason: "maintenance" });
    await tick().dispatch();
    expect((await getAction(second)).action?.state).toBe(ActionState.QUEUED);
    expect(await back.complete(grant, { output: {} })).toMatchObject({ accepted: true });
    await expectStatus(
      t.client(ClusterService).drainWorker({ workerId: "nobody" }),
      Code.NotFound,
      /worker "nobody" not found/,
    );
    // After its goodbye there is no session to drain: the call says so instead of a drain that
    // would end before it began (the next session is granted work).
    back.goodbye("done");
    await back.ended;
    const refused = await failure(t.client(ClusterService).drainWorker({ workerId: "w1" }));
    expect(refused).toMatchObject({ code: Code.FailedPrecondition, reason: "WORKER_NOT_CONNECTED" });
    expect(refused.message).toMatch(/worker w1 has no live session: nothing to drain/);
    const again = await worker("w1", { capacity: 2 });
    await tick().dispatch();
    expect(await again.next("grant")).toMatchObject({ actionId: second });
  });

  it("grants work again at once to an undrained worker, on the same stream, and on the streams that resume it", async () => {
    const w = await worker("w1");
    const clusters = t.client(ClusterService);
    await clusters.drainWorker({ workerId: "w1", reason: "maintenance" });
    await w.next("drain");
    const first = await submit();
    await tick().dispatch();
    expect((await getAction(first)).action?.state).toBe(ActionState.QUEUED);
    const undrained = await clusters.undrainWorker({ workerId: "w1", reason: "patched" });
    expect(undrained).toMatchObject({ drainEnded: true, worker: { workerId: "w1", draining: false } });
    // No dispatch tick: the undrain itself wakes the dispatcher for the stream.
    const grant = await w.next("grant");
    expect(grant).toMatchObject({ actionId: first, epoch: 1n });
    const [event] = (await t.client(EventService).listEvents({ kind: EventKind.WORKER_UNDRAINED })).events;
    expect(event).toMatchObject({
      workerId: "w1",
      cluster: "east",
      actor: "anonymous",
      message: "worker w1 is no longer draining: patched",
    });
    // Undraining a worker that is not draining changes nothing and records nothing.
    expect(await clusters.undrainWorker({ workerId: "w1" })).toMatchObject({
      drainEnded: false,
      worker: { draining: false },
    });
    expect(
      (await t.client(EventService).listEvents({ kind: EventKind.WORKER_UNDRAINED })).events,
    ).toHaveLength(1);
    expect(await w.complete(grant, { output: {} })).toMatchObject({ accepted: true });

    // Undrained while in grace: the stream that resumes the session gets no Drain, and work.
    await clusters.drainWorker({ workerId: "w1", reason: "again" });
    await w.next("drain", (d) => d.reason === "again");
    w.drop();
    await w.ended;
    await clusters.undrainWorker({ workerId: "w1" });
    const back = await worker("w1");
    expect(back.welcome.sessionResumed).toBe(true);
    const second = await submit();
    expect(await back.next("grant")).toMatchObject({ actionId: second });
    expect(back.received.filter((m) => m.message.case === "drain")).toEqual([]);
  });

  it("leaves a worker that stopped grants itself stopped when its drain ends", async () => {
    const w = await worker("w1");
    w.send({ message: { case: "stopGrants", value: { reason: "closing" } } });
    // Messages of a stream are handled in order: once this heartbeat is answered, so was StopGrants.
    await w.heartbeat(1);
    await t.client(ClusterService).drainWorker({ workerId: "w1" });
    await w.next("drain");
    expect(await t.client(ClusterService).undrainWorker({ workerId: "w1" })).toMatchObject({
      drainEnded: true,
    });
    const id = await submit();
    await tick().dispatch();
    expect((await getAction(id)).action?.state).toBe(ActionState.QUEUED);
    expect(w.received.filter((m) => m.message.case === "grant")).toEqual([]);
  });

  it("refuses to undrain a worker without a live session, as a drain, and shows it not draining", async () => {
    await expectStatus(
      t.client(ClusterService).undrainWorker({ workerId: "nobody" }),
      Code.NotFound,
      /worker "nobody" not found/,
    );
    const w = await worker("w1");
    await t.client(ClusterService).drainWorker({ workerId: "w1" });
    await w.next("drain");
    w.goodbye("done");
    await w.ended;
    // The drain ended with its session: the worker no longer shows it.
    const { worker: gone } = await t.client(ClusterService).getWorker({ workerId: "w1" });
    expect(gone).toMatchObject({ state: WorkerState.OFFLINE, draining: false });
    const refused = await failure(t.client(ClusterService).undrainWorker({ workerId: "w1" }));
    expect(refused).toMatchObject({ code: Code.FailedPrecondition, reason: "WORKER_NOT_CONNECTED" });
    expect(refused.message).toMatch(/worker w1 has no live session: nothing to undrain/);
  });

  it("releases every lease at once on goodbye, and another worker takes them with epoch + 1", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    await a.next("grant");
    a.goodbye("deploying a new version");
    expect((await a.ended).code).toBe(0);
    const got = await getAction(id);
    expect(got.action?.state).toBe(ActionState.QUEUED);
    expect(got.attempts[0]?.outcome).toBe(AttemptOutcome.RELEASED);
    expect(got.action?.systemRetryCount).toBe(0);
    const b = await worker("wb");
    await tick().dispatch();
    expect(await b.next("grant")).toMatchObject({ actionId: id, epoch: 2n });
    expect((await t.client(ClusterService).getWorker({ workerId: "wa" })).worker?.state).toBe(
      WorkerState.OFFLINE,
    );
  });

  it("counts and marks a release the worker made on its self-fence apart from the others", async () => {
    const a = await worker("wa", { capacity: 2 });
    const fenced = await submit();
    const chosen = await submit();
    await tick().dispatch();
    const grants = [await a.next("grant"), await a.next("grant")];
    const grantOf = (id: string) => {
      const g = grants.find((x) => x.actionId === id);
      return { actionId: id, epoch: g?.epoch ?? 0n };
    };
    a.send({
      message: {
        case: "release",
        value: { reportId: 901n, ...grantOf(fenced), reason: "no heartbeat ack in time", selfFenced: true },
      },
    });
    expect(await a.next("reportResult", (r) => r.reportId === 901n)).toMatchObject({ accepted: true });
    expect(await a.release(grantOf(chosen), "by choice")).toMatchObject({ accepted: true });
    const released = async (id: string) =>
      (await events(id)).filter((e) => e.kind === EventKind.LEASE_RELEASED).map((e) => e.details);
    expect(await released(fenced)).toEqual([{ self_fenced: true }]);
    expect(await released(chosen)).toEqual([undefined]);
    const metrics = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/^leasehold_self_fenced_releases_total 1$/m);
    expect(metrics).toMatch(/^leasehold_reports_total\{kind="released",result="accepted"\} 2$/m);
  });

  it("applies a goodbye whose session end failed, though the worker stopped waiting for its answer", async () => {
    // The database connection is lost under the goodbye's statement, and the worker gives up on
    // the stream meanwhile (a process exiting): the goodbye is tried again, not dropped, and its
    // lease is released at once instead of expiring a grace period later, charged a system retry.
    let reached!: () => void;
    const statementReached = new Promise<void>((r) => {
      reached = r;
    });
    let letItFail!: () => void;
    const workerGone = new Promise<void>((r) => {
      letItFail = r;
    });
    let failOnce = true;
    await t[Symbol.asyncDispose]();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: {
        clock,
        timers: false,
        wrapDb: intercepting(async (text, execute) => {
          if (failOnce && text.includes("end_reason = 'goodbye'")) {
            failOnce = false;
            reached();
            await workerGone;
            // As postgres.js fails a statement whose connection closed under it.
            throw Object.assign(new Error("write CONNECTION_CLOSED 127.0.0.1:5432"), {
              code: "CONNECTION_CLOSED",
            });
          }
          return execute();
        }),
      },
    });
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    await a.next("grant");
    a.goodbye("shutting down");
    await statementReached;
    a.drop();
    letItFail();
    await waitForLog(t.logs, (l) => l.msg === "worker said goodbye" && l.workerId === "wa");
    expect(t.logs.filter((l) => l.msg === "could not end the session on goodbye; trying again")).toHaveLength(
      1,
    );
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.QUEUED, systemRetryCount: 0 });
    expect(got.attempts.map((x) => x.outcome)).toEqual([AttemptOutcome.RELEASED]);
  });

  it("records a lost stream whose first record failed, so the worker back resumes at once", async () => {
    // The database connection is lost under the statement that records the stream's loss (a
    // worker dying during an outage): it is tried again, not dropped. Dropped, the session stayed
    // connected until its deadline, and the restarted worker was refused as WORKER_ID_IN_USE.
    // Three failures: one warning, the tries after it at debug, one line when it is recorded.
    let failures = 3;
    await t[Symbol.asyncDispose]();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: {
        clock,
        timers: false,
        wrapDb: intercepting(async (text, execute) => {
          if (failures > 0 && text.includes("'stream_lost'")) {
            failures--;
            // As postgres.js fails a statement whose connection closed under it.
            throw Object.assign(new Error("write CONNECTION_CLOSED 127.0.0.1:5432"), {
              code: "CONNECTION_CLOSED",
            });
          }
          return execute();
        }),
      },
    });
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    a.drop();
    await waitForEvent(t, id, "wa", EventKind.STREAM_LOST);
    expect(t.logs.filter((l) => l.msg === "could not record a lost stream; trying again")).toEqual([
      expect.objectContaining({ level: 40, workerId: "wa", sessionId: a.welcome.sessionId }),
    ]);
    expect(t.logs.filter((l) => String(l.msg).startsWith("could not record"))).toHaveLength(1);
    expect(
      await waitForLog(t.logs, (l) => l.msg === "could record a lost stream after trying again"),
    ).toMatchObject({ level: 30, failures: 3, workerId: "wa" });
    const back = await worker("wa", { held: [{ actionId: id, epoch: grant.epoch }] });
    expect(back.welcome).toMatchObject({
      sessionResumed: true,
      sessionId: a.welcome.sessionId,
      resumed: [{ actionId: id, epoch: 1n }],
    });
  });

  /** A server whose streams may heartbeat for `limitMs` after a grant without acknowledging it. */
  const withGrantAckLimit = async (limitMs: number) => {
    await t[Symbol.asyncDispose]();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false, limits: { grantAckLimitMs: limitMs } },
    });
  };
  /** Heartbeats every 100 ms, listing `held`, until `done` resolves or the stream ends. */
  const heartbeatUntil = async (
    w: TestWorker,
    done: Promise<unknown>,
    held: { actionId: string; epoch: bigint }[] = [],
  ) => {
    let over = false;
    void Promise.race([done, w.ended]).then(() => {
      over = true;
    });
    for (let n = 1; !over; n++) {
      await Promise.race([w.heartbeat(n, held), w.ended]);
      await Promise.race([new Promise((r) => setTimeout(r, 100)), w.ended]);
    }
  };

  it("ends a stream whose heartbeats keep coming past the limit without acknowledging a grant; the grant comes back on resume", async () => {
    // A receive loop stuck while the heartbeat loop runs: the grant would stay leased, never run,
    // for as long as the heartbeats come.
    await withGrantAckLimit(500);
    const a = await worker("deaf");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    await heartbeatUntil(a, a.ended);
    const ended = await a.ended;
    expect(ended).toMatchObject({ code: Code.Unavailable });
    expect(ended.details).toContain(`the grant of action ${id} is not acknowledged`);
    expect(statusDetails(ended.metadata)).toMatchObject({
      reason: "GRANTS_UNACKNOWLEDGED",
      info: { action_id: id, unacknowledged: "1" },
    });
    await waitForEvent(t, id, "deaf", EventKind.STREAM_LOST);
    // The worker back, listing nothing: same session, and the grant is sent again, same epoch.
    const back = await worker("deaf");
    expect(back.welcome).toMatchObject({ sessionResumed: true, sessionId: a.welcome.sessionId });
    expect(await back.next("grant")).toMatchObject({ actionId: id, epoch: grant.epoch });
  });

  it("keeps a stream whose heartbeats were not read for a while, its acknowledgement behind them", async () => {
    // This server stopped reading the stream (a throttled backlog of reports, a stalled event
    // loop) past the limit, between a heartbeat read after the grant and the next one: the run of
    // heartbeats broke there, and the acknowledgement that comes with the next is in time.
    await withGrantAckLimit(500);
    const realNow = performance.now.bind(performance);
    let skewMs = 0;
    const now = vi.spyOn(performance, "now").mockImplementation(() => realNow() + skewMs);
    try {
      const a = await worker("paused-reader");
      const id = await submit();
      await tick().dispatch();
      const grant = await a.next("grant");
      await a.heartbeat(1);
      // Longer than the limit and than two heartbeat intervals (2 s here) of not reading.
      skewMs += 5000;
      const ack = await Promise.race([a.heartbeat(2), a.ended.then((e) => `ended: ${e.details}`)]);
      expect(ack).toMatchObject({ sequence: 2n });
      a.send({ message: { case: "grantAck", value: { reportId: 7n, actionId: id, epoch: grant.epoch } } });
      expect(await a.next("reportResult", (r) => r.reportId === 7n)).toMatchObject({ accepted: true });
      expect(await a.heartbeat(3)).toMatchObject({ sequence: 3n });
    } finally {
      now.mockRestore();
    }
  });

  it("keeps a stream that acknowledges its grant only by listing it in heartbeats, past the limit", async () => {
    await withGrantAckLimit(300);
    const a = await worker("lister");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    const held = [{ actionId: id, epoch: grant.epoch }];
    // Heartbeats listing the lease for three times the limit (the scenario's length, not an
    // assertion on time), then the completion: accepted, on the same stream.
    await heartbeatUntil(a, new Promise((r) => setTimeout(r, 900)), held);
    expect(await a.complete(grant, { output: { ok: true } })).toMatchObject({ accepted: true });
  });

  it("applies and answers the reports sent before a goodbye, then ends the session", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    // Not waiting for the answers: the goodbye follows the completion on the stream.
    const completed = a.complete(grant, { output: { result: 42 } });
    a.goodbye("done");
    expect(await completed).toMatchObject({ accepted: true });
    expect((await a.ended).code).toBe(0);
    const got = await getAction(id);
    expect(got.action).toMatchObject({ state: ActionState.SUCCEEDED, output: { result: 42 } });
    expect(got.attempts.map((x) => x.outcome)).toEqual([AttemptOutcome.SUCCEEDED]);
  });

  it("reads nothing after a goodbye: what follows it, in its batch or after, is neither applied nor answered", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    const lease = { actionId: id, epoch: grant.epoch };
    a.send({
      message: {
        case: "batch",
        value: {
          messages: [
            { message: { case: "goodbye", value: { reason: "done" } } },
            {
              message: {
                case: "completion",
                value: { reportId: 9n, ...lease, outcome: { case: "succeeded", value: {} } },
              },
            },
            // One the server would answer INVALID (no action id), were it read.
            { message: { case: "release", value: { reportId: 10n, actionId: "", epoch: 1n } } },
          ],
        },
      },
    });
    // Bytes that are no message: read, they would end the stream with INVALID_ARGUMENT.
    a.sendBytes(Buffer.from([0x0a, 0xff, 0xff]));
    expect(await a.ended).toMatchObject({ code: 0 });
    expect(a.received.filter((m) => m.message.case === "reportResult")).toEqual([]);
    const got = await getAction(id);
    expect(got.action?.state).toBe(ActionState.QUEUED);
    expect(got.attempts.map((x) => x.outcome)).toEqual([AttemptOutcome.RELEASED]);
  });

  it("hands the next attempt a checkpoint sent just before a release and a goodbye", async () => {
    const a = await worker("wa");
    const id = await submit();
    await tick().dispatch();
    const grant = await a.next("grant");
    a.send({
      message: {
        case: "progress",
        value: { reportId: 1000n, actionId: id, epoch: grant.epoch, phase: "half", checkpoint: { step: 9 } },
      },
    });
    const released = a.release(grant, "stopping");
    a.goodbye("stopping");
    expect(await released).toMatchObject({ accepted: true });
    expect((await a.ended).code).toBe(0);
    const b = await worker("wb");
    await tick().dispatch();
    expect(await b.next("grant")).toMatchObject({ actionId: id, epoch: 2n, checkpoint: { step: 9 } });
  });

  describe("a worker that sends messages with its hello and half-closes before the welcome", () => {
    /** w1 holds a lease of a new action, and its stream was lost. */
    const holdAndLose = async () => {
      const w = await worker("w1");
      const actionId = await submit();
      await tick().dispatch();
      const grant = await w.next("grant");
      w.drop();
      await waitForEvent(t, actionId, "w1", EventKind.STREAM_LOST);
      return { actionId, epoch: grant.epoch };
    };
    const hello = (held: { actionId: string; epoch: bigint }[]) =>
      framedRequest({
        message: { case: "hello", value: { workerId: "w1", cluster: "east", capacity: 1, heldLeases: held } },
      });
    const cases = (ended: { received: { message: { case: string | undefined } }[] }) =>
      ended.received.map((m) => m.message.case);

    it("has them answered and applied in order, then the stream ends OK", async () => {
      const lease = await holdAndLose();
      const ended = await sendAndHalfClose(t.address, [
        hello([lease]),
        framedRequest({ message: { case: "heartbeat", value: { sequence: 5n, heldLeases: [lease] } } }),
        framedRequest({
          message: {
            case: "completion",
            value: {
              reportId: 7n,
              ...lease,
              outcome: { case: "succeeded", value: { output: { result: 42 } } },
            },
          },
        }),
      ]);
      expect(ended.code).toBe(0);
      expect(cases(ended)).toEqual(["welcome", "heartbeatAck", "reportResult"]);
      expect(ended.received[1]?.message.value).toMatchObject({ sequence: 5n });
      expect(ended.received[2]?.message.value).toMatchObject({ reportId: 7n, accepted: true });
      const got = await getAction(lease.actionId);
      expect(got.action).toMatchObject({ state: ActionState.SUCCEEDED, output: { result: 42 } });
      expect(got.attempts.map((x) => x.outcome)).toEqual([AttemptOutcome.SUCCEEDED]);
    });

    it("has its reports answered before the status, however long they take to apply", async () => {
      const { progressStarted, release } = await serverHoldingProgress();
      const lease = await holdAndLose();
      const other = await worker("w2");
      const ending = sendAndHalfClose(t.address, [
        hello([lease]),
        framedRequest({ message: { case: "progress", value: { reportId: 4n, ...lease, phase: "half" } } }),
      ]);
      await progressStarted;
      // A stream lost after the half-close is recorded after it: had w1's stream ended without
      // waiting for its answer, it would be over by the time w2's loss is logged.
      other.drop();
      await waitForLog(t.logs, (l) => l.msg === "worker stream lost" && l.workerId === "w2");
      release();
      const ended = await ending;
      expect(ended.code).toBe(0);
      expect(cases(ended)).toEqual(["welcome", "reportResult"]);
      expect(ended.received[1]?.message.value).toMatchObject({ reportId: 4n, accepted: true });
    });

    it("has a goodbye applied: its leases are released and the session ends", async () => {
      const lease = await holdAndLose();
      const ended = await sendAndHalfClose(t.address, [
        hello([lease]),
        framedRequest({ message: { case: "goodbye", value: { reason: "done" } } }),
      ]);
      expect(ended.code).toBe(0);
      expect(cases(ended)).toEqual(["welcome"]);
      const got = await getAction(lease.actionId);
      expect(got.action?.state).toBe(ActionState.QUEUED);
      expect(got.attempts.map((x) => x.outcome)).toEqual([AttemptOutcome.RELEASED]);
      expect((await t.client(ClusterService).getWorker({ workerId: "w1" })).worker?.state).toBe(
        WorkerState.OFFLINE,
      );
    });

    it("has a report naming no lease answered INVALID, and a message that is not one refused", async () => {
      const invalid = await sendAndHalfClose(t.address, [
        hello([]),
        framedRequest({
          message: { case: "completion", value: { reportId: 3n, outcome: { case: "succeeded", value: {} } } },
        }),
      ]);
      expect(invalid.code).toBe(0);
      expect(cases(invalid)).toEqual(["welcome", "reportResult"]);
      expect(invalid.received[1]?.message.value).toMatchObject({
        reportId: 3n,
        accepted: false,
        rejectReason: RejectReason.INVALID,
      });
      // Two bytes of a field tag that never ends: protobuf cannot read it.
      const garbage = Buffer.from([0, 0, 0, 0, 2, 0xff, 0xff]);
      const refused = await sendAndHalfClose(t.address, [hello([]), garbage]);
      expect(refused.code).toBe(Code.InvalidArgument);
      expect(refused.details).toMatch(/is not a valid leasehold\.v1\.ConnectRequest/);
      expect(cases(refused)).toEqual(["welcome"]);
    });
  });

  describe("a report whose fields break the limits", () => {
    const held = async () => {
      const w = await worker("w1");
      const actionId = await submit();
      await tick().dispatch();
      const grant = await w.next("grant");
      return { w, lease: { actionId, epoch: grant.epoch } };
    };

    it("is answered INVALID naming the field, and the stream and the lease go on", async () => {
      const { w, lease } = await held();
      w.send({
        message: {
          case: "completion",
          value: {
            reportId: 3n,
            ...lease,
            outcome: {
              case: "failed",
              value: { message: "asked to fail\u0000core dumped", retryable: true },
            },
          },
        },
      });
      const refused = await w.next("reportResult", (r) => r.reportId === 3n);
      expect(refused).toMatchObject({
        accepted: false,
        rejectReason: RejectReason.INVALID,
        epoch: lease.epoch,
      });
      expect(refused.message).toBe("completion.failed.message: must not contain NUL (\\u0000) characters");
      // Refused, not applied; the same stream goes on, and a report that fits is taken.
      await w.heartbeat(1, [lease]);
      expect((await getAction(lease.actionId)).action?.state).toBe(ActionState.LEASED);
      expect(await w.complete(lease, { output: { ok: true } })).toMatchObject({ accepted: true });
      expect((await getAction(lease.actionId)).action?.state).toBe(ActionState.SUCCEEDED);
    });

    it("of invalid UTF-8 is answered INVALID naming the field, alone or in a batch, and the stream goes on", async () => {
      const { w, lease } = await held();
      /** The request in the binary format, the string "ZQXJZQ" in it turned into bytes that are not UTF-8. */
      const withBadString = (request: MessageInitShape<typeof ConnectRequestSchema>) => {
        const bytes = toBinary(ConnectRequestSchema, create(ConnectRequestSchema, request));
        bytes.set([0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1], Buffer.from(bytes).indexOf("ZQXJZQ"));
        return bytes;
      };
      w.sendBytes(
        withBadString({
          message: {
            case: "completion",
            value: { reportId: 6n, ...lease, outcome: { case: "failed", value: { message: "ZQXJZQ" } } },
          },
        }),
      );
      expect(await w.next("reportResult", (r) => r.reportId === 6n)).toMatchObject({
        accepted: false,
        rejectReason: RejectReason.INVALID,
        epoch: lease.epoch,
        message: "completion.failed.message: is not valid UTF-8",
      });
      // In a batch: that report alone is refused, the others are applied.
      w.sendBytes(
        withBadString({
          message: {
            case: "batch",
            value: {
              messages: [
                { message: { case: "progress", value: { reportId: 7n, ...lease, phase: "ZQXJZQ" } } },
                { message: { case: "progress", value: { reportId: 8n, ...lease, phase: "fine" } } },
              ],
            },
          },
        }),
      );
      expect(await w.next("reportResult", (r) => r.reportId === 7n)).toMatchObject({
        accepted: false,
        rejectReason: RejectReason.INVALID,
        message: "batch.messages[0].progress.phase: is not valid UTF-8",
      });
      expect(await w.next("reportResult", (r) => r.reportId === 8n)).toMatchObject({ accepted: true });
      expect((await getAction(lease.actionId)).action).toMatchObject({
        state: ActionState.LEASED,
        phase: "fine",
      });
      expect(await w.complete(lease, { output: { ok: true } })).toMatchObject({ accepted: true });
      // Anything else of invalid UTF-8 still ends the stream, naming it.
      w.sendBytes(
        withBadString({
          message: {
            case: "heartbeat",
            value: { sequence: 1n, heldLeases: [{ actionId: "ZQXJZQ", epoch: 1n }] },
          },
        }),
      );
      expect(await w.ended).toMatchObject({
        code: Code.InvalidArgument,
        details: "heartbeat.held_leases[0].action_id: is not valid UTF-8",
      });
    });

    it("over its size is answered INVALID with the limit", async () => {
      const { w, lease } = await held();
      w.send({
        message: {
          case: "completion",
          value: {
            reportId: 4n,
            ...lease,
            outcome: { case: "succeeded", value: { output: { log: "x".repeat(1_100_000) } } },
          },
        },
      });
      const refused = await w.next("reportResult", (r) => r.reportId === 4n);
      expect(refused).toMatchObject({ accepted: false, rejectReason: RejectReason.INVALID });
      expect(refused.message).toMatch(/^completion\.succeeded\.output: .*1 MiB/);
      await w.heartbeat(1, [lease]);
      expect((await getAction(lease.actionId)).action?.state).toBe(ActionState.LEASED);
    });

    it("does not keep a message that ends the stream from having the reports before it answered", async () => {
      const { w, lease } = await held();
      w.send({
        message: {
          case: "completion",
          value: { reportId: 5n, ...lease, outcome: { case: "succeeded", value: {} } },
        },
      });
      // A heartbeat listing a lease id with a NUL ends the stream; the completion is answered first.
      w.send({
        message: {
          case: "heartbeat",
          value: { sequence: 1n, heldLeases: [{ actionId: "a\u0000b", epoch: 1n }] },
        },
      });
      const ended = await w.ended;
      expect(ended.code).toBe(Code.InvalidArgument);
      expect(
        w.received.filter((m) => m.message.case === "reportResult").map((m) => m.message.value),
      ).toMatchObject([{ reportId: 5n, accepted: true }]);
      expect((await getAction(lease.actionId)).action?.state).toBe(ActionState.SUCCEEDED);
    });
  });

  it("shows an offline worker as last seen when it was last heard from, not at its hello", async () => {
    const seenMs = async (workerId: string) => {
      const { worker: w } = await t.client(ClusterService).getWorker({ workerId });
      expect(w?.state).toBe(WorkerState.OFFLINE);
      return Number(w?.lastSeenTime?.seconds) * 1000 + (w?.lastSeenTime?.nanos ?? 0) / 1e6;
    };
    const bye = await worker("bye");
    const lost = await worker("lost");
    clock.advance(5000);
    await keepAlive(bye, lost);
    const heardMs = clock.current().getTime();
    lost.drop();
    await waitForEvent(t, "", "lost", EventKind.STREAM_LOST);
    clock.advance(3000);
    await keepAlive(bye);
    bye.goodbye("done");
    await bye.ended;
    // The goodbye is the last contact.
    expect(Math.abs((await seenMs("bye")) - clock.current().getTime())).toBeLessThan(1000);
    clock.advance(GRACE_MS);
    await tick().reap();
    // Reaped: its last heartbeat, 5 s after its hello.
    expect(Math.abs((await seenMs("lost")) - heardMs)).toBeLessThan(1000);
  });

  it("grants by priority then age, only to workers whose labels match", async () => {
    const low = await submit({ priority: -1 });
    const gpu = await submit({ labelSelector: { gpu: "yes" } });
    const high = await submit({ priority: 5 });
    const normal = await submit();
    // Connecting wakes the dispatcher, which sees all four at once.
    const plain = await worker("plain", { capacity: 5 });
    await tick().dispatch();
    const grants = [await plain.next("grant"), await plain.next("grant"), await plain.next("grant")];
    expect(grants.map((g) => g.actionId)).toEqual([high, normal, low]);
    expect((await getAction(gpu)).action?.state).toBe(ActionState.QUEUED);
    const withGpu = await worker("gpu-box", { labels: { gpu: "yes", zone: "a" } });
    await tick().dispatch();
    expect((await withGpu.next("grant")).actionId).toBe(gpu);
  });

  it("renews the deadlines of every heartbeating session in one statement per tick (rule 7)", async () => {
    const statements: string[] = [];
    t = await t.replace({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false, onQuery: (q) => statements.push(q) },
    });
    const fleet = await Promise.all(Array.from({ length: 20 }, (_, i) => worker(`hb-${i}`)));
    await Promise.all(fleet.map((w) => w.heartbeat(1)));
    await Promise.all(fleet.map((w) => w.heartbeat(2)));
    await tick().dispatch(); // let the dispatch the hellos woke finish first
    statements.length = 0;
    await tick().renew();
    // The cluster bus's look for other processes (PostgreSQL, once a second) is not the renewal's,
    // nor is the bound on how long it waits for a row, set in its transaction before it.
    const renewal = statements.filter(
      (q) => !q.includes("pg_stat_activity") && !q.includes("set_config('lock_timeout'"),
    );
    expect(renewal, renewal.join("\n---\n")).toHaveLength(1);
    expect(renewal[0]).toMatch(/update sessions s set\s+last_heard_at/);
  });

  it("acks heartbeats with whole milliseconds left after a renewal by the database's clock", async () => {
    // The database's now() has microseconds, and a renewal keeps a stored deadline later than the
    // one it computes. The time left goes out as a Duration, whose nanos must be whole: with a
    // fraction of a millisecond left, every ack failed to encode and ended the stream.
    let db: Db | undefined;
    t = await t.replace({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { timers: false, wrapDb: (d) => (db = d) },
    });
    const w = await worker("hb-db-clock");
    await w.heartbeat(1);
    await db?.execute(
      sql`update sessions set deadline = deadline + interval '1.000321 seconds' where worker_id = 'hb-db-clock'`,
    );
    await tick().renew();
    const ack = await w.heartbeat(2);
    const remainingMs = Number(ack.remaining?.seconds ?? 0n) * 1000 + (ack.remaining?.nanos ?? 0) / 1e6;
    expect(Number.isInteger(remainingMs)).toBe(true);
    expect(remainingMs).toBeGreaterThan(10_000);
    expect(remainingMs).toBeLessThanOrEqual(11_001);
  });

  it("turns a cluster DEGRADED after expiries of several workers, not of one worker's slots, with an event", async () => {
    // One agent of four slots killed: four expiries, one worker; the cluster is not to blame.
    const big = await worker("big", { capacity: 4 });
    const bigIds = [await submit(), await submit(), await submit(), await submit()];
    await tick().dispatch();
    for (const _ of bigIds) await big.next("grant");
    big.drop();
    await waitForEvent(t, bigIds[0] ?? "", "big", EventKind.STREAM_LOST);
    clock.advance(GRACE_MS + 1);
    await tick().reap();
    for (const id of bigIds) await api().cancelAction({ actionId: id });
    const [afterOne] = (await t.client(ClusterService).listClusters({})).clusters;
    expect(afterOne).toMatchObject({ name: "east", health: ClusterHealth.HEALTHY, recentExpiries: 4 });
    for (let i = 0; i < 2; i++) {
      const w = await worker(`flaky-${i}`);
      const id = await submit();
      await tick().dispatch();
      await w.next("grant");
      w.drop();
      await waitForEvent(t, id, `flaky-${i}`, EventKind.STREAM_LOST);
      clock.advance(GRACE_MS + 1);
      await tick().reap();
      await api().cancelAction({ actionId: id });
    }
    const [cluster] = (await t.client(ClusterService).listClusters({})).clusters;
    expect(cluster).toMatchObject({ name: "east", health: ClusterHealth.DEGRADED, recentExpiries: 6 });
    const changed = await t
      .client(EventService)
      .listEvents({ cluster: "east", kind: EventKind.CLUSTER_HEALTH_CHANGED });
    expect(changed.events.map((e) => e.message)).toEqual([
      "cluster east is now DEGRADED: 6 lease expiries of 3 workers in the last 5 minutes",
    ]);
  });

  /** Workers that each hold one lease; returns them with their grants. */
  const holders = async (...ids: string[]) => {
    const ws = [];
    for (const id of ids) ws.push(await worker(id));
    for (const _ of ids) await submit();
    await tick().dispatch();
    return Promise.all(ws.map(async (w, i) => ({ w, workerId: ids[i] ?? "", grant: await w.next("grant") })));
  };
  /** Drops each holder's stream and waits until the server recorded every loss. */
  const loseStreams = async (...lost: { w: TestWorker; workerId: string }[]) => {
    for (const { w } of lost) w.drop();
    for (const { workerId } of lost) await waitForEvent(t, "", workerId, EventKind.STREAM_LOST);
  };
  const clusterEast = async () =>
    (await t.client(ClusterService).listClusters({})).clusters.find((c) => c.name === "east");
  const clusterEvents = async (kind: EventKind) =>
    (await t.client(EventService).listEvents({ cluster: "east", kind })).events.map((e) => e.message);
  const expiredActions = async () =>
    (await t.client(EventService).listEvents({ kind: EventKind.LEASE_EXPIRED })).events.map(
      (e) => e.actionId,
    );

  it("pauses expiries when most of a cluster's sessions lose their streams, and goes on once they come back (rule 10)", async () => {
    const [a, b, c] = await holders("pa", "pb", "pc");
    if (!a || !b || !c) throw new Error("three holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await keepAlive(c.w);
    await tick().reap();
    // Two of three sessions without a stream: the network, not the workers. Nothing expires.
    expect(await expiredActions()).toEqual([]);
    expect(await clusterEast()).toMatchObject({
      health: ClusterHealth.PARTITIONED,
      healthReason: expect.stringMatching(
        /^2 of 3 sessions holding leases lost; partitioned since .*; lease expiries are paused/,
      ),
      expiriesPaused: true,
      partitionedTime: expect.anything(),
    });
    const line =
      "cluster east is partitioned: 2 of 3 sessions holding leases lost (stream closed or silent past the deadline); lease expiries are paused until they reconnect or an operator resumes them";
    expect(await clusterEvents(EventKind.CLUSTER_PARTITIONED)).toEqual([line]);
    const metrics = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/^leasehold_clusters_expiries_paused 1$/m);
    expect(t.logs.map((l) => l.msg)).toContain(
      "cluster east is partitioned: 2 of 3 sessions holding leases lost; lease expiries are paused",
    );
    // Past its deadline, pa comes back and loses nothing: same session, same epoch.
    clock.advance(GRACE_MS);
    await keepAlive(c.w);
    await tick().reap();
    const back = await worker("pa", { held: [{ actionId: a.grant.actionId, epoch: a.grant.epoch }] });
    expect(back.welcome).toMatchObject({
      sessionResumed: true,
      resumed: [{ actionId: a.grant.actionId, epoch: 1n }],
    });
    // One of three is no partition: the mark clears. pb, still gone, is not reaped in the same
    // reap: a worker a moment behind the first ones to return gets a grace period from now.
    await keepAlive(back, c.w);
    await tick().reap();
    expect(await clusterEvents(EventKind.CLUSTER_RECOVERED)).toEqual([
      "cluster east is no longer partitioned (1 of 3 sessions holding leases lost); lease expiries go on",
    ]);
    expect(await clusterEast()).toMatchObject({ expiriesPaused: false });
    expect((await clusterEast())?.health).not.toBe(ClusterHealth.PARTITIONED);
    expect(await expiredActions()).toEqual([]);
    clock.advance(GRACE_MS / 2);
    await keepAlive(back, c.w);
    await tick().reap();
    const late = await worker("pb", { held: [{ actionId: b.grant.actionId, epoch: b.grant.epoch }] });
    expect(late.welcome).toMatchObject({
      sessionResumed: true,
      resumed: [{ actionId: b.grant.actionId, epoch: 1n }],
    });
    // Back within the grace period the end of the partition gave it: in time, and said so.
    const resumedEvents = await t.client(EventService).listEvents({ kind: EventKind.SESSION_RESUMED });
    expect(resumedEvents.events.find((e) => e.workerId === "pb")?.message).toBe(
      "worker pb reconnected within grace and resumed its session",
    );
    expect(resumedEvents.events.find((e) => e.workerId === "pa")?.message).toMatch(
      /^worker pa reconnected after its deadline and resumed its session, kept while its cluster was partitioned/,
    );
    expect(await expiredActions()).toEqual([]);
    expect(await back.complete(a.grant, { output: { done: true } })).toMatchObject({ accepted: true });
  });

  it("resumes every session the partition kept whose worker says hello before the mark clears", async () => {
    const [a, b, c] = await holders("ka", "kb", "kc");
    if (!a || !b || !c) throw new Error("three holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await keepAlive(c.w);
    await tick().reap();
    expect(await clusterEast()).toMatchObject({ health: ClusterHealth.PARTITIONED });
    // Both come back, one right after the other, before any reap: the second hello must not
    // reap its own session because the first one's return already brought the share down.
    const first = await worker("ka", { held: [{ actionId: a.grant.actionId, epoch: a.grant.epoch }] });
    const second = await worker("kb", { held: [{ actionId: b.grant.actionId, epoch: b.grant.epoch }] });
    for (const [w, h] of [
      [first, a],
      [second, b],
    ] as const) {
      expect(w.welcome).toMatchObject({
        sessionResumed: true,
        resumed: [{ actionId: h.grant.actionId, epoch: 1n }],
      });
    }
    await keepAlive(first, second, c.w);
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    expect(await clusterEvents(EventKind.CLUSTER_RECOVERED)).toHaveLength(1);
  });

  it("expires a session still gone a grace period after its partition ended", async () => {
    const [a, b, c] = await holders("ga", "gb", "gc");
    if (!a || !b || !c) throw new Error("three holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await keepAlive(c.w);
    await tick().reap();
    const back = await worker("ga", { held: [{ actionId: a.grant.actionId, epoch: a.grant.epoch }] });
    await keepAlive(back, c.w);
    await tick().reap();
    expect(await clusterEvents(EventKind.CLUSTER_RECOVERED)).toHaveLength(1);
    expect(await expiredActions()).toEqual([]);
    clock.advance(GRACE_MS + 1);
    await keepAlive(back, c.w);
    await tick().reap();
    expect(await expiredActions()).toEqual([b.grant.actionId]);
  });

  it("weighs only sessions holding leases: sessions opened and dropped do not pause a lost holder's expiry", async () => {
    const [a, c] = await holders("ta", "tc");
    if (!a || !c) throw new Error("two holders expected");
    // Five throwaway sessions, as any client could open on a server without authentication.
    const idle = [];
    for (let i = 0; i < 5; i++) idle.push({ w: await worker(`idle-${i}`), workerId: `idle-${i}` });
    await loseStreams(a, ...idle);
    clock.advance(GRACE_MS + 1000);
    await keepAlive(c.w);
    await tick().reap();
    // Six of seven sessions lost, but one of the two holding leases: a lost worker, not a partition.
    expect(await expiredActions()).toEqual([a.grant.actionId]);
    expect(await clusterEvents(EventKind.CLUSTER_PARTITIONED)).toEqual([]);
  });

  it("expires as usual when only half of a cluster's sessions are lost", async () => {
    const [a, b, c, d] = await holders("ha", "hb", "hc", "hd");
    if (!a || !b || !c || !d) throw new Error("four holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await keepAlive(c.w, d.w);
    await tick().reap();
    expect((await expiredActions()).sort()).toEqual([a.grant.actionId, b.grant.actionId].sort());
    expect(await clusterEvents(EventKind.CLUSTER_PARTITIONED)).toEqual([]);
  });

  it("counts sessions past their deadline as lost though their streams never closed (silent streams, a database outage)", async () => {
    const held = await holders("sa", "sb", "sc");
    // Nothing is renewed for longer than the grace period: every deadline passes, no stream closed.
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    expect(await clusterEvents(EventKind.CLUSTER_PARTITIONED)).toEqual([
      expect.stringMatching(/^cluster east is partitioned: 3 of 3 sessions holding leases lost/),
    ]);
    // The streams were fine all along: the next renewal brings every deadline back, and the mark clears.
    await keepAlive(...held.map((h) => h.w));
    await tick().reap();
    expect(await clusterEvents(EventKind.CLUSTER_RECOVERED)).toHaveLength(1);
    expect(await expiredActions()).toEqual([]);
  });

  it("keeps no session silent longer than the maximum silence, partition or not", async () => {
    const [a, b] = await holders("ma", "mb");
    if (!a || !b) throw new Error("two holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    clock.advance(10 * GRACE_MS);
    await tick().reap();
    expect((await expiredActions()).sort()).toEqual([a.grant.actionId, b.grant.actionId].sort());
    await tick().reap();
    expect(await clusterEvents(EventKind.CLUSTER_RECOVERED)).toHaveLength(1);
  });

  it("ends the paused session of a worker that comes back in another cluster", async () => {
    const [a, b] = await holders("va", "vb");
    if (!a || !b) throw new Error("two holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    const moved = await connectWorker(t.address, { workerId: "va", cluster: "west", capacity: 1 });
    workers.push(moved);
    expect(moved.welcome).toMatchObject({ sessionResumed: false });
    expect(await expiredActions()).toEqual([a.grant.actionId]);
    // vb, still lost in east, stays paused.
    expect((await getAction(b.grant.actionId)).action).toMatchObject({
      state: ActionState.LEASED,
      epoch: 1n,
    });
  });

  it("turns the valve off with --partition-share 1", async () => {
    await t[Symbol.asyncDispose]();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s", partitionShare: "1" },
      overrides: { clock, timers: false },
    });
    const [a, b] = await holders("xa", "xb");
    if (!a || !b) throw new Error("two holders expected");
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect((await expiredActions()).sort()).toEqual([a.grant.actionId, b.grant.actionId].sort());
    expect(await clusterEvents(EventKind.CLUSTER_PARTITIONED)).toEqual([]);
  });

  it("lets an operator resume the expiries of a partitioned cluster, and refuses a cluster that is not", async () => {
    const clusters = t.client(ClusterService);
    await expectStatus(
      clusters.resumeExpiries({ cluster: "nowhere" }),
      Code.NotFound,
      /^cluster "nowhere" not found/,
    );
    await expectStatus(
      clusters.resumeExpiries({ cluster: "" }),
      Code.InvalidArgument,
      /^cluster: is required/,
    );
    const [a, b] = await holders("oa", "ob");
    if (!a || !b) throw new Error("two holders expected");
    await expectStatus(
      clusters.resumeExpiries({ cluster: "east" }),
      Code.FailedPrecondition,
      /^cluster east is not partitioned: its lease expiries are not paused/,
    );
    await loseStreams(a, b);
    clock.advance(GRACE_MS + 1000);
    await tick().reap();
    expect(await expiredActions()).toEqual([]);
    const resumed = await clusters.resumeExpiries({ cluster: "east", reason: "rack 4 is gone" });
    expect(resumed.cluster).toMatchObject({
      health: ClusterHealth.PARTITIONED,
      expiriesPaused: false,
      healthReason: expect.stringMatching(/an operator resumed lease expiries at /),
    });
    expect(await clusterEvents(EventKind.CLUSTER_EXPIRIES_RESUMED)).toEqual([
      "an operator resumed lease expiries of partitioned cluster east: rack 4 is gone",
    ]);
    // Again is harmless and records nothing more.
    await clusters.resumeExpiries({ cluster: "east" });
    expect(await clusterEvents(EventKind.CLUSTER_EXPIRIES_RESUMED)).toHaveLength(1);
    await tick().reap();
    expect((await expiredActions()).sort()).toEqual([a.grant.actionId, b.grant.actionId].sort());
    // With the lost sessions reaped, the partition is over.
    await tick().reap();
    expect(await clusterEast()).toMatchObject({ expiriesPaused: false });
    expect((await clusterEast())?.health).not.toBe(ClusterHealth.PARTITIONED);
    expect(await clusterEvents(EventKind.CLUSTER_RECOVERED)).toHaveLength(1);
  });

  it("streams every change of a watched action and counts it in the metrics", async () => {
    const id = await submit();
    const states: ActionState[] = [];
    const watching = (async () => {
      for await (const m of api().watchAction({ actionId: id }))
        states.push(m.action?.state ?? ActionState.UNSPECIFIED);
    })();
    await waitFor(async () => states.length === 1);
    const w = await worker("w1");
    await tick().dispatch();
    const grant = await w.next("grant");
    await w.complete(grant, { output: {} });
    await watching;
    expect(states).toEqual([ActionState.QUEUED, ActionState.LEASED, ActionState.SUCCEEDED]);
    const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    expect(text).toMatch(/^leasehold_grants_total 1$/m);
    expect(text).toMatch(/^leasehold_connected_workers 1$/m);
    expect(text).toMatch(/^leasehold_lease_expiries_total 0$/m);
  });

  it("reports the process's CPU, memory and event-loop lateness since the last scrape", async () => {
    const scrape = async () => {
      const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
      const value = (pattern: RegExp) => Number(text.match(pattern)?.[1]);
      return {
        cpu: value(/^process_cpu_seconds_total ([\d.e+-]+)$/m),
        rss: value(/^process_resident_memory_bytes (\d+)$/m),
        p99: value(/^nodejs_eventloop_delay_seconds\{quantile="0\.99"\} (\S+)$/m),
        max: value(/^nodejs_eventloop_delay_seconds\{quantile="1"\} (\S+)$/m),
      };
    };
    await scrape();
    // The server runs in this process: hold its event loop for 300 ms.
    const until = performance.now() + 300;
    while (performance.now() < until);
    await new Promise((r) => setTimeout(r, 30));
    const blocked = await scrape();
    expect(blocked.cpu).toBeGreaterThan(0.3);
    expect(blocked.rss).toBeGreaterThan(10 * 1024 * 1024);
    expect(blocked.max).toBeGreaterThanOrEqual(0.28);
    expect(blocked.p99).toBeGreaterThanOrEqual(0);
    // Read and restarted by the scrape: the next one does not show the stall again.
    const next = await scrape();
    expect(next.max >= blocked.max).toBe(false);
  });
});

/** Polls a condition the server reaches asynchronously (used for stream-loss bookkeeping). */
async function waitFor(condition: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > until) throw new Error("condition not reached in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * Waits for the `nth` event of a kind about a worker, via WatchEvents replaying from the start (no
 * polling, no race). A worker's second lost stream needs nth 2: the first event is already there.
 */
async function waitForEvent(
  t: TestServer,
  _actionId: string,
  workerId: string,
  kind: EventKind,
  nth = 1,
): Promise<void> {
  let seen = 0;
  for await (const _ of t.client(EventService).watchEvents({ workerId, kind, afterSequence: 0n })) {
    if (++seen === nth) return;
  }
}
