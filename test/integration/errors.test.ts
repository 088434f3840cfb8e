import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { type Client, createClient } from "../../src/rpc/client.js";
import { bind, createRpcServer } from "../../src/rpc/server.js";
import { expectStatus } from "../helpers/status.js";

/**
 * The adapter's error boundary, on a real grpc-js server with handlers made
 * to fail in each way a handler can.
 */
describe("the rpc adapter", () => {
  const logged: { msg: string; err?: { message?: string } }[] = [];
  let server: Awaited<ReturnType<typeof createRpcServer>>;
  let client: Client<(typeof ActionService)["method"]>;

  beforeAll(async () => {
    const log = pino({ level: "error" }, { write: (line: string) => logged.push(JSON.parse(line)) });
    server = await createRpcServer("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), {
      log,
      services: [
        bind(ActionService, {
          // A rejected promise with a secret in its message.
          async getAction() {
            throw new Error("password=hunter2 in connection string");
          },
          // A synchronous throw of something that is not even an Error.
          listActions: (() => {
            throw "a bare string";
          }) as never,
          // A coded error passes through as it is.
          async cancelAction() {
            throw new LeaseholdError(Code.FailedPrecondition, "the action already finished", {
              reason: "ACTION_FINISHED",
            });
          },
          // A storage error with a SQLSTATE maps to its status.
          async submitAction() {
            throw Object.assign(new Error("duplicate key value violates unique constraint"), {
              code: "23505",
            });
          },
          // A stream that fails after its first message.
          async *watchAction() {
            yield { action: { id: "a" } };
            throw new TypeError("cannot read properties of undefined (reading 'secret')");
          },
        }),
      ],
    });
    server.markServing();
    client = createClient(ActionService, `127.0.0.1:${server.port}`);
  });
  afterAll(async () => {
    client?.close();
    await server?.close();
  });

  it("turns an unknown rejected error into INTERNAL without leaking its message, and logs the cause", async () => {
    const f = await expectStatus(
      client.getAction({ actionId: "x" }),
      Code.Internal,
      /^internal error; the server log/,
    );
    expect(f.message).not.toMatch(/hunter2/);
    expect(logged.some((l) => l.err?.message?.includes("hunter2"))).toBe(true);
  });

  it("turns a synchronous throw of a non-error into INTERNAL", async () => {
    await expectStatus(client.listActions({}), Code.Internal, /^internal error/);
  });

  it("keeps a LeaseholdError's code, message and reason", async () => {
    const f = await expectStatus(
      client.cancelAction({ actionId: "x" }),
      Code.FailedPrecondition,
      /already finished/,
    );
    expect(f.reason).toBe("ACTION_FINISHED");
  });

  it("maps a unique violation (SQLSTATE 23505) to ALREADY_EXISTS", async () => {
    await expectStatus(client.submitAction({ cluster: "c" }), Code.AlreadyExists, /already exists/);
  });

  it("ends a failing stream with INTERNAL after the messages it sent", async () => {
    const received: string[] = [];
    const f = await expectStatus(
      (async () => {
        for await (const m of client.watchAction({ actionId: "a" })) received.push(m.action?.id ?? "");
      })(),
      Code.Internal,
      /^internal error/,
    );
    expect(received).toEqual(["a"]);
    expect(f.message).not.toMatch(/secret/);
  });

  it("answers UNIMPLEMENTED, naming the method, for methods a service leaves out", async () => {
    const partial = await createRpcServer("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), {
      log: pino({ level: "silent" }),
      services: [bind(ActionService, {})],
    });
    const c = createClient(ActionService, `127.0.0.1:${partial.port}`);
    try {
      await expectStatus(
        c.getAction({ actionId: "x" }),
        Code.Unimplemented,
        /^leasehold\.v1\.ActionService\.GetAction is not implemented/,
      );
    } finally {
      c.close();
      await partial.close();
    }
  });

  it("is still serving after all of the above", async () => {
    const f = await expectStatus(
      client.cancelAction({ actionId: "y" }),
      Code.FailedPrecondition,
      /already finished/,
    );
    expect(f.code).toBe(Code.FailedPrecondition);
  });
});
