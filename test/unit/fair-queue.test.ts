import { describe, expect, it } from "vitest";
import { OPEN_ACCESS } from "../../src/auth/access.js";
import { callerOf, FairQueue } from "../../src/rpc/fair-queue.js";

describe("the queue of calls by caller", () => {
  it("takes callers in turn, one call each, each caller's calls in the order they came", () => {
    const queue = new FairQueue<string>();
    for (const call of ["a1", "a2", "a3", "a4"]) queue.push("a", call);
    queue.push("b", "b1");
    queue.push("c", "c1");
    queue.push("b", "b2");
    expect(queue.size).toBe(7);
    expect(queue.callers).toBe(3);
    const order: string[] = [];
    for (let next = queue.shift(); next !== undefined; next = queue.shift()) {
      order.push(next);
      // A caller that comes back after the round began joins it last.
      if (next === "a2") queue.push("d", "d1");
    }
    expect(order).toEqual(["a1", "b1", "c1", "a2", "b2", "a3", "d1", "a4"]);
    expect(queue.size).toBe(0);
    expect(queue.callers).toBe(0);
  });

  it("drops a call that ended, and gives up a caller's newest call", () => {
    const queue = new FairQueue<string>();
    for (const call of ["a1", "a2", "a3"]) queue.push("a", call);
    queue.push("b", "b1");
    expect(queue.largest()).toEqual({ key: "a", waiting: 3 });
    expect(queue.remove("a", "a2")).toBe(true);
    expect(queue.remove("a", "a2")).toBe(false);
    expect(queue.remove("b", "b1")).toBe(true);
    expect(queue.callers).toBe(1);
    expect(queue.popNewest("a")).toBe("a3");
    expect(queue.waitingOf("a")).toBe(1);
    expect(queue.shift()).toBe("a1");
    expect(queue.largest()).toBeUndefined();
    expect(queue.size).toBe(0);
  });

  it("tells callers apart by principal, else by address without the port", () => {
    const method = "leasehold.v1.ActionService/GetAction";
    expect(callerOf(OPEN_ACCESS, "10.0.0.1:5000", method).key).toBe("address:10.0.0.1");
    expect(callerOf(OPEN_ACCESS, "[::1]:5000", method).key).toBe("address:::1");
    const teamA = callerOf({ actor: "team-a", enforced: true }, "10.0.0.1:5000", method);
    expect(teamA).toEqual({ key: "principal:team-a", principal: "team-a", peer: "10.0.0.1:5000", method });
  });
});
