import type { MessageInitShape } from "@bufbuild/protobuf";
import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { type ConnectRequestSchema, RejectReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { statusDetails } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

type Request = MessageInitShape<typeof ConnectRequestSchema>;

const heartbeat = (sequence: number, held: { actionId: string; epoch: bigint }[] = []): Request => ({
  message: { case: "heartbeat", value: { sequence: BigInt(sequence), heldLeases: held } },
});
const batch = (...messages: Request[]): Request => ({ message: { case: "batch", value: { messages } } });

/**
 * Batched stream messages (issue 13): a worker sends several messages in one
 * ConnectRequest, handled in order as if sent alone, and a worker whose hello
 * accepts batches gets what the server has for it in one turn as one
 * ConnectResponse. A batch that is wrong as a whole ends the stream.
 */
describe("worker stream batches", () => {
  let t: TestServer;
  let workers: TestWorker[] = [];

  const start = async () => {
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { timers: false },
    });
  };
  const worker = async (workerId: string, extra: { capacity?: number; acceptsBatches?: boolean } = {}) => {
    const w = await connectWorker(t.address, {
      workerId,
      cluster: "east",
      capacity: extra.capacity ?? 1,
      acceptsBatches: extra.acceptsBatches ?? false,
    });
    workers.push(w);
    return w;
  };
  const submit = async () =>
    (await t.client(ActionService).submitAction({ cluster: "east" })).action?.id ?? "";
  const state = async (id: string) =>
    (await t.client(ActionService).getAction({ actionId: id })).action?.state;
  /** The stream's final status and the fields its BadRequest names. */
  const refusal = async (w: TestWorker) => {
    const ended = await w.ended;
    return { code: ended.code, fields: statusDetails(ended.metadata).fields, details: ended.details };
  };

  afterEach(async () => {
    for (const w of workers) w.drop();
    workers = [];
    await t[Symbol.asyncDispose]();
  });

  it("says in the welcome that it takes batches", async () => {
    await start();
    const w = await worker("w1");
    expect(w.welcome.acceptsBatches).toBe(true);
  });

  it("ends the stream INVALID_ARGUMENT naming the path of a bad heartbeat inside a batch", async () => {
    await start();
    const w = await worker("w1");
    w.send(batch(heartbeat(1), heartbeat(2, [{ actionId: "x".repeat(200), epoch: 1n }])));
    const r = await refusal(w);
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.fields).toEqual(["batch.messages[1].heartbeat.held_leases[0].action_id"]);
    // Nothing of the batch was handled: the heartbeat before the bad message got no ack.
    expect(w.received.filter((m) => m.message.case === "heartbeatAck")).toEqual([]);
  });

  it("answers a report inside a batch whose fields break the limits INVALID, naming its place, and handles the rest", async () => {
    await start();
    const id = await submit();
    const w = await worker("w1");
    await t.server.leases.tick.dispatch();
    const grant = await w.next("grant");
    const lease = { actionId: grant.actionId, epoch: grant.epoch };
    w.send(
      batch(
        heartbeat(1, [lease]),
        {
          message: {
            case: "completion",
            value: {
              reportId: 1n,
              actionId: "x".repeat(200),
              epoch: 1n,
              outcome: { case: "succeeded", value: {} },
            },
          },
        },
        {
          message: {
            case: "completion",
            value: {
              reportId: 2n,
              ...lease,
              outcome: { case: "failed", value: { message: "core\u0000dumped", retryable: false } },
            },
          },
        },
        heartbeat(2, [lease]),
      ),
    );
    const first = await w.next("reportResult", (r) => r.reportId === 1n);
    expect(first.rejectReason).toBe(RejectReason.INVALID);
    expect(first.message).toContain("batch.messages[1].completion.action_id: must be at most 128 characters");
    const second = await w.next("reportResult", (r) => r.reportId === 2n);
    expect(second).toMatchObject({ accepted: false, rejectReason: RejectReason.INVALID, epoch: lease.epoch });
    expect(second.message).toContain("batch.messages[2].completion.failed.message");
    expect(second.message).toContain("NUL");
    await w.next("heartbeatAck", (a) => a.sequence === 2n);
    // Nothing was applied: the lease is still held, and a report that fits is taken.
    expect(await state(id)).toBe(ActionState.LEASED);
    const done = await w.complete(lease, { error: "core dumped", retryable: false });
    expect(done.accepted).toBe(true);
    expect(await state(id)).toBe(ActionState.FAILED);
  });

  it("ends the stream on a heartbeat inside a batch listing more leases than twice the capacity", async () => {
    await start();
    const w = await worker("w1");
    const held = [1, 2, 3].map((i) => ({ actionId: `a${i}`, epoch: 1n }));
    w.send(batch(heartbeat(1), heartbeat(2, held)));
    const r = await refusal(w);
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.fields).toEqual(["batch.messages[1].heartbeat.held_leases"]);
  });

  it("ends the stream INVALID_ARGUMENT for a hello inside a batch", async () => {
    await start();
    const w = await worker("w1");
    w.send(
      batch(heartbeat(1), {
        message: { case: "hello", value: { workerId: "w1", cluster: "east", capacity: 1 } },
      }),
    );
    const r = await refusal(w);
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.fields).toEqual(["batch.messages[1].hello"]);
  });

  it("ends the stream INVALID_ARGUMENT for a batch inside a batch", async () => {
    await start();
    const w = await worker("w1");
    w.send(batch(batch(heartbeat(1))));
    const r = await refusal(w);
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.fields).toEqual(["batch.messages[0].batch"]);
  });

  it("ends the stream INVALID_ARGUMENT for an empty batch", async () => {
    await start();
    const w = await worker("w1");
    w.send(batch());
    const r = await refusal(w);
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.fields).toEqual(["batch.messages"]);
  });

  it("ends the stream INVALID_ARGUMENT for a batch of 1,025 messages, and takes 1,024", async () => {
    await start();
    const ok = await worker("ok");
    ok.send(batch(...Array.from({ length: 1024 }, (_, i) => heartbeat(i + 1))));
    await ok.next("heartbeatAck", (a) => a.sequence === 1024n);
    const w = await worker("w1");
    w.send(batch(...Array.from({ length: 1025 }, (_, i) => heartbeat(i + 1))));
    const r = await refusal(w);
    expect(r.code).toBe(Code.InvalidArgument);
    expect(r.fields).toEqual(["batch.messages"]);
    expect(r.details).toContain("1024");
  });

  it("answers a report inside a batch that names no action as one sent alone would, naming its place", async () => {
    await start();
    const w = await worker("w1");
    w.send(
      batch(heartbeat(1), {
        message: {
          case: "completion",
          value: { reportId: 7n, actionId: "", epoch: 1n, outcome: { case: "succeeded", value: {} } },
        },
      }),
    );
    const result = await w.next("reportResult", (r) => r.reportId === 7n);
    expect(result.accepted).toBe(false);
    expect(result.rejectReason).toBe(RejectReason.INVALID);
    expect(result.message).toBe("batch.messages[1].completion.action_id: is required");
    // The stream goes on.
    await w.heartbeat(2);
  });

  it("handles the reports of a batch in order, each as if it came alone", async () => {
    await start();
    const ids = [await submit(), await submit(), await submit()];
    const w = await worker("w1", { capacity: 3 });
    await t.server.leases.tick.dispatch();
    const grants = [];
    for (let i = 0; i < 3; i++) grants.push(await w.next("grant"));
    const [a, b, c] = grants.map((g) => ({ actionId: g.actionId, epoch: g.epoch })) as [
      { actionId: string; epoch: bigint },
      { actionId: string; epoch: bigint },
      { actionId: string; epoch: bigint },
    ];
    w.send(
      batch(
        { message: { case: "grantAck", value: { reportId: 1n, ...a } } },
        { message: { case: "grantAck", value: { reportId: 2n, ...b } } },
        { message: { case: "grantAck", value: { reportId: 3n, ...c } } },
        {
          message: {
            case: "completion",
            value: { reportId: 4n, ...a, outcome: { case: "succeeded", value: {} } },
          },
        },
        { message: { case: "release", value: { reportId: 5n, ...b, reason: "giving it back" } } },
        {
          message: {
            case: "completion",
            value: {
              reportId: 6n,
              ...c,
              outcome: { case: "failed", value: { message: "no", retryable: false } },
            },
          },
        },
        // Sent after the reports: a repeat of the first completion is answered after it.
        {
          message: {
            case: "completion",
            value: { reportId: 7n, ...a, outcome: { case: "succeeded", value: {} } },
          },
        },
      ),
    );
    const results = [];
    for (let id = 1n; id <= 7n; id++) results.push(await w.next("reportResult", (r) => r.reportId === id));
    expect(results.map((r) => r.accepted)).toEqual([true, true, true, true, true, true, true]);
    const order = w.received
      .filter((m) => m.message.case === "reportResult")
      .map((m) => (m.message.value as { reportId: bigint }).reportId);
    expect(order).toEqual([1n, 2n, 3n, 4n, 5n, 6n, 7n]);
    const byId = new Map(grants.map((g, i) => [g.actionId, i]));
    const states = await Promise.all(ids.map(async (id) => [byId.get(id), await state(id)] as const));
    const of = (i: number) => states.find(([at]) => at === i)?.[1];
    expect(of(0)).toBe(ActionState.SUCCEEDED);
    expect(of(2)).toBe(ActionState.FAILED);
    // Released: queued again (and maybe granted again at once to the slot it freed).
    expect([ActionState.QUEUED, ActionState.LEASED]).toContain(of(1));
  });

  it("writes what it has for a stream in one turn as one batch to a worker that accepts batches", async () => {
    await start();
    const w = await worker("w1", { acceptsBatches: true });
    const before = w.responses.length;
    // Three heartbeats, each listing a lease the session does not hold: three acks and three
    // revokes, all answered in the turn the batch arrived.
    const stranger = (i: number) => [{ actionId: `not-mine-${i}`, epoch: 1n }];
    w.send(batch(heartbeat(1, stranger(1)), heartbeat(2, stranger(2)), heartbeat(3, stranger(3))));
    await w.next("heartbeatAck", (a) => a.sequence === 3n);
    const after = w.responses.slice(before);
    expect(after).toHaveLength(1);
    const response = after[0]?.message;
    expect(response?.case).toBe("batch");
    const inner = response?.case === "batch" ? response.value.messages.map((m) => m.message) : [];
    expect(inner.map((m) => m.case)).toEqual([
      "heartbeatAck",
      "revoke",
      "heartbeatAck",
      "revoke",
      "heartbeatAck",
      "revoke",
    ]);
    expect(inner.filter((m) => m.case === "heartbeatAck").map((m) => m.value.sequence)).toEqual([1n, 2n, 3n]);
  });

  it("writes one message per response to a worker whose hello does not accept batches", async () => {
    await start();
    const w = await worker("w1");
    const before = w.responses.length;
    const stranger = (i: number) => [{ actionId: `not-mine-${i}`, epoch: 1n }];
    w.send(batch(heartbeat(1, stranger(1)), heartbeat(2, stranger(2)), heartbeat(3, stranger(3))));
    await w.next("revoke", (r) => r.actionId === "not-mine-3");
    const after = w.responses.slice(before);
    expect(after.map((m) => m.message.case)).toEqual([
      "heartbeatAck",
      "revoke",
      "heartbeatAck",
      "revoke",
      "heartbeatAck",
      "revoke",
    ]);
  });
});
