import { describe, expect, it } from "vitest";
import { type AgentLine, type ChaosRecord, checkChaos, type FaultRecord } from "./checker.js";
import { planFaults } from "./schedule.js";

const T = 1_800_000_000_000;
const GRACE = 4000;
const MARGIN = 500;

/** Heartbeat acks every 500 ms from `from` to `to`: the deadline lines of one agent process. */
function acks(worker: string, pid: number, from: number, to: number): AgentLine[] {
  const lines: AgentLine[] = [];
  for (let at = from; at <= to; at += 500) {
    lines.push({ type: "deadline", ts: at, pid, worker, deadline: at - 5 + GRACE - MARGIN });
  }
  return lines;
}

const stall: FaultRecord = {
  id: 1,
  kind: "stall",
  target: "w1",
  plannedAtMs: 4700,
  plannedMs: 7300,
  start: T + 4700,
  end: T + 12_000,
};

/**
 * A run that keeps every rule: w1 runs action A (epoch 1) until a stall cuts
 * it off; it self-fences at its deadline, its session is reaped, and w2 runs
 * epoch 2, which succeeds.
 */
function goodRun(): ChaosRecord {
  const agentLines: AgentLine[] = [
    { type: "process", ts: T, pid: 1, worker: "w1" },
    { type: "connected", ts: T + 10, pid: 1, worker: "w1", address: "p1", sessionId: "s1" },
    ...acks("w1", 1, T + 100, T + 4600),
    { type: "start", ts: T + 4000, pid: 1, worker: "w1", actionId: "A", epoch: 1 },
    // The last ack's deadline is T + 8095: the handler stops 5 ms after it.
    {
      type: "end",
      ts: T + 8100,
      pid: 1,
      worker: "w1",
      actionId: "A",
      epoch: 1,
      outcome: "aborted",
      reason: "self_fenced",
    },
    { type: "connected", ts: T + 12_100, pid: 1, worker: "w1", address: "p1", sessionId: "s3" },
    { type: "process", ts: T, pid: 2, worker: "w2" },
    { type: "connected", ts: T + 10, pid: 2, worker: "w2", address: "p2", sessionId: "s2" },
    ...acks("w2", 2, T + 100, T + 12_000),
    { type: "start", ts: T + 8800, pid: 2, worker: "w2", actionId: "A", epoch: 2 },
    { type: "end", ts: T + 9300, pid: 2, worker: "w2", actionId: "A", epoch: 2, outcome: "succeeded" },
    {
      type: "finished",
      ts: T + 9310,
      pid: 2,
      worker: "w2",
      actionId: "A",
      epoch: 2,
      outcome: "succeeded",
      accepted: true,
    },
  ];
  return {
    config: {
      graceMs: GRACE,
      heartbeatMs: 500,
      stopAllowanceMs: 250,
      expiryAllowanceMs: 1300,
      resumeAllowanceMs: 800,
    },
    submitted: [{ actionId: "A", fail: false }],
    agentLines,
    incarnations: [
      { worker: "w1", pid: 1, startedAt: T, endedAt: T + 20_000, how: "stopped" },
      { worker: "w2", pid: 2, startedAt: T, endedAt: T + 20_000, how: "stopped" },
    ],
    faults: [stall],
    proxyServer: { p1: 0, p2: 1 },
    db: {
      actions: [{ id: "A", state: "SUCCEEDED", epoch: 2, output: { epoch: 2 }, failureReason: "" }],
      attempts: [
        { actionId: "A", epoch: 1, workerId: "w1", sessionId: "s1", outcome: "LEASE_EXPIRED" },
        { actionId: "A", epoch: 2, workerId: "w2", sessionId: "s2", outcome: "SUCCEEDED" },
      ],
      sessions: [
        // Last heard at T + 4600: deadline T + 8600.
        { id: "s1", workerId: "w1", deadline: T + 8600, endedAt: T + 8700, endReason: "reaped" },
        { id: "s2", workerId: "w2", deadline: T + 16_000, endedAt: T + 20_000, endReason: "goodbye" },
      ],
      events: [
        {
          sequence: 1,
          kind: "lease_expired",
          at: T + 8700,
          actionId: "A",
          workerId: "w1",
          sessionId: "s1",
          epoch: 1,
        },
        {
          sequence: 2,
          kind: "session_reaped",
          at: T + 8700,
          actionId: null,
          workerId: "w1",
          sessionId: "s1",
          epoch: null,
        },
        {
          sequence: 3,
          kind: "action_succeeded",
          at: T + 9310,
          actionId: "A",
          workerId: "w2",
          sessionId: "s2",
          epoch: 2,
        },
      ],
    },
    unexpectedExits: [],
  };
}

const rules = (record: ChaosRecord) => checkChaos(record).violations.map((v) => v.rule);

/** `lines` with the line matching `match` replaced by `change(line)`. */
function edit(lines: readonly AgentLine[], match: Partial<AgentLine>, change: (l: AgentLine) => AgentLine) {
  return lines.map((l) =>
    Object.entries(match).every(([k, v]) => (l as unknown as Record<string, unknown>)[k] === v)
      ? change(l)
      : l,
  );
}

describe("the chaos checker", () => {
  it("finds nothing wrong in a run that keeps every rule, and explains its expiry by the stall", () => {
    const result = checkChaos(goodRun());
    expect(result.violations).toEqual([]);
    expect(result.facts.expiries).toEqual([
      { sessionId: "s1", worker: "w1", deadline: T + 8600, causes: ["stall#1"] },
    ]);
    expect(result.facts.selfFenced).toBe(1);
    expect(result.facts.maxStopMs).toBe(5);
  });

  it("reports an execution that runs on past its self-fence deadline and overlaps the next epoch", () => {
    const run = goodRun();
    const agentLines = edit(run.agentLines, { type: "end", pid: 1 }, ({ reason: _, ...l }) => ({
      ...l,
      ts: T + 9000,
      outcome: "succeeded",
    }));
    const violations = checkChaos({ ...run, agentLines }).violations;
    expect(violations.map((v) => v.rule).sort()).toEqual(["overlap", "ran-past-fence"]);
    expect(violations.find((v) => v.rule === "ran-past-fence")?.message).toContain("ran 905 ms past");
    expect(violations.find((v) => v.rule === "overlap")?.message).toContain("it did not stop");
  });

  it("reports an overlap even when the earlier execution was still within its deadline (a re-grant too early)", () => {
    const run = goodRun();
    const agentLines = edit(run.agentLines, { type: "start", pid: 2 }, (l) => ({ ...l, ts: T + 7000 }));
    const violations = checkChaos({ ...run, agentLines }).violations;
    expect(violations.map((v) => v.rule)).toEqual(["overlap"]);
    expect(violations[0]?.message).toContain("re-granted too early");
  });

  it("reports a double completion: a stale epoch's report accepted, and two completed attempts", () => {
    const run = goodRun();
    const stale: AgentLine = {
      type: "finished",
      ts: T + 8090,
      pid: 1,
      worker: "w1",
      actionId: "A",
      epoch: 1,
      outcome: "succeeded",
      accepted: true,
    };
    const record: ChaosRecord = {
      ...run,
      agentLines: [...run.agentLines, stale],
      db: {
        ...run.db,
        attempts: run.db.attempts.map((a) => (a.epoch === 1 ? { ...a, outcome: "SUCCEEDED" } : a)),
      },
    };
    expect(rules(record).sort()).toEqual(["accepted-twice", "completion", "stale-accepted"]);
  });

  it("reports an expiry the measured faults do not explain, though the planned stall would have", () => {
    const run = goodRun();
    // The stall was planned for 7.3 s but lasted 0.3 s: the agent heard acks again right after.
    const short: FaultRecord = { ...stall, end: T + 5000 };
    const agentLines = [...run.agentLines, ...acks("w1", 1, T + 5100, T + 5100)];
    const violations = checkChaos({ ...run, faults: [short], agentLines }).violations;
    expect(violations.map((v) => v.rule)).toEqual(["unexplained-expiry"]);
    expect(violations[0]?.message).toContain("stall#1");
  });

  it("explains an expiry right after a stalled stream was heard again, up to one renewal tick", () => {
    const run = goodRun();
    // Acks came back at T + 8500, 100 ms before the deadline, too late for the server's next renewal.
    const back = (at: number) => ({
      ...run,
      faults: [{ ...stall, end: at - 50 }],
      agentLines: [...run.agentLines, ...acks("w1", 1, at, at)],
    });
    expect(rules(back(T + 8500))).toEqual([]);
    // Back 900 ms before it: a renewal tick would have moved the deadline on.
    expect(rules(back(T + 7700))).toEqual(["unexplained-expiry"]);
  });

  it("explains a session reaped before its deadline by the new process of a killed agent, and only so", () => {
    const run = goodRun();
    // w1 is killed at T + 4700 (its handler ends with it); its next process is welcomed at T + 6000,
    // and its hello reaped the old session at T + 5990, before the deadline.
    const kill: FaultRecord = {
      id: 2,
      kind: "agent-kill",
      target: "w1",
      plannedAtMs: 4700,
      plannedMs: 0,
      start: T + 4700,
      end: T + 5000,
    };
    const restarted: ChaosRecord = {
      ...run,
      faults: [kill],
      agentLines: [
        ...run.agentLines.filter((l) => l.pid !== 1 || l.ts < T + 4700),
        { type: "process", ts: T + 5000, pid: 3, worker: "w1" },
        { type: "connected", ts: T + 6000, pid: 3, worker: "w1", address: "p1", sessionId: "s3" },
        ...acks("w1", 3, T + 6100, T + 12_000),
      ],
      incarnations: [
        { worker: "w1", pid: 1, startedAt: T, endedAt: T + 4700, how: "killed" },
        { worker: "w1", pid: 3, startedAt: T + 5000, endedAt: T + 20_000, how: "stopped" },
        ...run.incarnations.filter((i) => i.worker !== "w1"),
      ],
      db: {
        ...run.db,
        sessions: run.db.sessions.map((s) => (s.id === "s1" ? { ...s, endedAt: T + 5990 } : s)),
      },
    };
    expect(rules(restarted)).toEqual([]);
    // A cut (the same process comes back) never ends a session early: not explained.
    expect(rules({ ...restarted, faults: [{ ...kill, kind: "cut" }] })).toEqual(["unexplained-expiry"]);
  });

  it("reports an expiry with no fault at all", () => {
    expect(rules({ ...goodRun(), faults: [] })).toEqual(["unexplained-expiry"]);
  });

  it("reports an action that is not final, and one whose outcome is not the planned one", () => {
    const run = goodRun();
    const action = run.db.actions[0];
    if (!action) throw new Error("no action");
    expect(rules({ ...run, db: { ...run.db, actions: [{ ...action, state: "LEASED" }] } })).toEqual([
      "not-final",
    ]);
    expect(rules({ ...run, submitted: [{ actionId: "A", fail: true }] })).toEqual(["outcome"]);
  });

  it("reports a handler started without a guarantee, and one that ran a lease never granted to it", () => {
    const run = goodRun();
    const noAcksYet = run.agentLines.filter(
      (l) => !(l.pid === 2 && l.type === "deadline" && l.ts <= T + 9000),
    );
    // It also ran 300 ms without a guarantee, until the first ack.
    expect(rules({ ...run, agentLines: noAcksYet }).sort()).toEqual([
      "ran-past-fence",
      "started-unguaranteed",
    ]);
    const ungranted = { ...run, db: { ...run.db, attempts: run.db.attempts.filter((a) => a.epoch !== 1) } };
    expect(rules(ungranted)).toEqual(["ungranted-execution"]);
  });

  it("takes the end of a killed process as the end of the handler it cut short", () => {
    const run = goodRun();
    const agentLines = run.agentLines.filter((l) => !(l.type === "end" && l.pid === 1));
    const incarnations = run.incarnations.map((i) =>
      i.pid === 1 ? { ...i, endedAt: T + 8000, how: "killed" as const } : i,
    );
    const kill: FaultRecord = { ...stall, id: 2, kind: "agent-kill", start: T + 4700, end: T + 11_000 };
    expect(rules({ ...run, agentLines, incarnations, faults: [kill] })).toEqual([]);
    // Killed only after running 1.9 s past its deadline, into the next epoch.
    const late = run.incarnations.map((i) =>
      i.pid === 1 ? { ...i, endedAt: T + 10_000, how: "killed" as const } : i,
    );
    expect(rules({ ...run, agentLines, incarnations: late, faults: [kill] }).sort()).toEqual([
      "overlap",
      "ran-past-fence",
    ]);
  });

  it("reports a server or agent that exits by itself", () => {
    expect(rules({ ...goodRun(), unexpectedExits: [{ what: "server 1 (pid 9)", at: T }] })).toEqual([
      "process-exit",
    ]);
  });
});

describe("the fault schedule", () => {
  const options = { durationMs: 60_000, workers: ["a", "b", "c"], servers: 3, graceMs: 4000 };

  it("is decided by the seed alone, and has every kind of fault in a short run", () => {
    const plan = planFaults(7, options);
    expect(planFaults(7, options)).toEqual(plan);
    expect(planFaults(8, options)).not.toEqual(plan);
    expect(new Set(plan.map((f) => f.kind))).toEqual(
      new Set(["cut", "stall", "refuse", "agent-kill", "server-kill", "pg-outage", "pg-restart"]),
    );
  });

  it("never gives one target two faults at once, and ends every fault within the duration", () => {
    for (const seed of [1, 2, 3, 4, 5]) {
      const plan = planFaults(seed, options);
      for (const f of plan) expect(f.atMs + f.durationMs).toBeLessThanOrEqual(options.durationMs);
      const lock = (t: string) => (t.startsWith("server-") ? "servers" : t);
      for (const [i, f] of plan.entries()) {
        for (const g of plan.slice(i + 1)) {
          if (lock(g.target) === lock(f.target)) expect(g.atMs).toBeGreaterThan(f.atMs + f.durationMs);
        }
      }
    }
  });
});
