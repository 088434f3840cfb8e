import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { createAgent } from "../../src/agent/index.js";
import {
  type ConnectRequest,
  ConnectRequestSchema,
  type ConnectResponse,
  ConnectResponseSchema,
} from "../../src/gen/leasehold/v1/worker_pb.js";
import { agentEvents, finishedOf } from "../helpers/agent-events.js";

type Stream = grpc.ServerDuplexStream<ConnectRequest, ConnectResponse>;

/**
 * A WorkerService of the test's own, to script what no real server does on
 * demand: lose the answers to a completion it applied. Each stream is handed
 * to `onStream` with the messages it receives.
 */
async function scriptedServer(onStream: (call: Stream, index: number) => void) {
  const server = new grpc.Server();
  let streams = 0;
  server.addService(
    {
      connect: {
        path: "/leasehold.v1.WorkerService/Connect",
        requestStream: true,
        responseStream: true,
        requestSerialize: (m: ConnectRequest) => Buffer.from(toBinary(ConnectRequestSchema, m)),
        requestDeserialize: (b: Buffer) => fromBinary(ConnectRequestSchema, b),
        responseSerialize: (m: ConnectResponse) => Buffer.from(toBinary(ConnectResponseSchema, m)),
        responseDeserialize: (b: Buffer) => fromBinary(ConnectResponseSchema, b),
      },
    },
    { connect: (call: Stream) => onStream(call, streams++) },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
      error ? reject(error) : resolve(p),
    ),
  );
  return { address: `127.0.0.1:${port}`, close: () => server.forceShutdown() };
}

const respond = (
  call: Stream,
  message: NonNullable<MessageInitShape<typeof ConnectResponseSchema>["message"]>,
) => call.write(create(ConnectResponseSchema, { message }));

describe("an SDK agent whose completion landed just before its stream broke", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("sends the completion again after the welcome revokes its lease, and no progress before it", async () => {
    const lease = { actionId: "a1", epoch: 1n };
    const second: ConnectRequest["message"][] = [];
    const server = await scriptedServer((call, index) => {
      call.on("data", (request: ConnectRequest) => {
        const m = request.message;
        if (index > 0) second.push(m);
        if (m.case === "hello") {
          respond(call, {
            case: "welcome",
            value: {
              sessionId: "s1",
              heartbeatInterval: { seconds: 1n },
              gracePeriod: { seconds: 10n },
              // On the second stream: the lease is no longer the session's, its completion landed.
              revoked: index > 0 ? [lease] : [],
            },
          });
          if (index === 0) respond(call, { case: "grant", value: { ...lease, attempt: 1, runId: "r1" } });
        } else if (m.case === "heartbeat") {
          respond(call, {
            case: "heartbeatAck",
            value: { sequence: m.value.sequence, remaining: { seconds: 10n } },
          });
        } else if (m.case === "goodbye") call.end();
        else if (m.case === "completion") {
          // The first stream breaks before it answers the progress and the completion.
          if (index === 0) call.destroy(new Error("connection lost"));
          else
            respond(call, {
              case: "reportResult",
              value: { reportId: m.value.reportId, ...lease, accepted: true, message: "a repeat" },
            });
        }
      });
      call.on("error", () => {});
    });
    cleanups.push(() => server.close());
    const events = agentEvents();
    const agent = createAgent({
      address: server.address,
      cluster: "east",
      workerId: "w1",
      initialBackoffMs: 50,
      onEvent: events.onEvent,
      handler: async (ctx) => {
        ctx.progress("working", {}, { step: 1 });
        return { done: true };
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 0 }));
    const finished = await events.until(finishedOf("a1"));
    expect(finished).toMatchObject({ outcome: "succeeded", accepted: true });
    expect(second.map((m) => m.case)).toContain("completion");
    expect(second.map((m) => m.case)).not.toContain("progress");
  });
});
