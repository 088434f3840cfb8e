import http2 from "node:http2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ActionService, SubmitActionRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { grpcFrame, rawCall } from "../helpers/raw-grpc.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/**
 * A unary call whose deadline passed before it was served is not started:
 * it changes nothing, so a client that retries without a request_id makes no
 * duplicate. grpc-js clients never send such a call; raw HTTP/2 clients and
 * calls delayed in transit do.
 */
describe.runIf(runsDriverNeutralTests())("a call whose deadline passed on arrival", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer();
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("is answered DEADLINE_EXCEEDED and submits nothing", async () => {
    const session = http2.connect(`http://${t.address}`);
    session.on("error", () => {});
    try {
      const statuses: (string | undefined)[] = [];
      for (let i = 0; i < 5; i++) {
        const { status } = rawCall(
          session,
          "/leasehold.v1.ActionService/SubmitAction",
          grpcFrame(SubmitActionRequestSchema, { cluster: "late", payload: { n: i } }),
          // One microsecond: passed by the time the server reads the request.
          { "grpc-timeout": "1u" },
        );
        statuses.push((await status).code);
      }
      expect(statuses).toEqual(["4", "4", "4", "4", "4"]);
      const { actions } = await t.client(ActionService).listActions({ cluster: "late" });
      expect(actions).toEqual([]);
    } finally {
      session.destroy();
    }
  });
});
