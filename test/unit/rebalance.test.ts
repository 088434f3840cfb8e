import pino from "pino";
import { describe, expect, it } from "vitest";
import type { Hosted, HostedSessions } from "../../src/work/lease/hosted.js";
import { createRebalancer, FIRST_STAY_MS, streamsOverShare } from "../../src/work/lease/rebalance.js";

describe("streamsOverShare", () => {
  it("moves nothing alone, nor within a share plus a tenth (at least one)", () => {
    expect(streamsOverShare({ mine: 10, total: 10, servers: 1 })).toBe(0);
    expect(streamsOverShare({ mine: 4, total: 6, servers: 2 })).toBe(0);
    expect(streamsOverShare({ mine: 5, total: 12, servers: 3 })).toBe(0);
    expect(streamsOverShare({ mine: 0, total: 0, servers: 3 })).toBe(0);
    // 1,000 streams over 3 processes: a share is 334, a tenth of it 33.
    expect(streamsOverShare({ mine: 367, total: 1000, servers: 3 })).toBe(0);
  });

  it("moves half the excess over the share, at least one", () => {
    expect(streamsOverShare({ mine: 6, total: 6, servers: 2 })).toBe(2);
    expect(streamsOverShare({ mine: 5, total: 6, servers: 2 })).toBe(1);
    expect(streamsOverShare({ mine: 8, total: 12, servers: 3 })).toBe(2);
    // The restarted third of a fleet of 1,000: each of the others moves 83 in its first round.
    expect(streamsOverShare({ mine: 500, total: 1000, servers: 3 })).toBe(83);
  });
});

describe("createRebalancer", () => {
  /** `n` hosted streams; `closed` collects the reasons they were ended with. */
  function fleet(n: number, held: (i: number) => number = () => 0) {
    const closed: { workerId: string; reason: string; code: number }[] = [];
    const streams = Array.from({ length: n }, (_, i) => {
      const s = {
        workerId: `w${i}`,
        ended: false,
        draining: false,
        held: new Map(Array.from({ length: held(i) }, (_, k) => [`a${i}-${k}`, 1])),
        link: {
          close(error?: Error) {
            const e = error as unknown as { reason?: string; code: number };
            closed.push({ workerId: `w${i}`, reason: e.reason ?? "", code: e.code });
          },
        },
      };
      return s as unknown as Hosted;
    });
    const hosted = { values: () => streams.values(), size: n } as unknown as HostedSessions;
    return { hosted, closed };
  }

  const log = pino({ level: "silent" });

  it("ends the streams holding the fewest leases UNAVAILABLE, reason REBALANCING, and counts them", async () => {
    const { hosted, closed } = fleet(8, (i) => 8 - i);
    let moved = 0;
    const r = createRebalancer({
      hosted,
      log,
      spread: async () => ({ mine: 8, total: 8, servers: 2 }),
      paused: () => false,
      moved: { inc: (n = 1) => (moved += n) },
    });
    await r.run();
    // A share is 4: half the excess, two.
    expect(closed).toEqual([
      { workerId: "w7", reason: "REBALANCING", code: 14 },
      { workerId: "w6", reason: "REBALANCING", code: 14 },
    ]);
    expect(moved).toBe(2);
  });

  it("moves nothing while paused (the database unreachable, or closing)", async () => {
    const { hosted, closed } = fleet(8);
    const r = createRebalancer({
      hosted,
      log,
      spread: async () => ({ mine: 8, total: 8, servers: 2 }),
      paused: () => true,
      moved: { inc() {} },
    });
    await r.run();
    expect(closed).toEqual([]);
  });

  it("leaves a worker that came back for 10 minutes, then twice as long after each return", async () => {
    // w0 holds no lease, the others one each: w0 is the one to move whenever it may be.
    const { hosted, closed } = fleet(4, (i) => (i === 0 ? 0 : 1));
    let t = 0;
    const r = createRebalancer({
      hosted,
      log,
      spread: async () => ({ mine: 4, total: 4, servers: 2 }),
      paused: () => false,
      moved: { inc() {} },
      now: () => t,
    });
    const movesOfW0 = () => closed.filter((c) => c.workerId === "w0").length;
    await r.run();
    expect(closed.map((c) => c.workerId)).toEqual(["w0"]);
    // It had nowhere else to go: back here a moment later, and passed over for 10 minutes.
    t += 1000;
    r.opened("w0");
    await r.run();
    expect(movesOfW0()).toBe(1);
    t += FIRST_STAY_MS - 2000;
    await r.run();
    expect(movesOfW0()).toBe(1);
    t += 2000;
    await r.run();
    expect(movesOfW0()).toBe(2);
    // Back again: now it stays twice as long.
    r.opened("w0");
    t += 2 * FIRST_STAY_MS - 1000;
    await r.run();
    expect(movesOfW0()).toBe(2);
    t += 2000;
    await r.run();
    expect(movesOfW0()).toBe(3);
  });
});
