import { describe, expect, it } from "vitest";
import { createBatcher } from "../../src/store/batcher.js";

describe("the group-commit batcher", () => {
  it("applies calls made together in one flush and answers each with its own result", async () => {
    const flushes: number[][] = [];
    const batcher = createBatcher(async (items: readonly number[]) => {
      flushes.push([...items]);
      return items.map((n) => n * 10);
    });
    const results = await Promise.all([1, 2, 3].map((n) => batcher.add(n)));
    expect(results).toEqual([10, 20, 30]);
    expect(flushes).toEqual([[1, 2, 3]]);
  });

  it("queues calls arriving during a flush for the next one, up to maxBatch", async () => {
    const flushes: number[][] = [];
    let release: () => void = () => {};
    const gate = new Promise<void>((r) => {
      release = r;
    });
    const batcher = createBatcher(
      async (items: readonly number[]) => {
        flushes.push([...items]);
        if (flushes.length === 1) await gate;
        return items;
      },
      { maxBatch: 2 },
    );
    const first = batcher.add(0);
    await new Promise((r) => setImmediate(r));
    const rest = [1, 2, 3].map((n) => batcher.add(n));
    release();
    expect(await Promise.all([first, ...rest])).toEqual([0, 1, 2, 3]);
    expect(flushes).toEqual([[0], [1, 2], [3]]);
  });

  it("rejects every call of a failed flush, and keeps working afterwards", async () => {
    let fail = true;
    const batcher = createBatcher(async (items: readonly string[]) => {
      if (fail) throw new Error("database down");
      return items;
    });
    const failed = await Promise.allSettled([batcher.add("a"), batcher.add("b")]);
    expect(failed.map((r) => r.status)).toEqual(["rejected", "rejected"]);
    fail = false;
    expect(await batcher.add("c")).toBe("c");
    await batcher.close();
  });
});
