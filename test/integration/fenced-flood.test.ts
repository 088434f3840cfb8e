import type { MessageInitShape } from "@bufbuild/protobuf";
import type { SQL } from "drizzle-orm";
import { PgDialect } from "drizzle-orm/pg-core";
import { afterEach, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { type ConnectRequestSchema, RejectReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import type { Db } from "../../src/store/database.js";
import { FENCED_EVENTS_PER_WINDOW } from "../../src/work/lease/fenced-events.js";
import { MAX_UNANSWERED_CHARS } from "../../src/work/lease/reports.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

type Request = MessageInitShape<typeof ConnectRequestSchema>;

/** Sends `batches` messages of PER_BATCH completions of made-up actions, named by `actionId`. */
function flood(w: TestWorker, batches: number, actionId: (batch: number, i: number) => string): void {
  let reportId = 0n;
  for (let b = 0; b < batches; b++) {
    const messages: Request[] = [];
    for (let i = 0; i < PER_BATCH; i++) {
      reportId++;
      messages.push({
        message: {
          case: "completion",
          value: { reportId, actionId: actionId(b, i), epoch: 1n, outcome: { case: "succeeded", value: {} } },
        },
      });
    }
    w.send({ message: { case: "batch", value: { messages } } });
  }
}

const GRACE_MS = 4000;
const BATCHES = 10;
const PER_BATCH = 1000;

/**
 * One stream flooding reports on leases it does not hold (made-up actions:
 * every one FENCED) must not starve the other streams of this process. On
 * PGlite every statement runs on the server's thread: one event insert per
 * fenced report, and settle rounds started back to back, kept renewals from
 * being written (and heartbeats from being read) for seconds, until a
 * healthy worker's acks said `remaining` ~0 and its session was reaped.
 */
describe("a stream flooding fenced reports", () => {
  let t: TestServer;
  const workers: TestWorker[] = [];

  afterEach(async () => {
    for (const w of workers.splice(0)) w.drop();
    await t[Symbol.asyncDispose]();
  });

  /** A healthy worker holding the one action of cluster `good` (its id), and a flooder in another cluster. */
  async function goodAndFlooder() {
    const id = (await t.client(ActionService).submitAction({ cluster: "good" })).action?.id ?? "";
    const good = await connectWorker(t.address, { workerId: "good", cluster: "good", capacity: 1 });
    workers.push(good);
    const grant = await good.next("grant");
    const bad = await connectWorker(t.address, {
      workerId: "flooder",
      cluster: "elsewhere",
      capacity: 1,
      acceptsBatches: true,
    });
    workers.push(bad);
    return { id, good, grant, bad };
  }

  it("does not starve another stream's renewals, and every report is answered FENCED", async () => {
    t = await startTestServer({
      config: { gracePeriod: `${GRACE_MS}ms`, heartbeatInterval: "1s" },
      // One window for the whole test, however slow the machine: the counts below are exact.
      overrides: { limits: { fencedEventsWindowMs: 10 * 60_000 } },
    });
    const { id, good, grant, bad } = await goodAndFlooder();
    const held = [{ actionId: grant.actionId, epoch: grant.epoch }];
    const fenced = new Set<bigint>();
    let other = 0;
    let answered: () => void = () => {};
    const allAnswered = new Promise<void>((resolve) => {
      answered = resolve;
    });
    // Count the flood's answers as they come (the helper keeps every message it received).
    const seen = { n: 0 };
    const count = () => {
      for (; seen.n < bad.received.length; seen.n++) {
        const m = bad.received[seen.n]?.message;
        if (m?.case !== "reportResult") continue;
        if (m.value.rejectReason === RejectReason.FENCED) fenced.add(m.value.reportId);
        else other++;
      }
      if (fenced.size + other >= BATCHES * PER_BATCH) answered();
    };
    const counter = setInterval(count, 20);

    // Both workers heartbeat every second (the heartbeat interval), as agents do; the good one
    // lists its lease. A heartbeat whose ack never comes (the stream ended) stops the loop.
    let flooding = true;
    const heartbeat = async (w: TestWorker, leases: { actionId: string; epoch: bigint }[]) => {
      const remaining: number[] = [];
      for (let seq = 1; flooding || seq <= 3; seq++) {
        const sent = Date.now();
        const ack = await w.heartbeat(seq, leases).catch(() => undefined);
        if (!ack) break;
        remaining.push(Number(ack.remaining?.seconds ?? 0n) * 1000 + (ack.remaining?.nanos ?? 0) / 1e6);
        await new Promise((r) => setTimeout(r, Math.max(0, 1000 - (Date.now() - sent))));
      }
      return remaining;
    };
    const goodAcks = heartbeat(good, held);
    const badAcks = heartbeat(bad, []);

    // The flood: completions of made-up actions, a thousand per message.
    flood(bad, BATCHES, (_, i) => `ghost-${i}`);
    // Either stream ending (its session reaped) fails the test at once, and a flood still not
    // answered after 30s (it takes a few seconds) fails it then, rather than at the timeout.
    let timer: NodeJS.Timeout | undefined;
    const ended = await Promise.race([
      allAnswered.then(() => undefined),
      good.ended.then((e) => `good: ${e.details}`),
      bad.ended.then((e) => `flooder: ${e.details}`),
      new Promise<string>((resolve) => {
        timer = setTimeout(() => resolve(`${fenced.size + other} reports answered after 30s`), 30_000);
      }),
    ]);
    clearTimeout(timer);
    clearInterval(counter);
    flooding = false;
    expect(ended).toBeUndefined();
    const acks = await goodAcks;
    await badAcks;
    expect(other).toBe(0);
    expect(fenced.size).toBe(BATCHES * PER_BATCH);
    // Every ack promised a good part of the grace (renewals and heartbeats every quarter of
    // it leave about half): the renewals went on during the flood. Before, acks said ~0 and
    // the session was reaped.
    expect(acks.length).toBeGreaterThanOrEqual(3);
    expect(Math.min(...acks)).toBeGreaterThan(GRACE_MS / 4);
    const action = (await t.client(ActionService).getAction({ actionId: id })).action;
    expect(action).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
    const reaped = await t
      .client(EventService)
      .listEvents({ workerId: "good", kind: EventKind.SESSION_REAPED });
    expect(reaped.events).toEqual([]);
    // The flood's first reports have their event rows; the rest are counted, not written one by one.
    const recorded = async () =>
      (
        await t
          .client(EventService)
          .listEvents({ workerId: "flooder", kind: EventKind.REPORT_FENCED, pageSize: 1000 })
      ).events;
    await expect.poll(async () => (await recorded()).length).toBe(FENCED_EVENTS_PER_WINDOW);
    // No action has those ids: the events name none, and say the worker never held them.
    expect(
      (await recorded()).every((e) => e.actionId === "" && /a lease it never held/.test(e.message)),
    ).toBe(true);
    // Stopping writes the count of the window still open (else written when it ends).
    await t.stop();
    expect(t.logs.find((l) => l.unrecorded !== undefined)).toMatchObject({
      workerId: "flooder",
      recorded: FENCED_EVENTS_PER_WINDOW,
      unrecorded: BATCHES * PER_BATCH - FENCED_EVENTS_PER_WINDOW,
    });
  }, 60_000);

  it("stops reading a stream whose unanswered progress holds too much checkpoint text, until most is answered", async () => {
    // Progress statements wait while `held` is set: the reports pile up unanswered.
    let release = () => {};
    let held: Promise<void> | undefined = new Promise((resolve) => {
      release = resolve;
    });
    const dialect = new PgDialect();
    const wrapDb = (db: Db) =>
      new Proxy(db, {
        get(target, property, receiver) {
          if (property !== "execute") return Reflect.get(target, property, receiver);
          return async (query: SQL) => {
            if (held && dialect.sqlToQuery(query).sql.includes("checkpoint = coalesce")) await held;
            return target.execute(query);
          };
        },
      }) as Db;
    t = await startTestServer({
      config: { gracePeriod: "60s", heartbeatInterval: "1s" },
      overrides: { wrapDb },
    });
    const heldBack = async () => {
      const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
      return /^leasehold_worker_streams_held_back (\d+)$/m.exec(text)?.[1];
    };
    await t.client(ActionService).submitAction({ cluster: "big" });
    const w = await connectWorker(t.address, { workerId: "big", cluster: "big", capacity: 1 });
    workers.push(w);
    const grant = await w.next("grant");
    const answers = () => w.received.filter((m) => m.message.case === "reportResult").length;
    // Sixty reports of 512 Ki characters each, 30 Mi in all, for one action.
    const REPORTS = 60;
    const CHARS = 512 * 1024;
    const checkpoint = { blob: "x".repeat(CHARS) };
    for (let i = 1; i <= REPORTS; i++) {
      w.send({
        message: {
          case: "progress",
          value: {
            reportId: BigInt(i),
            actionId: grant.actionId,
            epoch: grant.epoch,
            phase: "p",
            checkpoint,
          },
        },
      });
    }
    // Sent after them: read only once the unanswered text is down to a quarter of the bound.
    let acked = false;
    const ack = w.heartbeat(1).then(() => {
      acked = true;
      return answers();
    });
    await expect.poll(heldBack, { interval: 20, timeout: 30_000 }).toBe("1");
    expect(acked).toBe(false);
    held = undefined;
    release();
    expect(await ack).toBeGreaterThan(REPORTS - MAX_UNANSWERED_CHARS / CHARS - 8);
    await expect.poll(answers, { interval: 20, timeout: 60_000 }).toBe(REPORTS);
    expect(w.received.filter((m) => m.message.case === "reportResult" && !m.message.value.accepted)).toEqual(
      [],
    );
    expect(await heldBack()).toBe("0");
  }, 90_000);

  it("holds back only the flooding stream: its reading stops, and another stream's report goes first", async () => {
    // A long grace: the flooder's heartbeat is meant to wait behind its flood.
    t = await startTestServer({ config: { gracePeriod: "60s", heartbeatInterval: "1s" } });
    const { good, grant, bad } = await goodAndFlooder();
    const answers = () => {
      let n = 0;
      for (const m of bad.received) if (m.message.case === "reportResult") n++;
      return n;
    };
    const total = 10 * PER_BATCH;
    flood(bad, 10, (b, i) => `ghost-${b}-${i}`);
    // Sent after the flood: the server reads it only once it has answered most of the flood.
    const ack = bad.heartbeat(1).then(answers);
    // Under way: the server has read the flood's first batches and settles them.
    await expect.poll(answers, { interval: 5, timeout: 30_000 }).toBeGreaterThanOrEqual(300);
    const before = answers();
    const result = await good.complete(grant, { output: { ok: true } });
    const passedBy = answers() - before;
    expect(result.accepted).toBe(true);
    // Unanswered reports past the bound stop the reading (maxUnansweredReports: 1,024, plus the
    // batch being handled), so the heartbeat was read after all but the last of them.
    expect(await ack).toBeGreaterThan(total - 2 * 1024);
    // The good stream's report went into the next round (a stream's share comes first), behind
    // the rounds already in flight: three rounds and its own of 256, and the answers already on
    // their way when it was sent. Before, it waited behind everything read of the flood (8,000
    // and more of 10,000 on PostgreSQL).
    expect(passedBy).toBeLessThan(2_500);
    await expect.poll(answers, { interval: 20, timeout: 30_000 }).toBe(total);
    expect(bad.received.filter((m) => m.message.case === "reportResult" && m.message.value.accepted)).toEqual(
      [],
    );
  }, 60_000);
});
