import { describe, expect, it } from "vitest";
import { fitSnapshot } from "../../src/scope/lease-snapshot.js";
import { PAGE_BYTES } from "../../src/work/page.js";

const KiB = 1024;

describe("a lease's snapshot", () => {
  it("keeps the smallest deployments, then the newest events without a gap, then the smallest bodies", () => {
    // 2 MiB left after the lease and its resources' ids.
    const fit = fitSnapshot({
      fixed: PAGE_BYTES - 2048 * KiB,
      deployments: [512 * KiB, 1792 * KiB, 256 * KiB],
      // 1280 KiB left: the newest two fit, the next does not, nor (after the gap) the oldest.
      events: [10 * KiB, 1024 * KiB, 300 * KiB, 400 * KiB],
      // 580 KiB left.
      bodies: [500 * KiB, 20 * KiB, 100 * KiB, 30 * KiB],
    });
    expect(fit).toEqual({ deployments: new Set([0, 2]), events: 2, bodies: new Set([1, 2, 3]) });
  });

  it("sends only what is always sent when that alone fills the answer", () => {
    const fit = fitSnapshot({ fixed: PAGE_BYTES + 1, deployments: [10], events: [10], bodies: [10] });
    expect(fit).toEqual({ deployments: new Set(), events: 0, bodies: new Set() });
  });
});
