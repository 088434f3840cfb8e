import { once } from "node:events";
import http2 from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ActionService, SubmitActionRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
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
        const body = toBinary(
          SubmitActionRequestSchema,
          create(SubmitActionRequestSchema, { cluster: "late", payload: { n: i } }),
        );
        const frame = Buffer.alloc(5 + body.length);
        frame.writeUInt32BE(body.length, 1);
        frame.set(body, 5);
        const stream = session.request({
          ":method": "POST",
          ":path": "/leasehold.v1.ActionService/SubmitAction",
          "content-type": "application/grpc",
          te: "trailers",
          // One microsecond: passed by the time the server reads the request.
          "grpc-timeout": "1u",
        });
        stream.on("error", () => {});
        stream.end(frame);
        stream.resume();
        const [headers] = (await Promise.race([once(stream, "trailers"), once(stream, "response")])) as [
          http2.IncomingHttpHeaders,
        ];
        const status =
          headers["grpc-status"] ??
          ((await once(stream, "trailers")) as [http2.IncomingHttpHeaders])[0]["grpc-status"];
        statuses.push(status as string | undefined);
      }
      expect(statuses).toEqual(["4", "4", "4", "4", "4"]);
      const { actions } = await t.client(ActionService).listActions({ cluster: "late" });
      expect(actions).toEqual([]);
    } finally {
      session.destroy();
    }
  });
});
