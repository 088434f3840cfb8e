import { describe, expect, it } from "vitest";
import { LazyAbortController } from "../../src/agent/agent.js";

describe("LazyAbortController", () => {
  it("behaves as an AbortController when the signal is asked for first", () => {
    const c = new LazyAbortController();
    const signal = c.signal;
    const heard: unknown[] = [];
    signal.addEventListener("abort", () => heard.push(signal.reason));
    expect([c.aborted, signal.aborted]).toEqual([false, false]);
    c.abort("first");
    c.abort("second");
    expect([c.aborted, signal.aborted, c.reason, signal.reason]).toEqual([true, true, "first", "first"]);
    expect(heard).toEqual(["first"]);
    expect(c.signal).toBe(signal);
  });

  it("hands out a signal already aborted, with the first reason, when aborted before anyone asked", () => {
    const c = new LazyAbortController();
    const reason = new Error("revoked");
    c.abort(reason);
    c.abort(new Error("later"));
    expect(c.aborted).toBe(true);
    expect(c.signal.aborted).toBe(true);
    expect(c.signal.reason).toBe(reason);
    expect(() => c.signal.throwIfAborted()).toThrow("revoked");
  });
});
