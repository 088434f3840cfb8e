import { describe, expect, it } from "vitest";
import {
  BACKOFF_CAP_BEFORE_WELCOME_MS,
  REFUSED_BACKOFF_CAP_MS,
  reconnectCeilingMs,
  reconnectDelayMs,
  refusedDelayMs,
} from "../../src/agent/backoff.js";

/** A deterministic stand-in for Math.random cycling through `values`. */
const cycling = (values: number[]) => {
  let i = 0;
  return () => values[i++ % values.length] as number;
};

describe("the agent's reconnect backoff", () => {
  it("never waits longer than an eighth of the welcome's grace period, however many attempts failed", () => {
    for (const graceMs of [2000, 8000, 10_000, 60_000]) {
      for (let attempt = 0; attempt < 40; attempt++) {
        for (const r of [0, 0.5, 0.999_999]) {
          const delay = reconnectDelayMs({
            attempt,
            initialMs: 200,
            maxMs: undefined,
            graceMs,
            random: () => r,
          });
          expect(delay).toBeLessThanOrEqual(graceMs / 8);
          expect(delay).toBeGreaterThanOrEqual(0);
        }
      }
      expect(reconnectCeilingMs({ attempt: 40, initialMs: 200, maxMs: undefined, graceMs })).toBe(
        graceMs / 8,
      );
    }
  });

  it("ignores a maxBackoffMs above grace/8 and honours one below it", () => {
    expect(reconnectCeilingMs({ attempt: 20, initialMs: 200, maxMs: 5000, graceMs: 8000 })).toBe(1000);
    expect(reconnectCeilingMs({ attempt: 20, initialMs: 200, maxMs: 300, graceMs: 8000 })).toBe(300);
  });

  it("starts small and doubles the ceiling per failed attempt up to the bound", () => {
    const ceilings = [0, 1, 2, 3, 4].map((attempt) =>
      reconnectCeilingMs({ attempt, initialMs: 100, maxMs: undefined, graceMs: 8000 }),
    );
    expect(ceilings).toEqual([100, 200, 400, 800, 1000]);
  });

  it("uses a conservative bound before any welcome", () => {
    expect(reconnectCeilingMs({ attempt: 30, initialMs: 200, maxMs: undefined, graceMs: undefined })).toBe(
      BACKOFF_CAP_BEFORE_WELCOME_MS,
    );
    expect(reconnectCeilingMs({ attempt: 30, initialMs: 200, maxMs: 400, graceMs: undefined })).toBe(400);
  });

  it("draws each delay uniformly below the ceiling (full jitter), so agents do not return in lockstep", () => {
    const random = cycling([0, 0.25, 0.5, 0.75]);
    const delays = [0, 1, 2, 3].map(() =>
      reconnectDelayMs({ attempt: 10, initialMs: 200, maxMs: undefined, graceMs: 8000, random }),
    );
    expect(delays).toEqual([0, 250, 500, 750]);
  });
});

describe("refused credentials", () => {
  it("wait 1–2 s after the first refusal, doubling to at most 30 s, never at the reconnect pace", () => {
    expect(refusedDelayMs(1, () => 0)).toBe(1000);
    expect(refusedDelayMs(1, () => 0.999)).toBeLessThan(2000);
    expect(refusedDelayMs(3, () => 0)).toBe(4000);
    expect(refusedDelayMs(50, () => 0.999)).toBeLessThanOrEqual(REFUSED_BACKOFF_CAP_MS);
    expect(refusedDelayMs(50, () => 0)).toBe(REFUSED_BACKOFF_CAP_MS / 2);
  });
});
