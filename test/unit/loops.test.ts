import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { createLoops } from "../../src/work/lease/every.js";

describe("the loops of a process", () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  /** A run that fails the first `failures` times, counting its runs. */
  const failing = (failures: number) => {
    const runs = { n: 0 };
    const fn = async () => {
      runs.n++;
      if (runs.n <= failures) throw new Error("the database is gone");
    };
    return { runs, fn };
  };

  it("runs a failed run again after retryMs, not only at the next tick, until one works", async () => {
    const loops = createLoops(pino({ level: "silent" }));
    const { runs, fn } = failing(2);
    loops.every(2000, "session renewal", fn, { retryMs: 500 });
    await vi.advanceTimersByTimeAsync(2000);
    expect(runs.n).toBe(1);
    // Failed: again 500 ms later, and again, then it worked and waits for the next tick.
    await vi.advanceTimersByTimeAsync(500);
    expect(runs.n).toBe(2);
    await vi.advanceTimersByTimeAsync(500);
    expect(runs.n).toBe(3);
    await vi.advanceTimersByTimeAsync(500);
    expect(runs.n).toBe(3);
    await vi.advanceTimersByTimeAsync(500);
    expect(runs.n).toBe(4);
    loops.stop();
  });

  it("without retryMs waits for the next tick, and runs nothing once stopped", async () => {
    const loops = createLoops(pino({ level: "silent" }));
    const { runs, fn } = failing(1);
    loops.every(2000, "dispatch poll", fn, { phaseMs: 100 });
    await vi.advanceTimersByTimeAsync(2100);
    expect(runs.n).toBe(1);
    await vi.advanceTimersByTimeAsync(1900);
    expect(runs.n).toBe(1);
    await vi.advanceTimersByTimeAsync(100);
    expect(runs.n).toBe(2);
    loops.stop();
    await vi.advanceTimersByTimeAsync(10_000);
    expect(runs.n).toBe(2);
  });
});
