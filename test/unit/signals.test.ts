import { describe, expect, it } from "vitest";
import { exitOnSignal, interruptCounter, SAME_SIGNAL_MS } from "../../src/cli/signals.js";

describe("interrupts", () => {
  it("counts a signal within a second of the last one counted as the same one, and later ones anew", () => {
    let now = 5_000;
    const next = interruptCounter(() => now);
    expect(next()).toBe(1);
    // Ctrl-C under npm: the terminal's and npm's copy arrive together.
    now += 3;
    expect(next()).toBeUndefined();
    now += SAME_SIGNAL_MS - 4;
    expect(next()).toBeUndefined();
    now += 1;
    expect(next()).toBe(2);
    now += SAME_SIGNAL_MS - 1;
    expect(next()).toBeUndefined();
    now += 1;
    expect(next()).toBe(3);
  });

  it("counts the first signal even at time zero", () => {
    const next = interruptCounter(() => 0);
    expect(next()).toBe(1);
    expect(next()).toBeUndefined();
  });

  it("exits as shells report an interrupted process: 128 + the signal's number", () => {
    expect(exitOnSignal("SIGINT")).toBe(130);
    expect(exitOnSignal("SIGTERM")).toBe(143);
  });
});
