import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { describe, expect, it } from "vitest";
import { OPEN_ACCESS } from "../../src/auth/access.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import type { HandlerContext } from "../../src/rpc/adapter.js";
import type { ServiceBinding } from "../../src/rpc/server.js";
import { createStartupGate } from "../../src/rpc/startup-gate.js";
import { isTransientConnectError } from "../../src/store/database.js";

const service = ActionService as unknown as GenService<GenServiceMethods>;

function context(): { ctx: HandlerContext; cancel(): void } {
  const controller = new AbortController();
  return {
    ctx: {
      signal: controller.signal,
      deadline: undefined,
      peer: "test",
      metadata: {} as never,
      access: OPEN_ACCESS,
      requestBytes: 0,
    },
    cancel: () => controller.abort(new LeaseholdError(Code.Canceled, "cancelled by the client")),
  };
}

type Unary = (request: unknown, ctx: HandlerContext) => Promise<unknown>;
type Stream = (request: unknown, ctx: HandlerContext) => AsyncIterable<unknown>;

/** The deferred binding's methods, and the real implementation it forwards to. */
function setup() {
  const gate = createStartupGate();
  const deferred = gate.defer(service).impl as unknown as { getAction: Unary; watchAction: Stream };
  const real = {
    service,
    impl: {
      getAction: async (request: unknown) => ({ answered: request }),
      async *watchAction() {
        yield 1;
        yield 2;
      },
    },
  } as unknown as ServiceBinding;
  return { gate, deferred, real };
}

describe("the startup gate", () => {
  it("holds a call made while the server starts and serves it once open", async () => {
    const { gate, deferred, real } = setup();
    const answer = deferred.getAction("req", context().ctx);
    gate.open([real]);
    expect(await answer).toEqual({ answered: "req" });
  });

  it("streams through to the real implementation", async () => {
    const { gate, deferred, real } = setup();
    gate.open([real]);
    const got: unknown[] = [];
    for await (const m of deferred.watchAction("req", context().ctx)) got.push(m);
    expect(got).toEqual([1, 2]);
  });

  it("answers UNAVAILABLE naming the cause while blocked, also to the calls already waiting", async () => {
    const { gate, deferred } = setup();
    const waiting = deferred.getAction("req", context().ctx);
    gate.block("connect ECONNREFUSED 127.0.0.1:5432");
    const expected = {
      code: Code.Unavailable,
      reason: "STARTING",
      message: expect.stringMatching(/waits for its database \(connect ECONNREFUSED 127\.0\.0\.1:5432\)/),
    };
    await expect(waiting).rejects.toMatchObject(expected);
    await expect(deferred.getAction("req", context().ctx)).rejects.toMatchObject(expected);
  });

  it("once open, answers UNAVAILABLE at once while paused for an unreachable database, then serves again", async () => {
    const { gate, deferred, real } = setup();
    gate.open([real]);
    gate.pause("no answer within 2000ms");
    const refused = {
      code: Code.Unavailable,
      reason: "DATABASE_UNREACHABLE",
      message: "the database cannot be reached (no answer within 2000ms); retry later",
    };
    await expect(deferred.getAction("req", context().ctx)).rejects.toMatchObject(refused);
    await expect(
      (async () => {
        for await (const _ of deferred.watchAction("req", context().ctx)) {
          // none: refused before the first message
        }
      })(),
    ).rejects.toMatchObject(refused);
    gate.resume();
    expect(await deferred.getAction("req", context().ctx)).toEqual({ answered: "req" });
  });

  it("answers the unary calls it serves at once when paused, and leaves streams running", async () => {
    const gate = createStartupGate();
    const deferred = gate.defer(service).impl as unknown as {
      getAction: Unary;
      cancelAction: Unary;
      watchAction: Stream;
    };
    let answerHung: (value: unknown) => void = () => {};
    const hung = new Promise((resolve) => {
      answerHung = resolve;
    });
    let streamed = 0;
    gate.open([
      {
        service,
        impl: {
          getAction: () => hung,
          cancelAction: () => hung,
          async *watchAction() {
            yield 1;
            await hung;
            streamed += 1;
            yield 2;
          },
        },
      } as unknown as ServiceBinding,
    ]);
    const served = deferred.cancelAction("req", context().ctx);
    const read = deferred.getAction("req", context().ctx);
    const stream = deferred.watchAction("req", context().ctx)[Symbol.asyncIterator]();
    expect((await stream.next()).value).toBe(1);
    const second = stream.next();
    gate.pause("no answer within 2000ms");
    await expect(served).rejects.toMatchObject({
      code: Code.Unavailable,
      reason: "OUTCOME_UNKNOWN",
      message: expect.stringMatching(
        /^the database stopped answering while this call was served \(no answer within 2000ms\); a change it asked for may or may not have been made/,
      ),
    });
    // A call that only reads changed nothing: it is answered as a new call is.
    await expect(read).rejects.toMatchObject({
      code: Code.Unavailable,
      reason: "DATABASE_UNREACHABLE",
      message: "the database cannot be reached (no answer within 2000ms); retry later",
    });
    // The late answer goes nowhere; the stream goes on once the database does.
    answerHung({ late: true });
    expect((await second).value).toBe(2);
    expect(streamed).toBe(1);
    gate.resume();
    await expect(deferred.getAction("req", context().ctx)).resolves.toEqual({ late: true });
  });

  it("holds calls again once unblocked", async () => {
    const { gate, deferred, real } = setup();
    gate.block("down");
    gate.unblock();
    const answer = deferred.getAction("req", context().ctx);
    gate.open([real]);
    expect(await answer).toEqual({ answered: "req" });
  });

  it("fails waiting calls with the error it is closed with", async () => {
    const { gate, deferred } = setup();
    const waiting = deferred.getAction("req", context().ctx);
    gate.close(new LeaseholdError(Code.Unavailable, "stopped before it was ready"));
    await expect(waiting).rejects.toThrow(/stopped before it was ready/);
  });

  it("lets a waiting call go when its client cancels", async () => {
    const { gate, deferred } = setup();
    const { ctx, cancel } = context();
    const waiting = deferred.getAction("req", ctx);
    cancel();
    await expect(waiting).rejects.toMatchObject({ code: Code.Canceled });
    gate.close(new LeaseholdError(Code.Unavailable, "stopped"));
  });

  it("refuses to open without an implementation for every deferred service", () => {
    const { gate } = setup();
    expect(() => gate.open([])).toThrow(/missing \[leasehold\.v1\.ActionService\]/);
  });
});

describe("a database error at start", () => {
  it.each([
    ["connection refused", { code: "ECONNREFUSED" }],
    ["the database system is starting up", { code: "57P03" }],
    ["too many connections", { code: "53300" }],
    [
      "a read-only database (a standby not promoted yet)",
      { message: "Failed query", cause: { code: "25006" } },
    ],
    ["a connect timeout", { code: "CONNECT_TIMEOUT" }],
    ["a name that does not resolve yet", { code: "ENOTFOUND" }],
    ["a wrapped connection reset", { message: "migration failed", cause: { code: "ECONNRESET" } }],
  ])("is waited out when it is %s", (_, error) => {
    expect(isTransientConnectError(error)).toBe(true);
  });

  it.each([
    ["a wrong password", { code: "28P01" }],
    ["no pg_hba entry", { code: "28000" }],
    ["a database that does not exist", { code: "3D000" }],
    ["a malformed URL", new TypeError("Invalid URL")],
  ])("is not waited out when it is %s", (_, error) => {
    expect(isTransientConnectError(error)).toBe(false);
  });
});
