import { connect as http2Connect, constants as http2Constants } from "node:http2";
import { connect as tcpConnect } from "node:net";
import { create } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { type ConnectResponse, WorkerService } from "../../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../../src/rpc/client.js";
import type { ServerOverrides, StreamLimits } from "../../src/server.js";
import type { Db } from "../../src/store/database.js";
import { startTestServer, type TestServer, waitForLog } from "../helpers/server.js";
import { failure } from "../helpers/status.js";
import { connectWorker, framedRequest, type TestWorker } from "../helpers/worker.js";

/**
 * Flow control of worker streams (issue 11): grants wait for acknowledgements
 * and for room in the stream's outbound buffer, a stream whose worker does not
 * read is ended and its session enters grace, and a storm of streams or hellos
 * is refused with a clear status while open sessions keep their heartbeats.
 * Limits are set small so that each happens after a few messages.
 */
describe("worker stream flow control", () => {
  let t: TestServer;
  let workers: TestWorker[] = [];
  const closers: (() => void)[] = [];

  const start = async (limits: StreamLimits, extra: ServerOverrides = {}) => {
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { timers: false, limits, ...extra },
    });
    return t;
  };
  const worker = async (workerId: string, capacity: number) => {
    const w = await connectWorker(t.address, { workerId, cluster: "east", capacity });
    workers.push(w);
    return w;
  };
  const submit = async (payload: Record<string, unknown> = {}) =>
    (await t.client(ActionService).submitAction({ cluster: "east", payload: payload as never })).action?.id ??
    "";
  const lease = async (id: string) => {
    const a = (await t.client(ActionService).getAction({ actionId: id })).action;
    return { state: a?.state, workerId: a?.lease?.workerId ?? "" };
  };
  const dispatch = () => t.server.leases.tick.dispatch();
  const logLine = (test: (line: Record<string, unknown>) => boolean) => waitForLog(t.logs, test);

  /**
   * A worker on a bare HTTP/2 stream that says hello and never reads: no data is consumed, so
   * no WINDOW_UPDATE goes out and the server can send at most one flow-control window. (A
   * grpc-js client that pauses still takes in a dozen messages before it stops.)
   */
  const deafWorker = (workerId: string, capacity: number, acceptsBatches = false) => {
    const session = http2Connect(`http://${t.address}`);
    closers.push(() => session.destroy());
    session.on("error", () => {});
    const stream = session.request({
      ":method": "POST",
      ":path": "/leasehold.v1.WorkerService/Connect",
      "content-type": "application/grpc",
      te: "trailers",
    });
    stream.on("error", () => {});
    const closed = new Promise<number>((resolve) => stream.on("close", () => resolve(stream.rstCode ?? 0)));
    stream.write(
      framedRequest({
        message: { case: "hello", value: { workerId, cluster: "east", capacity, acceptsBatches } },
      }),
    );
    stream.pause();
    return { stream, closed };
  };

  afterEach(async () => {
    for (const w of workers) w.drop();
    for (const c of closers.splice(0)) c();
    workers = [];
    await t[Symbol.asyncDispose]();
  });

  it("grants a worker that does not acknowledge at most the grant window; the rest go to other workers", async () => {
    await start({ grantWindow: 2 });
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push(await submit());
    const silent = await worker("silent", 100);
    await dispatch();
    const first = await Promise.all(ids.map(lease));
    expect(first.filter((l) => l.workerId === "silent")).toHaveLength(2);
    expect(first.filter((l) => l.state === ActionState.QUEUED)).toHaveLength(3);

    const other = await worker("other", 1);
    await dispatch();
    const grant = await other.next("grant");
    const second = await Promise.all(ids.map(lease));
    expect(second.filter((l) => l.workerId === "silent")).toHaveLength(2);
    expect(second.filter((l) => l.workerId === "other").map((l) => l.state)).toEqual([ActionState.LEASED]);
    expect(second.filter((l) => l.state === ActionState.QUEUED)).toHaveLength(2);
    expect(ids).toContain(grant.actionId);
    expect(silent.received.filter((m) => m.message.case === "grant")).toHaveLength(2);
  });

  it("grants more to a worker once it acknowledges the grants it has", async () => {
    await start({ grantWindow: 2 });
    for (let i = 0; i < 4; i++) await submit();
    const w = await worker("acker", 100);
    await dispatch();
    const g1 = await w.next("grant");
    const g2 = await w.next("grant");
    // An acknowledgement reopens the window: a dispatch follows without being asked for.
    w.send({
      message: { case: "grantAck", value: { reportId: 1n, actionId: g1.actionId, epoch: g1.epoch } },
    });
    const g3 = await w.next("grant");
    // Any report on the lease acknowledges it too.
    await w.complete(g2, { output: {} });
    const g4 = await w.next("grant");
    expect(new Set([g1, g2, g3, g4].map((g) => g.actionId)).size).toBe(4);
    const ack = await w.next("reportResult", (r) => r.reportId === 1n);
    expect(ack.accepted).toBe(true);
  });

  it("stops granting to a worker that does not read, then ends its stream RESOURCE_EXHAUSTED and keeps its session in grace", async () => {
    // The stall bound is long enough that the stream is still open when the second batch is
    // dispatched (asserted below): the high-water mark, not the reset, keeps grants away from it.
    await start({ grantHighWaterBytes: 128 * 1024, stalledStreamMs: 5000 });
    const big = { blob: "x".repeat(200 * 1024) };
    const first = [];
    for (let i = 0; i < 4; i++) first.push(await submit(big));

    const { closed } = deafWorker("deaf", 100);
    await logLine((l) => l.msg === "worker session started" && l.workerId === "deaf");
    await dispatch();
    const granted = await Promise.all(first.map(lease));
    expect(granted.every((l) => l.workerId === "deaf")).toBe(true);

    // Its buffer is over the high-water mark: the next actions go to a worker that reads.
    const second = [];
    for (let i = 0; i < 3; i++) second.push(await submit(big));
    const reader = await worker("reader", 10);
    await dispatch();
    for (let i = 0; i < 3; i++) await reader.next("grant");
    const after = await Promise.all(second.map(lease));
    expect(after.map((l) => l.workerId)).toEqual(["reader", "reader", "reader"]);
    const ended = t.logs.find((l) => String(l.msg).startsWith("ending the stream of worker deaf"));
    expect(ended, "the stall bound ran out before the second batch; the test proves nothing").toBeUndefined();

    // Still not reading: the stream is reset (ENHANCE_YOUR_CALM, which gRPC clients read as
    // RESOURCE_EXHAUSTED), and the session only loses its stream.
    await logLine((l) => String(l.msg).startsWith("ending the stream of worker deaf"));
    expect(await closed).toBe(http2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
    await logLine((l) => l.msg === "worker stream lost" && l.workerId === "deaf");
    const held = await Promise.all(first.map(lease));
    expect(held.every((l) => l.state === ActionState.LEASED && l.workerId === "deaf")).toBe(true);
    expect(t.logs.some((l) => l.msg === "worker said goodbye")).toBe(false);

    // It reconnects within grace and resumes its session and leases.
    const back = await connectWorker(t.address, { workerId: "deaf", cluster: "east", capacity: 100 });
    workers.push(back);
    expect(back.welcome.sessionResumed).toBe(true);
  }, 90_000); // large payloads through a busy machine: slow, not timed

  it("reads nothing more from a worker that sends without reading, and ends its stream", async () => {
    await start({ stalledStreamMs: 2000 });
    // It sends a flood of heartbeats one message each (no batches): every one would be
    // answered with an ack of its own.
    const { stream, closed } = deafWorker("flood", 1);
    await logLine((l) => l.msg === "worker session started" && l.workerId === "flood");
    const sent = 50_000;
    const heartbeats = [];
    for (let i = 1; i <= sent; i++)
      heartbeats.push(framedRequest({ message: { case: "heartbeat", value: { sequence: BigInt(i) } } }));
    stream.write(Buffer.concat(heartbeats));

    // Its unread acks stay under the message bound, so the byte mark (1 MiB) is never reached:
    // the stream ends on the message count, after the stall bound.
    const ended = await logLine((l) => String(l.msg).startsWith("ending the stream of worker flood"));
    expect(ended.msg).toMatch(
      /stayed over \d+ bytes or 1024 messages for 2000 ms; the worker is not reading/,
    );
    expect(await closed).toBe(http2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
    const metrics = await t.server.metrics.registry.getSingleMetricAsString(
      "leasehold_heartbeat_ack_seconds",
    );
    const acked = Number(metrics.match(/^leasehold_heartbeat_ack_seconds_count (\d+)$/m)?.[1]);
    // Without the pause every heartbeat the transport let through was read and acked.
    expect(acked).toBeGreaterThan(0);
    expect(acked).toBeLessThan(sent / 5);
    // Others were never held up: a worker that reads is answered at once.
    const reader = await worker("reader", 1);
    expect(await reader.heartbeat(1)).toMatchObject({ sequence: 1n });
  }, 60_000);

  it("ends a stream it stopped reading after half a grace period, so that its worker resumes its session", async () => {
    // The server's own bound, with its loops on: heartbeats it does not read renew nothing, so a
    // bound of a whole grace period left the session expired by the time the stream ended.
    t = await startTestServer({ config: { gracePeriod: "6s", heartbeatInterval: "1s" } });
    const { stream, closed } = deafWorker("stuck", 1);
    await logLine((l) => l.msg === "worker session started" && l.workerId === "stuck");
    const heartbeats = [];
    for (let i = 1; i <= 50_000; i++)
      heartbeats.push(framedRequest({ message: { case: "heartbeat", value: { sequence: BigInt(i) } } }));
    stream.write(Buffer.concat(heartbeats));
    const ended = await logLine((l) => String(l.msg).startsWith("ending the stream of worker stuck"));
    expect(ended.msg).toMatch(/messages for 3000 ms; the worker is not reading/);
    expect(await closed).toBe(http2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
    const back = await worker("stuck", 1);
    expect(back.welcome.sessionResumed).toBe(true);
  }, 60_000);

  it("ends the stream of a worker that takes batches, sends without reading, and stops being read", async () => {
    await start({ stalledStreamMs: 2000 });
    // Its acks go out as one batch a turn: the byte mark (1 MiB), not the message count, holds
    // its reading back, inside the write of a turn's batch. The stall bound must start there.
    const { stream, closed } = deafWorker("batched", 1, true);
    await logLine((l) => l.msg === "worker session started" && l.workerId === "batched");
    const heartbeats = [];
    for (let i = 1; i <= 120_000; i++)
      heartbeats.push(framedRequest({ message: { case: "heartbeat", value: { sequence: BigInt(i) } } }));
    stream.write(Buffer.concat(heartbeats));
    await logLine((l) => String(l.msg).startsWith("ending the stream of worker batched"));
    expect(await closed).toBe(http2Constants.NGHTTP2_ENHANCE_YOUR_CALM);
  }, 60_000);

  it("announces the per-connection stream limit in its HTTP/2 settings", async () => {
    await start({ maxConcurrentStreams: 6 });
    const session = http2Connect(`http://${t.address}`);
    closers.push(() => session.close());
    session.on("error", () => {});
    const settings = await new Promise<{ maxConcurrentStreams?: number | undefined }>((resolve) =>
      session.once("remoteSettings", resolve),
    );
    expect(settings.maxConcurrentStreams).toBe(6);
  });

  it("closes connections that carry no call for the idle bound, and keeps the one a worker's stream holds", async () => {
    await start({ maxConnectionIdleMs: 300 });
    const steady = await worker("steady", 1);
    // An HTTP/2 connection that never calls, and a TCP connection that never speaks HTTP/2.
    const idle = http2Connect(`http://${t.address}`);
    closers.push(() => idle.destroy());
    idle.on("error", () => {});
    const goaway = new Promise<void>((resolve) => idle.once("goaway", () => resolve()));
    const idleClosed = new Promise<void>((resolve) => idle.once("close", () => resolve()));
    const [host, port] = t.address.split(":");
    const silent = tcpConnect(Number(port), host);
    closers.push(() => silent.destroy());
    silent.on("error", () => {});
    silent.resume();
    const silentClosed = new Promise<void>((resolve) => silent.once("close", () => resolve()));
    await Promise.all([goaway, idleClosed, silentClosed]);
    // The worker connected first, so its connection passed the bound too: its stream kept it open.
    const ack = await steady.heartbeat(1);
    expect(ack.sequence).toBe(1n);
  });

  it("refuses hellos past the open queue with RESOURCE_EXHAUSTED while open sessions keep their heartbeat acks", async () => {
    // While `held` is set, every transaction (each hello's session open) waits for it.
    let held: Promise<void> | undefined;
    let release = () => {};
    const wrapDb = (db: Db) =>
      new Proxy(db, {
        get(target, property, receiver) {
          if (property !== "transaction") return Reflect.get(target, property, receiver);
          return async (fn: (tx: unknown) => Promise<unknown>) => {
            if (held) await held;
            return target.transaction(fn as never);
          };
        },
      }) as Db;
    await start({ maxConcurrentStreams: 6, maxConcurrentOpens: 1, maxQueuedOpens: 1 }, { wrapDb });
    const steady = await worker("steady", 1);
    await dispatch();
    held = new Promise((resolve) => {
      release = resolve;
    });

    // Ten streams on one connection of their own: six at a time reach the server.
    const storm = createClient(WorkerService, t.address, undefined, { "grpc.use_local_subchannel_pool": 1 });
    closers.push(() => storm.close());
    const outcomes = Array.from({ length: 10 }, (_, i) => {
      const call = storm.connect() as grpc.ClientDuplexStream<unknown, ConnectResponse>;
      closers.push(() => call.cancel());
      call.on("error", () => {});
      const outcome = new Promise<{ welcome: boolean; status?: grpc.StatusObject }>((resolve) => {
        call.on("data", (m: ConnectResponse) => {
          if (m.message.case === "welcome") resolve({ welcome: true });
        });
        call.on("status", (s: grpc.StatusObject) => {
          resolve({ welcome: false, status: s });
        });
      });
      call.write(
        create(WorkerService.method.connect.input, {
          message: { case: "hello", value: { workerId: `storm-${i}`, cluster: "east", capacity: 1 } },
        }),
      );
      return outcome;
    });
    // One hello opens (held), one waits, the other eight are refused at once.
    const refused = outcomes.map((o) => o.then((r) => (r.welcome ? undefined : r)));
    let settled = 0;
    await new Promise<void>((resolve) => {
      for (const r of refused)
        void r.then((x) => {
          if (x && ++settled === 8) resolve();
        });
    });
    // The open session is answered from memory meanwhile.
    const ack = await steady.heartbeat(1);
    expect(ack.sequence).toBe(1n);

    release();
    held = undefined;
    const results = await Promise.all(outcomes);
    expect(results.filter((r) => r.welcome)).toHaveLength(2);
    const failures = await Promise.all(
      results.filter((r) => !r.welcome).map((r) => failure(Promise.reject(r.status))),
    );
    expect(failures.map((f) => [f.code, f.reason])).toEqual(
      Array(8).fill([Code.ResourceExhausted, "TOO_MANY_HELLOS"]),
    );

    // Refused hellos opened no session, so nothing was lost and no cluster is partitioned.
    await t.server.leases.tick.reap();
    expect(t.logs.filter((l) => l.msg === "worker session started")).toHaveLength(3);
    expect(t.logs.some((l) => String(l.msg).includes("partitioned"))).toBe(false);
  });
});
