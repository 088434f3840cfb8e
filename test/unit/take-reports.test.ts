import { describe, expect, it } from "vitest";
import { BATCH, SHARE, takeReports } from "../../src/work/lease/dispatch.js";

/** `n` reports of stream `s`, of actions `<s>-<from>`, `<s>-<from + 1>`, … */
const reports = (s: object, name: string, n: number, from = 0) =>
  Array.from({ length: n }, (_, i) => ({ s, report: { actionId: `${name}-${from + i}` } }));

describe("the reports a dispatcher round takes", () => {
  it("gives each stream its share before the rest of a flooding stream's reports", () => {
    const flooder = {};
    const other = {};
    const queue = [...reports(flooder, "f", 1_000), ...reports(other, "o", 2)];
    const { batch, rest } = takeReports(queue, new Set());
    expect(batch).toHaveLength(BATCH);
    // The other stream's two reports are in this round, though 1,000 came before them.
    expect(batch.filter((p) => p.s === other)).toHaveLength(2);
    // The flooder's fill the rest of the batch, oldest first, and the others wait in order.
    const flooded = batch.filter((p) => p.s === flooder).map((p) => p.report.actionId);
    expect(flooded).toEqual(reports(flooder, "f", BATCH - 2).map((p) => p.report.actionId));
    expect(rest.map((p) => p.report.actionId)).toEqual(
      reports(flooder, "f", 1_000 - (BATCH - 2), BATCH - 2).map((p) => p.report.actionId),
    );
  });

  it("takes a lone stream's reports up to a whole batch", () => {
    const one = {};
    const { batch, rest } = takeReports(reports(one, "a", BATCH + 10), new Set());
    expect(batch).toHaveLength(BATCH);
    expect(rest).toHaveLength(10);
    expect(SHARE).toBeLessThan(BATCH);
  });

  it("takes one report per action, and none of an action a round in flight settles", () => {
    const s = {};
    const queue = [
      { s, report: { actionId: "a" } },
      { s, report: { actionId: "b" } },
      { s, report: { actionId: "a" } },
      { s, report: { actionId: "c" } },
    ];
    const { batch, rest } = takeReports(queue, new Set(["b"]));
    expect(batch).toEqual([queue[0], queue[3]]);
    expect(rest).toEqual([queue[1], queue[2]]);
  });
});
