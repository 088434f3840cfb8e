import { afterEach, describe, expect, it, vi } from "vitest";
import { dbOffsetMs, type Hosted, persistDeadline, remainingMs } from "../../src/work/lease/hosted.js";

describe("the time left that heartbeat acks carry", () => {
  afterEach(() => {
    vi.restoreAllMocks();
  });

  it("does not grow when this process's wall clock steps back between renewals", () => {
    // The database said now = 1,000,000 and stored a deadline 10 s later.
    const s = { deadlineMs: 0, dbOffsetMs: 0 } as Hosted;
    persistDeadline(s, 1_010_000, dbOffsetMs(1_000_000, performance.now()));
    const before = remainingMs(s);
    expect(before).toBeGreaterThan(9_000);
    expect(before).toBeLessThanOrEqual(10_000);
    // NTP steps the wall clock back 6 s before the next renewal: an ack must not promise 16 s.
    const wall = Date.now();
    vi.spyOn(Date, "now").mockReturnValue(wall - 6_000);
    expect(remainingMs(s)).toBeLessThanOrEqual(before);
  });

  it("counts the time a statement waited against the deadline, not for it", () => {
    // The renewal was sent 20 s ago and waited for a lock; its now() was read when it began.
    const s = { deadlineMs: 0, dbOffsetMs: 0 } as Hosted;
    const sentAt = performance.now() - 20_000;
    persistDeadline(s, 1_030_000, dbOffsetMs(1_000_000, sentAt));
    // 30 s after the statement's now(), 20 s of it spent waiting: at most 10 s are left.
    expect(remainingMs(s)).toBeLessThanOrEqual(10_000);
    expect(remainingMs(s)).toBeGreaterThan(9_000);
  });
});
