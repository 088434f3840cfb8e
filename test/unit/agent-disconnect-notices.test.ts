import { describe, expect, it } from "vitest";
import { disconnectNotices, takenOverLine } from "../../src/cli/agent-command.js";

describe("the reference agent's lines while it cannot connect", () => {
  it("says the first failure, each new reason, and again every 30 s, never going silent", () => {
    const n = disconnectNotices("127.0.0.1:1");
    n.connected();
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

  it("says it cannot connect yet, never that it was disconnected, before its first session", () => {
    const n = disconnectNotices("127.0.0.1:1");
    expect(n.noticeOf("connect ECONNREFUSED 127.0.0.1:1", 0)).toBe(
      "cannot connect to 127.0.0.1:1 yet (connect ECONNREFUSED 127.0.0.1:1); trying again with backoff",
    );
    // A second reason within the first second: how long in ms, not "after 0 s".
    expect(n.noticeOf("Connection dropped", 300)).toBe(
      "still cannot connect after 300 ms (Connection dropped); trying again with backoff",
    );
    expect(n.noticeOf("connect ECONNREFUSED 127.0.0.1:1", 30_300)).toBe(
      "still cannot connect after 30 s (connect ECONNREFUSED 127.0.0.1:1); trying again with backoff",
    );
  });

  it("starts over once connected", () => {
    const n = disconnectNotices("127.0.0.1:1");
    n.noticeOf("stream ended", 0);
    n.connected();
    expect(n.noticeOf("stream ended", 5_000)).toBe("disconnected (stream ended); reconnecting with backoff");
  });
});

describe("the reference agent's line when another process has its worker id", () => {
  it("says whether it was refused or taken over, and stopped actions only when it held some", () => {
    expect(takenOverLine("w1", { hadSession: false, stopped: 0, retryInMs: 1500.4 })).toBe(
      "the server refused this agent: another process is connected as worker w1 and holds its session " +
        "(worker ids must be unique); trying again in 1500ms",
    );
    expect(takenOverLine("w1", { hadSession: true, stopped: 2, retryInMs: 12_000 })).toBe(
      "another process connected as worker w1 and took this agent's session over (worker ids must be unique); " +
        "stopped 2 held actions (their leases are that process's); trying again in 12000ms",
    );
  });
});
