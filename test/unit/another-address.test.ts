import { describe, expect, it } from "vitest";
import { anotherAddress } from "../../src/rpc/targets.js";

const targets = (...addresses: string[]) => addresses.map((address) => ({ address }));

describe("the address an agent tries after leaving one", () => {
  it("is one of the others, each as likely", () => {
    const three = targets("a:1", "b:1", "c:1");
    const picked = [0, 0.49, 0.5, 0.99].map((r) => anotherAddress(three, 0, () => r));
    expect(picked).toEqual([1, 1, 2, 2]);
    expect(anotherAddress(three, 2, () => 0)).toBe(0);
    // The index is taken modulo the list, which a fresh name resolution may have shortened.
    expect(anotherAddress(three, 4, () => 0.99)).toBe(2);
  });

  it("spreads the agents of a server that went away over the rest", () => {
    const four = targets("a:1", "b:1", "c:1", "d:1");
    const counts = new Map<number, number>();
    for (let i = 0; i < 3000; i++) {
      const at = anotherAddress(four, 0);
      counts.set(at, (counts.get(at) ?? 0) + 1);
    }
    expect(counts.get(0)).toBeUndefined();
    for (const at of [1, 2, 3]) expect(counts.get(at)).toBeGreaterThan(800);
  });

  it("skips entries naming the same address, and stays when there is no other", () => {
    expect(anotherAddress(targets("a:1", "a:1", "b:1"), 0, () => 0)).toBe(2);
    expect(anotherAddress(targets("a:1"), 5)).toBe(0);
    expect(anotherAddress(targets("a:1", "a:1"), 1)).toBe(1);
  });
});
