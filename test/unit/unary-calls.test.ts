import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { limitUnaryCalls, TURN_BUDGET_MS } from "../../src/rpc/unary-calls.js";

/** Spends the current turn's budget, as a turn that read many calls does. */
function spendTurnBudget() {
  const until = performance.now() + TURN_BUDGET_MS + 1;
  while (performance.now() < until) {
    // busy: the turn's calls took their time
  }
}

/** Admits `count` calls in one turn of the event loop, after the first spent the turn's budget. */
function burst(count: number) {
  const limit = limitUnaryCalls({ log: pino({ level: "silent" }) });
  const admit = () => limit.admit(new AbortController().signal);
  const outcomes = [admit()];
  spendTurnBudget();
  for (let i = 1; i < count; i += 1) outcomes.push(admit());
  return { limit, refusals: outcomes.filter((o) => o instanceof LeaseholdError) };
}

describe("the bound on unary calls", () => {
  it("refuses no call of a burst of 32 + 224 at an idle server, though most wait for later turns", () => {
    const { limit, refusals } = burst(256);
    expect(refusals).toEqual([]);
    // Only the first started in the turn that spent its budget; the others wait for later turns.
    expect(limit.counts).toEqual({ running: 1, waiting: 255 });
  });

  it("refuses the calls past 32 served or waiting for a turn and 224 more, saying why", () => {
    const { limit, refusals } = burst(300);
    expect(refusals).toHaveLength(44);
    expect(limit.refused).toBe(44);
    const refusal = refusals[0] as LeaseholdError;
    expect(refusal.code).toBe(Code.ResourceExhausted);
    expect(refusal.reason).toBe("UNARY_CALLS_OVER_LIMIT");
    expect(refusal.message).toContain(
      "the server is serving 1 calls and 255 more wait their turn, 256 in all",
    );
  });
});
