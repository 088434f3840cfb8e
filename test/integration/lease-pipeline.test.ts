import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { createFakeClock } from "../../src/store/clock.js";
import type { ServerMessage, WorkerLink } from "../../src/work/worker-messages.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

type Grant = Extract<ServerMessage, { type: "grant" }>;

/**
 * The lease hot path: a report and the refill of the slot it frees share one
 * statement, and what one stream is owed goes out in one run.
 */
describe("lease pipeline", () => {
  let t: TestServer;
  let clock: ReturnType<typeof createFakeClock>;
  let statements: string[];
  /** Statements that change leases: settle reports, or claim and grant. */
  const writes = () => statements.filter((q) => q.includes("f_input") || q.includes("insert into attempts"));

  beforeEach(async () => {
    statements = [];
    clock = createFakeClock();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false, onQuery: (q) => statements.push(q) },
    });
  });
  afterEach(async () => {
    await t[Symbol.asyncDispose]();
  });

  const submit = async () =>
    (await t.client(ActionService).submitAction({ cluster: "east", payload: {} })).action?.id ?? "";

  /** A stream driven by hand: what the server sends lands in `sent`; `arrived` waits for a message. */
  async function stream(workerId: string, capacity: number) {
    const sent: ServerMessage[] = [];
    let waiters: (() => void)[] = [];
    const link: WorkerLink = {
      send(message) {
        sent.push(message);
        const ready = waiters;
        waiters = [];
        for (const w of ready) w();
      },
      close() {},
      bufferedBytes: () => 0,
      throttle() {},
    };
    const handle = await t.server.leases.open(
      {
        workerId,
        cluster: "east",
        capacity,
        labels: {},
        agentVersion: "test",
        instanceId: "",
        heldLeases: [],
      },
      link,
      "test",
      () => true,
    );
    const arrived = (test: (m: ServerMessage) => boolean) =>
      new Promise<void>((resolve) => {
        const look = () => {
          if (sent.some(test)) resolve();
          else waiters.push(look);
        };
        look();
      });
    const grants = () => sent.filter((m): m is Grant => m.type === "grant");
    const complete = (grant: Grant, reportId: bigint) =>
      handle.receive({
        type: "completion",
        reportId,
        actionId: grant.actionId,
        epoch: grant.epoch,
        outcome: { kind: "succeeded", output: {} },
      });
    return { sent, handle, arrived, grants, complete };
  }

  it("refills the slot a completion frees in the statement that applies it, and sends the grant right after the answer", async () => {
    const w = await stream("w1", 1);
    const first = await submit();
    const second = await submit();
    await t.server.leases.tick.dispatch();
    expect(w.grants().map((g) => g.actionId)).toEqual([first]);
    const [grant] = w.grants();
    if (!grant) throw new Error("a grant expected");
    statements.length = 0;

    w.complete(grant, 1n);
    await w.arrived((m) => m.type === "grant" && m.actionId === second);

    // One statement applied the completion and granted the next action.
    expect(writes()).toHaveLength(1);
    expect(writes()[0]).toContain("f_input");
    expect(writes()[0]).toContain("insert into attempts");
    // The answer, then at once the refill: one run, so one write when the rpc layer coalesces.
    const answer = w.sent.findIndex((m) => m.type === "report_result" && m.reportId === 1n);
    expect(w.sent[answer]).toMatchObject({ accepted: true });
    expect(w.sent[answer + 1]).toMatchObject({ type: "grant", actionId: second });
  });

  it("settles two reports freeing two slots and claims for both in one statement", async () => {
    const w = await stream("w2", 2);
    const ids = [await submit(), await submit(), await submit(), await submit()];
    await t.server.leases.tick.dispatch();
    const [a, b] = w.grants();
    if (!a || !b) throw new Error("two grants expected");
    statements.length = 0;

    // Both reports reach the server in one turn of its event loop.
    w.complete(a, 1n);
    w.complete(b, 2n);
    await w.arrived((m) => m.type === "report_result" && m.reportId === 2n);
    await t.server.leases.tick.dispatch();

    expect(writes()).toHaveLength(1);
    expect(w.grants().map((g) => g.actionId)).toEqual(ids);
  });

  it("runs no claim for a stream whose group's queue was found empty, until actions are queued", async () => {
    const w1 = await stream("w3", 1);
    // The claim finds nothing queued for cluster east, labels {}.
    await t.server.leases.tick.dispatch();
    statements.length = 0;

    // A hello in the same group gains room: no statement, since the queue is known empty.
    const w2 = await stream("w4", 1);
    await t.server.leases.tick.settled();
    expect(writes()).toHaveLength(0);

    // A submission changes the queue: it is claimed at once, without a poll.
    const id = await submit();
    await Promise.race([
      w1.arrived((m) => m.type === "grant" && m.actionId === id),
      w2.arrived((m) => m.type === "grant" && m.actionId === id),
    ]);
    expect(writes()).toHaveLength(1);
  });

  it("refills a freed slot even in a group whose queue was found empty", async () => {
    const w = await stream("w5", 2);
    const retried = (
      await t.client(ActionService).submitAction({
        cluster: "east",
        payload: {},
        retryPolicy: { maxAttempts: 2, initialBackoff: { seconds: 10n } },
      })
    ).action?.id;
    const other = await submit();
    await t.server.leases.tick.dispatch();
    const first = w.grants().find((g) => g.actionId === retried);
    const second = w.grants().find((g) => g.actionId === other);
    if (!first || !second) throw new Error("two grants expected");

    // A retryable failure re-queues the action 10 s ahead; the claim for the slot it frees
    // finds nothing due, so the group is marked empty.
    w.handle.receive({
      type: "completion",
      reportId: 1n,
      actionId: first.actionId,
      epoch: first.epoch,
      outcome: { kind: "failed", message: "try again", retryable: true },
    });
    await w.arrived((m) => m.type === "report_result" && m.reportId === 1n);
    await t.server.leases.tick.settled();
    // Due now, and nothing wakes the dispatcher: no submission, no poll (timers are off).
    clock.advance(11_000);

    // The slot the next completion frees is claimed for all the same, and gets the retry.
    w.complete(second, 2n);
    await w.arrived((m) => m.type === "grant" && m.actionId === retried && m.epoch === first.epoch + 1);
  });
});
