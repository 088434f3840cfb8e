import { describe, expect, it } from "vitest";
import { disconnectNotices } from "../../src/cli/agent-command.js";

describe("the reference agent's lines while it cannot connect", () => {
  it("says the first failure, each new reason, and again every 30 s, never going silent", () => {
    const n = disconnectNotices();
    expect(n.noticeOf("connect ECONNREFUSED 127.0.0.1:1", 0)).toBe(
      "disconnected (connect ECONNREFUSED 127.0.0.1:1); reconnecting with backoff",
    );
    expect(n.noticeOf("connect ECONNREFUSED 127.0.0.1:1", 1_000)).toBeUndefined();
    // Another address of the list, failing another way: told once.
    expect(n.noticeOf("permission denied", 2_000)).toBe(
      "still disconnected after 2 s (permission denied); reconnecting with backoff",
    );
    expect(n.noticeOf("permission denied", 3_000)).toBeUndefined();
    expect(n.noticeOf("connect ECONNREFUSED 127.0.0.1:1", 4_000)).toBeUndefined();
    expect(n.noticeOf("permission denied", 32_000)).toBe(
      "still disconnected after 32 s (permission denied); reconnecting with backoff",
    );
    expect(n.noticeOf("permission denied", 40_000)).toBeUndefined();
    // A reason stamped with the time it happened is the same reason at another time.
    expect(n.noticeOf("Failed to connect (2026-12-07T01:10:35.670Z)", 41_000)).toMatch(/^still disconnected/);
    expect(n.noticeOf("Failed to connect (2026-12-07T01:10:36.065Z)", 42_000)).toBeUndefined();
  });

  it("starts over once connected", () => {
    const n = disconnectNotices();
    n.noticeOf("stream ended", 0);
    n.connected();
    expect(n.noticeOf("stream ended", 5_000)).toBe("disconnected (stream ended); reconnecting with backoff");
  });
});
