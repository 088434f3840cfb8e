import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { ANY_CALLER, type Caller } from "../../src/rpc/fair-queue.js";
import {
  limitUnaryCalls,
  MAX_RETRY_DELAY_MS,
  MIN_RETRY_DELAY_MS,
  TURN_BUDGET_MS,
} from "../../src/rpc/unary-calls.js";

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
  const admit = () => limit.admit(new AbortController().signal, ANY_CALLER);
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
    expect(refusal.message).toContain("has 255 calls waiting their turn");
    expect(refusal.message).toContain("the server is serving 1 calls and 255 wait, 256 in all");
    expect(refusal.retryDelayMs).toBeGreaterThanOrEqual(MIN_RETRY_DELAY_MS);
    expect(refusal.retryDelayMs).toBeLessThanOrEqual(MAX_RETRY_DELAY_MS);
  });
});

const callerOf = (name: string): Caller => ({
  key: `principal:${name}`,
  principal: name,
  peer: "127.0.0.1:1",
  method: "leasehold.v1.ActionService/ListActions",
});

/** Resolves once every callback queued so far with setImmediate has run (the limit starts one call a turn). */
const turn = () => new Promise((resolve) => setImmediate(resolve));

describe("fair turns for unary calls", () => {
  it("serves a caller with one call waiting before the backlog of a caller with many", async () => {
    const limit = limitUnaryCalls({ running: 1, waiting: 8, log: pino({ level: "silent" }) });
    const served: string[] = [];
    const call = (name: string) => {
      const admitted = limit.admit(new AbortController().signal, callerOf(name));
      if (admitted instanceof LeaseholdError) throw admitted;
      return Promise.resolve(admitted).then((done) => {
        served.push(name);
        return done;
      });
    };
    const first = await call("team-a");
    const backlog = Array.from({ length: 5 }, () => call("team-a"));
    const victim = call("team-b");
    expect(limit.counts).toEqual({ running: 1, waiting: 6 });
    first();
    // Each served call ends at once: the rest start one a turn.
    for (const c of [...backlog, victim]) c.then((done) => done());
    await Promise.all([...backlog, victim]);
    // team-b's one call took the second turn, before team-a's other four.
    expect(served).toEqual(["team-a", "team-a", "team-b", "team-a", "team-a", "team-a", "team-a"]);
  });

  it("refuses the flooding caller, not the one that comes with a single call, when the room is full", async () => {
    const lines: Record<string, unknown>[] = [];
    const log = pino({ level: "warn" }, { write: (line: string) => lines.push(JSON.parse(line)) });
    const limit = limitUnaryCalls({ running: 1, waiting: 3, log });
    const signal = new AbortController().signal;
    const running = limit.admit(signal, callerOf("team-a"));
    expect(typeof running).toBe("function");
    const waiting = [1, 2, 3].map(() => limit.admit(signal, callerOf("team-a")) as Promise<() => void>);
    const outcomes = waiting.map((w) =>
      w.then(
        () => "served",
        (error: LeaseholdError) => error,
      ),
    );
    // The room is full: team-a's next call is refused, naming team-a as the caller with too many.
    const flood = limit.admit(signal, callerOf("team-a"));
    expect(flood).toBeInstanceOf(LeaseholdError);
    const refusal = flood as LeaseholdError;
    expect(refusal.code).toBe(Code.ResourceExhausted);
    expect(refusal.reason).toBe("UNARY_CALLS_OVER_LIMIT");
    expect(refusal.message).toMatch(/^this caller \(principal "team-a"\) has 3 calls waiting their turn/);
    expect(refusal.metadata).toMatchObject({
      running_limit: "1",
      waiting_limit: "3",
      caller: 'principal "team-a"',
      caller_waiting: "3",
    });
    expect(refusal.retryDelayMs).toBeGreaterThanOrEqual(MIN_RETRY_DELAY_MS);
    // team-b's call gets in: team-a's newest waiting call gives up its place.
    const victim = limit.admit(signal, callerOf("team-b"));
    expect(victim).toBeInstanceOf(Promise);
    const pushedOut = await outcomes[2];
    expect(pushedOut).toBeInstanceOf(LeaseholdError);
    expect((pushedOut as LeaseholdError).metadata.caller).toBe('principal "team-a"');
    expect(limit.counts).toEqual({ running: 1, waiting: 3 });
    expect(limit.refused).toBe(2);
    // Refusals are logged with the caller's principal, method and peer.
    expect(lines[0]).toMatchObject({
      principal: "team-a",
      method: "leasehold.v1.ActionService/ListActions",
      peer: "127.0.0.1:1",
    });
    // team-b's call is served before team-a's second waiting call.
    const served: string[] = [];
    outcomes[0]?.then(() => served.push("team-a"));
    outcomes[1]?.then(() => served.push("team-a"));
    const victimServed = (victim as Promise<() => void>).then((done) => {
      served.push("team-b");
      return done;
    });
    (running as () => void)();
    await turn();
    await turn();
    expect(served).toEqual(["team-a"]);
    (await (waiting[0] as Promise<() => void>))();
    await turn();
    await turn();
    expect(served).toEqual(["team-a", "team-b"]);
    (await victimServed)();
    (await (waiting[1] as Promise<() => void>))();
  });

  it("takes a waiting call from another caller only when that one has two calls more waiting", async () => {
    const limit = limitUnaryCalls({ running: 1, waiting: 9, log: pino({ level: "silent" }) });
    const signal = new AbortController().signal;
    limit.admit(signal, callerOf("runner"));
    const aCalls = Array.from({ length: 5 }, () =>
      (limit.admit(signal, callerOf("a")) as Promise<() => void>).then(
        () => "served",
        (error: LeaseholdError) => error.metadata.caller,
      ),
    );
    for (let i = 0; i < 4; i++) limit.admit(signal, callerOf("b"));
    // Full: a waits with 5, b with 4. One more is no lead: b's next call is refused itself.
    const refused = limit.admit(signal, callerOf("b"));
    expect(refused).toBeInstanceOf(LeaseholdError);
    expect((refused as LeaseholdError).metadata.caller).toBe('principal "b"');
    // c, with none waiting, is two behind a: a's newest gives way.
    expect(limit.admit(signal, callerOf("c"))).toBeInstanceOf(Promise);
    expect(await aCalls[4]).toBe('principal "a"');
    expect(limit.counts).toEqual({ running: 1, waiting: 9 });
  });

  it("refuses a caller with one call among many callers with one each only when it already waits", () => {
    const limit = limitUnaryCalls({ running: 1, waiting: 2, log: pino({ level: "silent" }) });
    const signal = new AbortController().signal;
    limit.admit(signal, callerOf("a"));
    limit.admit(signal, callerOf("b"));
    limit.admit(signal, callerOf("c"));
    const refusal = limit.admit(signal, callerOf("d"));
    expect(refusal).toBeInstanceOf(LeaseholdError);
    expect((refusal as LeaseholdError).message).toMatch(
      /^the server is serving 1 calls and 2 more wait their turn, from 2 callers with no more than one each/,
    );
    expect((refusal as LeaseholdError).message).not.toContain("send fewer calls");
  });
});
