import { create, toBinary } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { ActionState, SubmitActionsResponseSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { createLargeCallLimit, LARGE_REQUEST_BYTES, turns } from "../../src/rpc/large-calls.js";
import { encodeResultsInTurns } from "../../src/rpc/services/action-service.js";

const LARGE = LARGE_REQUEST_BYTES;
const live = () => new AbortController().signal;

/** Whether `promise` has settled by the next turn of the event loop. */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  promise.then(
    () => {
      done = true;
    },
    () => {
      done = true;
    },
  );
  await new Promise((resolve) => setImmediate(resolve));
  await new Promise((resolve) => setImmediate(resolve));
  return done;
}

describe("turns for large calls", () => {
  it("lets small calls through at once, whatever runs", async () => {
    const limit = createLargeCallLimit();
    const first = limit.admit(LARGE, live());
    expect(typeof first).toBe("function");
    expect(typeof limit.admit(LARGE - 1, live())).toBe("function");
    expect(limit.counts).toEqual({ running: 1, waiting: 0 });
  });

  it("serves large calls one at a time, in the order they came", async () => {
    const limit = createLargeCallLimit();
    const first = limit.admit(LARGE, live()) as () => void;
    const second = Promise.resolve(limit.admit(LARGE, live()));
    const third = Promise.resolve(limit.admit(2 * LARGE, live()));
    expect(limit.counts).toEqual({ running: 1, waiting: 2 });
    expect(await settled(second)).toBe(false);
    first();
    first(); // twice is once
    const secondDone = await second;
    expect(await settled(third)).toBe(false);
    expect(limit.counts).toEqual({ running: 1, waiting: 1 });
    secondDone();
    (await third)();
    expect(limit.counts).toEqual({ running: 0, waiting: 0 });
  });

  it("serves one caller's large call before the backlog of another's", async () => {
    const limit = createLargeCallLimit();
    const served: string[] = [];
    const take = (key: string) =>
      Promise.resolve(limit.admit(LARGE, live(), { key })).then((done) => {
        served.push(key);
        return done;
      });
    const first = await take("team-a");
    const backlog = [take("team-a"), take("team-a"), take("team-a")];
    const victim = take("team-b");
    expect(limit.counts).toEqual({ running: 1, waiting: 4 });
    first();
    for (const call of [...backlog, victim]) call.then((done) => done());
    await Promise.all([...backlog, victim]);
    expect(served).toEqual(["team-a", "team-a", "team-b", "team-a", "team-a"]);
  });

  it("drops a waiting call that ends, and gives its bytes back", async () => {
    let held = 0;
    const limit = createLargeCallLimit({
      hold: (bytes) => {
        held += bytes;
        return () => {
          held -= bytes;
        };
      },
    });
    const first = limit.admit(LARGE, live()) as () => void;
    const controller = new AbortController();
    const waiting = Promise.resolve(limit.admit(LARGE, controller.signal));
    const next = Promise.resolve(limit.admit(LARGE, live()));
    expect(held).toBe(2 * LARGE);
    const cancelled = new LeaseholdError(Code.Canceled, "cancelled by the client");
    controller.abort(cancelled);
    await expect(waiting).rejects.toBe(cancelled);
    expect(held).toBe(LARGE);
    first();
    (await next)();
    expect(held).toBe(0);
    expect(limit.counts).toEqual({ running: 0, waiting: 0 });
  });

  it("refuses a call to wait when its bytes cannot be held", async () => {
    const limit = createLargeCallLimit({ hold: () => undefined });
    limit.admit(LARGE, live());
    await expect(Promise.resolve(limit.admit(LARGE, live()))).rejects.toMatchObject({
      code: Code.ResourceExhausted,
      reason: "PARTIAL_REQUESTS_OVER_BUDGET",
      message: expect.stringMatching(/waiting their turn; retry later$/),
    });
    expect(limit.counts).toEqual({ running: 1, waiting: 0 });
  });

  it("runs as many at once as it is told", async () => {
    const limit = createLargeCallLimit({ running: 2 });
    expect(typeof limit.admit(LARGE, live())).toBe("function");
    expect(typeof limit.admit(LARGE, live())).toBe("function");
    expect(limit.admit(LARGE, live())).toBeInstanceOf(Promise);
  });
});

describe("a bulk submit's answer encoded in turns", () => {
  it("is the bytes toBinary makes of the whole message", async () => {
    const results = Array.from({ length: 300 }, (_, i) => ({
      action: {
        id: `a-${i}`,
        cluster: "east",
        state: ActionState.QUEUED,
        payload: { n: i, text: "x".repeat(i), nested: { list: [i, "y", true, null] } },
      },
      created: i % 2 === 0,
    }));
    // A budget of 0 ends a turn before every item.
    const paced = turns(0);
    const bytes = await encodeResultsInTurns(results, (r) => r, paced);
    const whole = toBinary(SubmitActionsResponseSchema, create(SubmitActionsResponseSchema, { results }));
    expect(Buffer.compare(bytes, Buffer.from(whole))).toBe(0);
    expect(await encodeResultsInTurns([], (r) => r, paced)).toHaveLength(0);
  });
});
