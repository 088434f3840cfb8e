import { describe, expect, it } from "vitest";
import { reconnectBackoffSeconds } from "../../src/store/database.js";

describe("reconnecting broken PostgreSQL connections", () => {
  it("waits at most half a second, however many reconnects failed during an outage", () => {
    for (let retries = 0; retries <= 100; retries++) {
      const seconds = reconnectBackoffSeconds(retries);
      expect(seconds).toBeGreaterThanOrEqual(0);
      expect(seconds).toBeLessThanOrEqual(0.5);
    }
  });

  it("spreads reconnects with jitter instead of all at the same instant", () => {
    const delays = new Set(Array.from({ length: 20 }, () => reconnectBackoffSeconds(10)));
    expect(delays.size).toBeGreaterThan(1);
  });
});
