/**
 * The promise client's unary path against a bare grpc-js server that sees
 * only bytes: what goes out is the request serialized, what comes back is
 * decoded by the client after the call, and an answer that is not the
 * method's message fails the call with INTERNAL, as grpc-js's own decoding
 * would.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  ActionService,
  ActionState,
  GetActionRequestSchema,
  GetActionResponseSchema,
} from "../../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../../src/rpc/client.js";

const bytes = (b: Buffer) => b;

describe("createClient, unary calls", () => {
  const server = new grpc.Server();
  let address = "";
  /** What the server answers next, as raw bytes. */
  let answer: Buffer = Buffer.alloc(0);
  let received: Buffer[] = [];

  beforeAll(async () => {
    server.register<Buffer, Buffer>(
      "/leasehold.v1.ActionService/GetAction",
      (call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => {
        received.push(call.request);
        callback(null, answer);
      },
      bytes,
      bytes,
      "unary",
    );
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
        error ? reject(error) : resolve(p),
      ),
    );
    address = `127.0.0.1:${port}`;
  });
  afterAll(() => server.forceShutdown());

  it("sends the request's bytes and decodes the answer", async () => {
    received = [];
    answer = Buffer.from(
      toBinary(
        GetActionResponseSchema,
        create(GetActionResponseSchema, { action: { id: "a1", cluster: "east", state: ActionState.QUEUED } }),
      ),
    );
    const client = createClient(ActionService, address);
    try {
      const response = await client.getAction({ actionId: "a1" });
      expect(response.$typeName).toBe("leasehold.v1.GetActionResponse");
      expect(response.action).toMatchObject({ id: "a1", cluster: "east", state: ActionState.QUEUED });
      expect(received).toHaveLength(1);
      expect(fromBinary(GetActionRequestSchema, received[0] as Buffer).actionId).toBe("a1");
    } finally {
      client.close();
    }
  });

  it("rejects, never throws, when the request cannot be encoded, and sends nothing", async () => {
    received = [];
    const client = createClient(ActionService, address);
    try {
      // pageSize is an int32: a string cannot be written.
      const call = client.listActions({ pageSize: "abc" as unknown as number });
      const failed = await call.then(
        () => undefined,
        (error: unknown) => error as grpc.ServiceError,
      );
      expect(failed?.code).toBe(grpc.status.INTERNAL);
      expect(failed?.details).toMatch(/^Request message serialization failure: .*page_size/);
      expect(received).toEqual([]);
    } finally {
      client.close();
    }
  });

  it("fails with INTERNAL, naming the parse error, when the answer is not the method's message", async () => {
    // Field 1 (action) as length-delimited, claiming 100 bytes that never come.
    answer = Buffer.from([0x0a, 0x64, 0x01]);
    const client = createClient(ActionService, address);
    try {
      const failed = await client.getAction({ actionId: "a1" }).then(
        () => undefined,
        (error: unknown) => error as grpc.ServiceError,
      );
      expect(failed?.code).toBe(grpc.status.INTERNAL);
      expect(failed?.details).toMatch(/^Response message parsing error: /);
      expect(failed?.metadata).toBeInstanceOf(grpc.Metadata);
    } finally {
      client.close();
    }
  });
});
