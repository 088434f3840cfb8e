import { once } from "node:events";
import http2 from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { GetActionRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { ConnectRequestSchema } from "../../src/gen/leasehold/v1/worker_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { grpcFrame, rawCall } from "../helpers/raw-grpc.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/**
 * Framings that gRPC calls protocol errors and grpc-js would let pass: each
 * ends the call INTERNAL, after the messages before it were handled
 * (worker.proto: a message that cannot be read ends the stream with its error).
 */
describe.runIf(runsDriverNeutralTests())("malformed gRPC framing", () => {
  let t: TestServer;
  let session: http2.ClientHttp2Session;
  beforeAll(async () => {
    t = await startTestServer();
    session = http2.connect(`http://${t.address}`);
    session.on("error", () => {});
  });
  afterAll(async () => {
    session?.destroy();
    await t?.[Symbol.asyncDispose]();
  });

  /** Sends `bytes` on a new call to `path` and ends it: how many bytes were answered, and the status. */
  async function call(path: string, bytes: Buffer) {
    const { stream, status } = rawCall(session, `/leasehold.v1.${path}`, bytes);
    let answered = 0;
    stream.on("data", (chunk: Buffer) => {
      answered += chunk.length;
    });
    const got = await status;
    if (!stream.closed) await once(stream, "close");
    return { answered, ...got };
  }

  it("ends a stream that stops in the middle of a message INTERNAL, after handling the messages before it", async () => {
    const hello = grpcFrame(ConnectRequestSchema, {
      message: { case: "hello", value: { workerId: "framing", cluster: "framing", capacity: 1 } },
    });
    // A length prefix of 100 bytes, and three of them.
    const partial = Buffer.from([0, 0, 0, 0, 100, 1, 2, 3]);
    const got = await call("WorkerService/Connect", Buffer.concat([hello, partial]));
    expect(got).toMatchObject({
      code: "13",
      message: expect.stringMatching(/^the stream ended in the middle of a message/),
    });
    // The hello before it was handled: its welcome came first.
    expect(got.answered).toBeGreaterThan(0);
  });

  it("refuses a message whose compressed flag is set without a grpc-encoding, or is not 0 or 1", async () => {
    const flagged = await call(
      "ActionService/GetAction",
      grpcFrame(GetActionRequestSchema, { actionId: "x" }, 1),
    );
    expect(flagged).toMatchObject({
      code: "13",
      message: expect.stringMatching(
        /^a message has its compressed flag set but the call names no grpc-encoding/,
      ),
    });
    const two = await call(
      "ActionService/GetAction",
      grpcFrame(GetActionRequestSchema, { actionId: "x" }, 2),
    );
    expect(two).toMatchObject({
      code: "13",
      message: expect.stringMatching(/compressed flag is 2: it must be 0/),
    });
    // The same message, flag 0: answered as usual.
    const plain = await call("ActionService/GetAction", grpcFrame(GetActionRequestSchema, { actionId: "x" }));
    expect(plain.code).toBe("5");
  });
});
