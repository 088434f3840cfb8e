import { describe, expect, it } from "vitest";
import type { Placement } from "../../src/store/queries/queued-placement.js";
import type { ActionRecord } from "../../src/work/action.js";
import { queuedStep } from "../../src/work/explain.js";

const now = new Date(Date.UTC(2026, 11, 7, 6, 0, 0));
const action = (labelSelector: Record<string, string>, notBefore = now) =>
  ({ id: "a1", cluster: "east", labelSelector, notBefore, state: "QUEUED" }) as ActionRecord;
const placement = (p: Partial<Placement>): Placement => ({
  connected: 0,
  inGrace: 0,
  fit: {},
  free: [],
  carried: [],
  closest: [],
  ...p,
});

// The cases the integration tests cannot hold still: a worker with a free slot takes the action
// at once. And the bounds that keep the sentence short for a big cluster or selector.
describe("explain, on why a queued action is not granted now", () => {
  it("names the free workers, and says a grant is due", () => {
    const step = queuedStep(
      action({}),
      placement({
        connected: 9,
        fit: { busy: { n: 4, first: "b" }, free: { n: 5, first: "f1" } },
        free: [
          { workerId: "f1", freeSlots: 2, hostedHere: true },
          { workerId: "f2", freeSlots: 1, hostedHere: true },
          { workerId: "f3", freeSlots: 1, hostedHere: false },
        ],
      }),
      now,
    );
    expect(step).toEqual({
      at: now,
      epoch: 0,
      summary:
        "not granted now: 9 connected workers of cluster east; with a free slot: worker f1 (2 free slots), worker f2 (1 free slot), worker f3 (1 free slot) and 2 more; a grant is due at the next claim",
    });
  });

  it("says that only another server knows whether its free workers stopped taking grants", () => {
    const { summary } = queuedStep(
      action({ gpu: "yes" }),
      placement({
        connected: 2,
        fit: { free: { n: 1, first: "f" } },
        free: [{ workerId: "f", freeSlots: 1, hostedHere: false }],
      }),
      now,
    );
    expect(summary).toBe(
      "not granted now: 1 connected worker of cluster east carries its labels (gpu=yes); with a free slot: worker f (1 free slot); a grant is due at their server's next claim, unless they stopped taking grants (which only their server knows)",
    );
  });

  it("tells a retry backoff first, then where the action goes after it", () => {
    const later = new Date(now.getTime() + 30_000);
    const { summary } = queuedStep(
      action({}, later),
      placement({
        connected: 1,
        fit: { free: { n: 1, first: "w" } },
        free: [{ workerId: "w", freeSlots: 1, hostedHere: true }],
      }),
      now,
    );
    expect(summary).toBe(
      "not granted now: its retry backoff lasts until 2026-12-07T06:00:30.000Z (30.0 s from now); then 1 connected worker of cluster east; with a free slot: worker w (1 free slot); it goes to one of them once its backoff ends",
    );
  });

  it("counts the workers of each kind when there are several", () => {
    const { summary } = queuedStep(
      action({}),
      placement({
        connected: 7,
        fit: { draining: { n: 2, first: "d" }, stopped: { n: 2, first: "s" }, busy: { n: 3, first: "b" } },
      }),
      now,
    );
    expect(summary).toBe(
      "not granted now: 7 connected workers of cluster east: 2 are draining, 2 have stopped taking grants and 3 have all their slots busy; it waits its turn for a free slot",
    );
  });

  it("keeps a long selector and long values short", () => {
    const long = "x".repeat(300);
    const selector = Object.fromEntries(
      Array.from({ length: 64 }, (_, i) => [`k${String(i).padStart(2, "0")}`, long]),
    );
    const { summary } = queuedStep(
      action(selector),
      placement({
        connected: 5,
        carried: Object.entries(selector).map(([key, value]) => ({ key, value, workers: 0 })),
      }),
      now,
    );
    const v = `${"x".repeat(64)}…`;
    expect(summary).toBe(
      `not granted now: none of the 5 connected workers of cluster east carries the labels it requires (k00=${v}, k01=${v}, k02=${v}, k03=${v} and 60 more): none carries k00=${v}, k01=${v}, k02=${v}, k03=${v} and 60 more`,
    );
  });
});
