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

  it("logs the recovery only after a run that tried: one with nothing to do proves nothing", async () => {
    const lines: { level: number; msg: string; failures?: number }[] = [];
    const loops = createLoops(
      pino({ level: "info" }, { write: (line: string) => lines.push(JSON.parse(line)) }),
    );
    // The database refuses connections twice; then the process drains for its shutdown and the
    // renewal has no stream left to renew (false: nothing written), while the database is still
    // down; then a run writes again.
    const outcomes: (() => Promise<unknown>)[] = [
      () => Promise.reject(new Error("connect ECONNREFUSED")),
      () => Promise.reject(new Error("connect ECONNREFUSED")),
      () => Promise.resolve(false),
      () => Promise.resolve(true),
    ];
    loops.every(1000, "session renewal", () => (outcomes.shift() ?? (() => Promise.resolve()))());
    await vi.advanceTimersByTimeAsync(3000);
    expect(lines.map((l) => l.msg)).toEqual(["session renewal failed; retrying on every tick"]);
    await vi.advanceTimersByTimeAsync(1000);
    expect(lines.map((l) => [l.msg, l.failures])).toEqual([
      ["session renewal failed; retrying on every tick", undefined],
      ["session renewal works again", 2],
    ]);
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
