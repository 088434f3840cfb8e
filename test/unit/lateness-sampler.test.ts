import { describe, expect, it } from "vitest";
import { createLatenessSampler } from "../../src/metrics.js";

const hold = (ms: number) => {
  const until = performance.now() + ms;
  while (performance.now() < until);
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("the event-loop lateness sampler", () => {
  it("records a stall that starts right after a window is taken, in the next window only", async () => {
    const sampler = createLatenessSampler(10);
    try {
      await sleep(50);
      sampler.take();
      hold(200);
      await sleep(30);
      const stalled = sampler.take();
      expect(stalled.quantile(1)).toBeGreaterThanOrEqual(180);
      expect(stalled.quantile(0.5)).toBeLessThanOrEqual(stalled.quantile(1));
      await sleep(30);
      expect(sampler.take().quantile(1)).toBeLessThan(stalled.quantile(1));
    } finally {
      sampler.stop();
    }
  });

  it("answers NaN for a window without samples", () => {
    const sampler = createLatenessSampler(10);
    try {
      expect(sampler.take().quantile(0.99)).toBeNaN();
    } finally {
      sampler.stop();
    }
  });
});
