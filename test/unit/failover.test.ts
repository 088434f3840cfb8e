import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import type { Client } from "../../src/rpc/client.js";
import { refusedUnserved, withFailover } from "../../src/rpc/failover.js";
import { toStatusObject } from "../../src/rpc/status.js";

const service = ActionService as unknown as GenService<GenServiceMethods>;
const log = pino({ level: "silent" });

/** A failed call as a client sees it: the status with its details in the trailers. */
const failed = (code: Code, reason: string) =>
  Object.assign(new Error(reason), toStatusObject(new LeaseholdError(code, reason, { reason }), log, "test"));

/** A fake client whose getAction answers with `answer` (thrown when it is an Error), counting calls. */
function fake(answer: unknown) {
  const counts = { calls: 0, closed: 0 };
  const client = {
    getAction: async () => {
      counts.calls++;
      if (answer instanceof Error) throw answer;
      return answer;
    },
    watchAction: () => "stream",
    close: () => {
      counts.closed++;
    },
  };
  return { client: client as unknown as Client<GenServiceMethods>, counts };
}

type Calls = Record<string, (...args: unknown[]) => unknown> & { close(): void };

describe("failover across --server addresses", () => {
  it("tells a call refused unserved from one whose outcome is unknown", () => {
    expect(refusedUnserved(failed(Code.Unavailable, "DATABASE_UNREACHABLE"))).toBe(true);
    expect(refusedUnserved(failed(Code.Unavailable, "STARTING"))).toBe(true);
    expect(refusedUnserved(failed(Code.Unavailable, "OUTCOME_UNKNOWN"))).toBe(false);
    expect(refusedUnserved(failed(Code.Unavailable, "SHUTTING_DOWN"))).toBe(false);
    expect(refusedUnserved(failed(Code.FailedPrecondition, "DATABASE_UNREACHABLE"))).toBe(false);
    expect(refusedUnserved(new Error("plain"))).toBe(false);
  });

  it("takes a call refused unserved to the next address that serves it", async () => {
    const primary = fake(failed(Code.Unavailable, "DATABASE_UNREACHABLE"));
    const byAddress = {
      a: fake(failed(Code.Unavailable, "DATABASE_UNREACHABLE")),
      b: fake({ answered: "b" }),
      c: fake({ answered: "c" }),
    };
    const client = withFailover(service, primary.client, ["a", "b", "c"], (address) => {
      return byAddress[address as keyof typeof byAddress].client;
    }) as unknown as Calls;
    expect(await client.getAction?.({})).toEqual({ answered: "b" });
    expect([primary.counts.calls, byAddress.a.counts.calls, byAddress.c.counts.calls]).toEqual([1, 1, 0]);
    // Streams stay with the client of every address.
    expect(client.watchAction?.({})).toBe("stream");
    client.close();
    expect([primary.counts.closed, byAddress.a.counts.closed, byAddress.c.counts.closed]).toEqual([1, 1, 0]);
  });

  it("goes nowhere else with a call that may have taken effect, or with one address", async () => {
    const unknown = failed(Code.Unavailable, "OUTCOME_UNKNOWN");
    const other = fake({ answered: "other" });
    const client = withFailover(
      service,
      fake(unknown).client,
      ["a", "b"],
      () => other.client,
    ) as unknown as Calls;
    await expect(client.getAction?.({})).rejects.toBe(unknown);
    expect(other.counts.calls).toBe(0);
    const single = fake(failed(Code.Unavailable, "DATABASE_UNREACHABLE")).client;
    expect(withFailover(service, single, ["a"], () => other.client)).toBe(single);
  });

  it("answers the last refusal when every address refuses", async () => {
    const last = failed(Code.Unavailable, "STARTING");
    const client = withFailover(
      service,
      fake(failed(Code.Unavailable, "DATABASE_UNREACHABLE")).client,
      ["a", "b"],
      (address) => fake(address === "b" ? last : failed(Code.Unavailable, "DATABASE_UNREACHABLE")).client,
    ) as unknown as Calls;
    await expect(client.getAction?.({})).rejects.toBe(last);
  });
});
