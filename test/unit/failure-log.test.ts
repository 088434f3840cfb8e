import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { failureLog } from "../../src/work/failure-log.js";

describe("failureLog", () => {
  const lines: Record<string, unknown>[] = [];
  const log = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line)) });
  const task = failureLog(log, {
    failed: "task failed",
    still: "task still failing",
    again: "task works again",
  });

  it("warns of the first failure, logs the next ones at debug, and counts them when the task works again", () => {
    task.worked();
    expect(lines).toEqual([]);
    task.failed(new Error("down"), { actionId: "a1" });
    task.failed(new Error("down"));
    task.failed(new Error("still down"));
    task.worked();
    task.worked();
    expect(lines.map((l) => [l.level, l.msg])).toEqual([
      [40, "task failed"],
      [20, "task still failing"],
      [20, "task still failing"],
      [30, "task works again"],
    ]);
    expect(lines[0]).toMatchObject({ actionId: "a1", err: { message: "down" } });
    expect(lines[3]).toMatchObject({ failures: 3 });
    // A new outage warns again.
    task.failed(new Error("down again"));
    expect(lines[4]).toMatchObject({ level: 40, msg: "task failed" });
  });
});
