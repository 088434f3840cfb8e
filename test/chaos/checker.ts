/**
 * The chaos run's checker: a pure function from what the run recorded (the
 * database's rows, the agents' execution logs, the fault log) to the list of
 * rule violations. It trusts nothing the servers say about themselves beyond
 * the rows, and recomputes every agent's self-fence deadline from the wire
 * (see chaos-agent.ts), not from the SDK's own bookkeeping.
 *
 * All times are milliseconds since the Unix epoch on this machine's clock:
 * the servers, PostgreSQL (`now()`), the agents and the orchestrator run on
 * one machine, so their timestamps are directly comparable.
 *
 * The rules, precisely (test/chaos/README.md says the same in prose):
 *
 * - `process-exit`: no server or agent exits unless the run killed or stopped it.
 * - `not-final`: every submitted action exists and is SUCCEEDED, FAILED or CANCELLED.
 * - `outcome`: an action submitted with `fail: true` ended FAILED by its handler's (non-retryable)
 *   failure, any other SUCCEEDED; unless its system-retry budget ran out (FAILED, and then it must
 *   have no completion at all).
 * - `completion`: a finished action has exactly one terminal attempt (SUCCEEDED or FAILED), at the
 *   epoch the action ended at, exactly one `action_succeeded`/`action_failed` event, at that epoch,
 *   a SUCCEEDED action's output names that epoch (the handler writes it), and some execution of
 *   that (action, epoch) ran its handler to the end.
 * - `accepted-twice` / `stale-accepted`: across all agents' logs, at most one completion report
 *   per action was answered accepted, and never one whose epoch is not the action's final epoch
 *   (a fenced report must never be accepted).
 * - `ungranted-execution`: every execution's (action, epoch) has an attempt row for its worker.
 * - `started-unguaranteed`: no handler starts at a moment its agent's self-fence deadline has passed.
 * - `ran-past-fence`: no handler runs more than `stopAllowanceMs` into a stretch of time its
 *   agent's self-fence deadline had passed without a fresh heartbeat ack.
 * - `overlap`: no two executions of one action overlap in time at all. (Two epochs may in principle
 *   overlap only while the earlier one is within its self-fence deadline; but that deadline falls
 *   at least the margin before the persisted deadline, and the server re-grants only after it, so
 *   any overlap is a bug: the message says which side broke the protocol.)
 * - `unexplained-expiry`: every reaped session is explained by the faults. With D the session's
 *   persisted deadline when it was reaped, the worker's measured blackouts (below) must cover the
 *   whole of [D − grace + expiryAllowanceMs, D]: the worker could not have been heard from in it.
 *   A session reaped before D was ended by the hello of a new process of its worker (its
 *   predecessor's stream gone): a kill of that worker's agent must be under way when it ended,
 *   its blackout lasting until then (the new process's welcome follows the reap).
 *   The allowance (two heartbeat intervals plus scheduling slack) is what the persisted deadline
 *   may lag behind the last heartbeat: heartbeats are persisted once per interval, and the last
 *   renewal before a server's death or a database outage may be missing.
 *
 * A worker's blackouts, from the fault log and its own log lines (measured, never planned):
 * agent kill: the kill → the next welcome (any later incarnation); cut: the cut → the next
 * welcome; refuse: its start → the first welcome after it ended; stall: its start → the first
 * sign of contact (welcome or heartbeat ack) after it ended, plus `resumeAllowanceMs` (what the
 * stream's server heard is persisted at its next renewal tick); server kill (for workers connected
 * to that server, or between streams, at the kill): the kill → the next welcome; PostgreSQL
 * outage or restart (every worker): the stop began → PostgreSQL accepted connections again;
 * the end of the run: from the worker's last stop on.
 */

/** One line of a chaos agent's execution log. */
export interface AgentLine {
  /**
   * `process` (an incarnation began), `start` / `end` (a handler), `deadline` (the self-fence
   * deadline moved), or one of the SDK's events: `connected`, `disconnected`, `grant`,
   * `finished`, `revoked`, `self_fenced`, `drain`.
   */
  readonly type: string;
  readonly ts: number;
  readonly pid: number;
  readonly worker: string;
  readonly actionId?: string;
  readonly epoch?: number;
  /** `end`: succeeded | failed | aborted; `finished`: succeeded | failed | released. */
  readonly outcome?: string;
  /** `end` of an aborted handler: the LeaseLost reason (self_fenced, expired, superseded, ...). */
  readonly reason?: string;
  /** `finished`: whether the server accepted the report. */
  readonly accepted?: boolean;
  /** `deadline`: the new self-fence deadline. */
  readonly deadline?: number;
  /** `connected`: the address the stream went to (a proxy listener). */
  readonly address?: string;
  readonly sessionId?: string;
  /** `disconnected`: why the stream ended. */
  readonly error?: string;
}

/** One agent process: from spawn to SIGKILL (`killed`) or to its exit after SIGTERM at the end. */
export interface Incarnation {
  readonly worker: string;
  readonly pid: number;
  readonly startedAt: number;
  readonly endedAt: number;
  readonly how: "killed" | "stopped";
}

export type FaultKind =
  | "cut"
  | "stall"
  | "refuse"
  | "agent-kill"
  | "server-kill"
  | "pg-outage"
  | "pg-restart";

/** A fault as it happened. */
export interface FaultRecord {
  readonly id: number;
  readonly kind: FaultKind;
  /** A worker id (agent faults), `server-<i>`, or `postgres`. */
  readonly target: string;
  /** When the schedule wanted it, in ms after the chaos phase began, and for how long. */
  readonly plannedAtMs: number;
  readonly plannedMs: number;
  /** Measured: when it took effect. */
  readonly start: number;
  /**
   * Measured: when it was lifted (stall and refuse: forwarding and accepting again; cut: = start;
   * agent or server kill: the new process spawned; PostgreSQL: accepting connections again).
   */
  readonly end: number;
  /** Server kill: when the restarted server said it serves. */
  readonly ready?: number;
}

export interface ActionRow {
  readonly id: string;
  readonly state: string;
  readonly epoch: number;
  readonly output: Record<string, unknown> | null;
  readonly failureReason: string;
}

export interface AttemptRow {
  readonly actionId: string;
  readonly epoch: number;
  readonly workerId: string;
  readonly sessionId: string;
  readonly outcome: string;
}

export interface SessionRow {
  readonly id: string;
  readonly workerId: string;
  readonly deadline: number;
  readonly endedAt: number | null;
  readonly endReason: string | null;
}

export interface EventRow {
  readonly sequence: number;
  readonly kind: string;
  readonly at: number;
  readonly actionId: string | null;
  readonly workerId: string | null;
  readonly sessionId: string | null;
  readonly epoch: number | null;
}

/** What the checker reads. */
export interface ChaosRecord {
  readonly config: CheckerConfig;
  /** Every action the client submitted (accepted by a server), with whether its handler must fail. */
  readonly submitted: readonly { readonly actionId: string; readonly fail: boolean }[];
  readonly agentLines: readonly AgentLine[];
  readonly incarnations: readonly Incarnation[];
  readonly faults: readonly FaultRecord[];
  /** Which server (index) each proxy listener address forwards to. */
  readonly proxyServer: Readonly<Record<string, number>>;
  readonly db: {
    readonly actions: readonly ActionRow[];
    readonly attempts: readonly AttemptRow[];
    readonly sessions: readonly SessionRow[];
    readonly events: readonly EventRow[];
  };
  /** Servers and agents that exited while nobody killed or stopped them. */
  readonly unexpectedExits: readonly { readonly what: string; readonly at: number }[];
}

export interface CheckerConfig {
  readonly graceMs: number;
  readonly heartbeatMs: number;
  /** How long a handler may take to stop once its agent's deadline passed. */
  readonly stopAllowanceMs: number;
  /** How far the persisted deadline may lag behind last heartbeat + grace. */
  readonly expiryAllowanceMs: number;
  /**
   * How long after a stalled stream is heard again its session may still be
   * reaped: the hosting server persists what it heard at its next renewal
   * tick, up to a heartbeat interval later (a hello persists at once).
   */
  readonly resumeAllowanceMs: number;
}

export interface Violation {
  readonly rule:
    | "not-final"
    | "outcome"
    | "completion"
    | "accepted-twice"
    | "stale-accepted"
    | "ungranted-execution"
    | "started-unguaranteed"
    | "ran-past-fence"
    | "overlap"
    | "unexplained-expiry"
    | "process-exit";
  readonly actionId?: string;
  readonly worker?: string;
  readonly message: string;
}

/** One run of a handler, as the agent's log shows it. */
export interface Execution {
  readonly worker: string;
  readonly pid: number;
  readonly actionId: string;
  readonly epoch: number;
  readonly start: number;
  /** When the handler returned; for a handler cut short by its process's end, that end. */
  readonly end: number;
  readonly outcome: string;
  readonly reason: string | undefined;
  /** The handler never logged its end: its process was killed or stopped under it. */
  readonly unended: boolean;
}

/** A stretch of time in which a worker could not be heard from. */
export interface Blackout {
  readonly from: number;
  readonly to: number;
  /** The fault (`<kind>#<id>`) or `end-of-run`. */
  readonly cause: string;
}

/** Facts derived on the way, for the run's summary. */
export interface CheckerFacts {
  readonly executions: readonly Execution[];
  /** Executions stopped by their agent's self-fence, and the most any ran past its deadline. */
  readonly selfFenced: number;
  readonly maxStopMs: number;
  readonly reapedSessions: number;
  readonly expiredLeases: number;
  readonly fencedReports: number;
  readonly partitions: number;
  /** Per reaped session: the blackouts that explained it (or did not). */
  readonly expiries: readonly { sessionId: string; worker: string; deadline: number; causes: string[] }[];
}

export interface CheckResult {
  readonly violations: readonly Violation[];
  readonly facts: CheckerFacts;
}

const FINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const iso = (ms: number) =>
  Number.isFinite(ms) ? new Date(ms).toISOString() : ms > 0 ? "the end" : "the start";

/** A process's self-fence deadline over time: the latest value set at or before each moment. */
class DeadlineTrack {
  /** (set at, deadline) pairs in time order, the deadline never decreasing. */
  private readonly updates: { at: number; deadline: number }[] = [];

  add(at: number, deadline: number): void {
    const last = this.updates.at(-1);
    if (last && deadline <= last.deadline) return;
    this.updates.push({ at, deadline });
  }

  /** The deadline in force at `t` (−∞ before the first ack). */
  at(t: number): number {
    let d = Number.NEGATIVE_INFINITY;
    for (const u of this.updates) {
      if (u.at > t) break;
      d = u.deadline;
    }
    return d;
  }

  /** The stretches in [from, to] with no guarantee: from a deadline to the ack that moved it on. */
  uncovered(from: number, to: number): { from: number; to: number; deadline: number }[] {
    const spans: { from: number; to: number; deadline: number }[] = [];
    let deadline = Number.NEGATIVE_INFINITY;
    let since = Number.NEGATIVE_INFINITY;
    const push = (start: number, end: number) => {
      if (start >= end) return;
      const prev = spans.at(-1);
      // Adjacent stretches (an ack that came when its guarantee had already run out) are one.
      if (prev && start <= prev.to) prev.to = Math.max(prev.to, end);
      else spans.push({ from: start, to: end, deadline });
    };
    for (const u of this.updates) {
      push(Math.max(deadline, since), u.at);
      deadline = u.deadline;
      since = u.at;
    }
    push(Math.max(deadline, since), Number.POSITIVE_INFINITY);
    return spans
      .map((s) => ({ ...s, from: Math.max(s.from, from), to: Math.min(s.to, to) }))
      .filter((s) => s.from < s.to);
  }
}

/** Groups `items` by `key`. */
function groupBy<T>(items: readonly T[], key: (t: T) => string): Map<string, T[]> {
  const groups = new Map<string, T[]>();
  for (const item of items) {
    const k = key(item);
    const group = groups.get(k);
    if (group) group.push(item);
    else groups.set(k, [item]);
  }
  return groups;
}

/** The executions in the agents' logs: `start` lines paired with their `end` lines. */
export function executionsOf(lines: readonly AgentLine[], incarnations: readonly Incarnation[]): Execution[] {
  const endOf = new Map(incarnations.map((i) => [i.pid, i.endedAt]));
  const open = new Map<string, AgentLine>();
  const executions: Execution[] = [];
  const key = (l: AgentLine) => `${l.pid} ${l.actionId} ${l.epoch}`;
  for (const line of lines) {
    if (line.type === "start") open.set(key(line), line);
    else if (line.type === "end") {
      const start = open.get(key(line));
      if (!start) continue;
      open.delete(key(line));
      executions.push({
        worker: line.worker,
        pid: line.pid,
        actionId: line.actionId ?? "",
        epoch: line.epoch ?? 0,
        start: start.ts,
        end: line.ts,
        outcome: line.outcome ?? "",
        reason: line.reason,
        unended: false,
      });
    }
  }
  for (const start of open.values()) {
    executions.push({
      worker: start.worker,
      pid: start.pid,
      actionId: start.actionId ?? "",
      epoch: start.epoch ?? 0,
      start: start.ts,
      end: endOf.get(start.pid) ?? Number.POSITIVE_INFINITY,
      outcome: "cut-short",
      reason: undefined,
      unended: true,
    });
  }
  return executions.sort((a, b) => a.start - b.start);
}

/** Each worker's blackouts (see the file's comment), merged where they touch. */
export function blackoutsOf(record: ChaosRecord): Map<string, Blackout[]> {
  const byWorker = groupBy(
    [...record.agentLines].sort((a, b) => a.ts - b.ts),
    (l) => l.worker,
  );
  const workers = new Set([...byWorker.keys(), ...record.incarnations.map((i) => i.worker)]);
  const first = (worker: string, after: number, types: readonly string[]) =>
    byWorker.get(worker)?.find((l) => l.ts >= after && types.includes(l.type))?.ts ??
    Number.POSITIVE_INFINITY;
  const welcomeAfter = (worker: string, after: number) => first(worker, after, ["connected"]);
  const contactAfter = (worker: string, after: number) => first(worker, after, ["connected", "deadline"]);
  const raw = new Map<string, Blackout[]>([...workers].map((w) => [w, []]));
  const add = (worker: string, from: number, to: number, cause: string) =>
    raw.get(worker)?.push({ from, to, cause });

  for (const f of record.faults) {
    const cause = `${f.kind}#${f.id}`;
    switch (f.kind) {
      case "agent-kill":
      case "cut":
        add(f.target, f.start, welcomeAfter(f.target, f.start), cause);
        break;
      case "refuse":
        add(f.target, f.start, welcomeAfter(f.target, f.end), cause);
        break;
      case "stall":
        add(f.target, f.start, contactAfter(f.target, f.end) + record.config.resumeAllowanceMs, cause);
        break;
      case "server-kill": {
        const server = Number(f.target.replace("server-", ""));
        for (const worker of workers) {
          // The worker's stream at the kill: the last welcome before it, unless it ended since.
          const before = (byWorker.get(worker) ?? []).filter(
            (l) =>
              l.ts <= f.start &&
              (l.type === "connected" || l.type === "disconnected" || l.type === "process"),
          );
          const last = before.at(-1);
          const between = last === undefined || last.type !== "connected";
          const onIt = last?.type === "connected" && record.proxyServer[last.address ?? ""] === server;
          if (between || onIt) add(worker, f.start, welcomeAfter(worker, f.start), cause);
        }
        break;
      }
      case "pg-outage":
      case "pg-restart":
        for (const worker of workers) add(worker, f.start, f.end, cause);
        break;
    }
  }
  for (const [worker, incarnations] of groupBy(record.incarnations, (i) => i.worker)) {
    const last = incarnations.reduce((a, b) => (b.startedAt > a.startedAt ? b : a));
    if (last.how === "stopped") add(worker, last.endedAt, Number.POSITIVE_INFINITY, "end-of-run");
  }

  const merged = new Map<string, Blackout[]>();
  for (const [worker, list] of raw) {
    const sorted = list.filter((b) => b.from <= b.to).sort((a, b) => a.from - b.from);
    const out: Blackout[] = [];
    for (const b of sorted) {
      const prev = out.at(-1);
      if (prev && b.from <= prev.to)
        out[out.length - 1] = { ...prev, to: Math.max(prev.to, b.to), cause: `${prev.cause}+${b.cause}` };
      else out.push(b);
    }
    merged.set(worker, out);
  }
  return merged;
}

/** Checks a chaos run's record against every rule; see the file's comment. */
export function checkChaos(record: ChaosRecord): CheckResult {
  const { config, db } = record;
  const violations: Violation[] = [];
  const lines = [...record.agentLines].sort((a, b) => a.ts - b.ts);
  const executions = executionsOf(lines, record.incarnations);

  // ---- every action final, with the right outcome and exactly one completion
  const actions = new Map(db.actions.map((a) => [a.id, a]));
  const attemptsOf = groupBy(db.attempts, (a) => a.actionId);
  const eventsOf = groupBy(
    db.events.filter((e) => e.actionId !== null),
    (e) => e.actionId as string,
  );
  const executionsByAction = groupBy(executions, (e) => e.actionId);
  const acceptedOf = groupBy(
    lines.filter(
      (l) =>
        l.type === "finished" && l.accepted === true && (l.outcome === "succeeded" || l.outcome === "failed"),
    ),
    (l) => l.actionId ?? "",
  );
  for (const { actionId, fail } of record.submitted) {
    const action = actions.get(actionId);
    if (!action || !FINAL.has(action.state)) {
      violations.push({
        rule: "not-final",
        actionId,
        message: action ? `still ${action.state} at epoch ${action.epoch}` : "not in the database",
      });
      continue;
    }
    const terminal = (attemptsOf.get(actionId) ?? []).filter(
      (a) => a.outcome === "SUCCEEDED" || a.outcome === "FAILED",
    );
    const exhausted = action.state === "FAILED" && action.failureReason.includes("system-retry budget");
    const want = fail ? "FAILED" : "SUCCEEDED";
    if (exhausted) {
      if (terminal.length > 0)
        violations.push({
          rule: "completion",
          actionId,
          message: `failed for its system-retry budget, yet has a completed attempt at epoch ${terminal[0]?.epoch}`,
        });
    } else if (action.state !== want) {
      violations.push({
        rule: "outcome",
        actionId,
        message: `ended ${action.state} (${action.failureReason || "no reason"}); its handler ${fail ? "fails" : "succeeds"}`,
      });
    } else {
      const finals = (eventsOf.get(actionId) ?? []).filter(
        (e) => e.kind === "action_succeeded" || e.kind === "action_failed",
      );
      const problems: string[] = [];
      if (terminal.length !== 1 || terminal[0]?.epoch !== action.epoch)
        problems.push(
          `completed attempts at epochs [${terminal.map((a) => a.epoch).join(", ")}], want exactly one at ${action.epoch}`,
        );
      if (finals.length !== 1 || finals[0]?.epoch !== action.epoch)
        problems.push(
          `${finals.length} final events at epochs [${finals.map((e) => e.epoch).join(", ")}], want one at ${action.epoch}`,
        );
      if (action.state === "SUCCEEDED" && action.output?.epoch !== action.epoch)
        problems.push(`output names epoch ${String(action.output?.epoch)}`);
      const ran = (executionsByAction.get(actionId) ?? []).some(
        (e) => e.epoch === action.epoch && (e.outcome === "succeeded" || e.outcome === "failed"),
      );
      if (!ran) problems.push(`no handler of epoch ${action.epoch} ran to its end`);
      if (problems.length > 0)
        violations.push({ rule: "completion", actionId, message: `${action.state}: ${problems.join("; ")}` });
    }
    const accepted = acceptedOf.get(actionId) ?? [];
    if (accepted.length > 1)
      violations.push({
        rule: "accepted-twice",
        actionId,
        message: `completion reports accepted ${accepted.length} times: ${accepted.map((l) => `${l.worker} epoch ${l.epoch} at ${iso(l.ts)}`).join(", ")}`,
      });
    for (const l of accepted) {
      if (l.epoch !== action.epoch)
        violations.push({
          rule: "stale-accepted",
          actionId,
          worker: l.worker,
          message: `a completion of epoch ${l.epoch} was accepted at ${iso(l.ts)}, but the action ended at epoch ${action.epoch}`,
        });
    }
  }

  // ---- executions: granted, started under a guarantee, stopped at the fence, never overlapping
  const granted = new Set(db.attempts.map((a) => `${a.actionId} ${a.epoch} ${a.workerId}`));
  const tracks = new Map<number, DeadlineTrack>();
  for (const l of lines) {
    if (l.type !== "deadline" || l.deadline === undefined) continue;
    const track = tracks.get(l.pid) ?? new DeadlineTrack();
    tracks.set(l.pid, track);
    track.add(l.ts, l.deadline);
  }
  let selfFenced = 0;
  let maxStopMs = 0;
  for (const x of executions) {
    const what = `${x.worker} (pid ${x.pid}) ran epoch ${x.epoch} from ${iso(x.start)} to ${x.unended ? `its process's end at ${iso(x.end)}` : iso(x.end)}`;
    if (!granted.has(`${x.actionId} ${x.epoch} ${x.worker}`))
      violations.push({
        rule: "ungranted-execution",
        actionId: x.actionId,
        worker: x.worker,
        message: `${what}, never granted to it`,
      });
    const track = tracks.get(x.pid) ?? new DeadlineTrack();
    const atStart = track.at(x.start);
    if (x.start >= atStart)
      violations.push({
        rule: "started-unguaranteed",
        actionId: x.actionId,
        worker: x.worker,
        message: `${what}; it started when its self-fence deadline (${Number.isFinite(atStart) ? iso(atStart) : "none yet"}) had passed`,
      });
    for (const span of track.uncovered(x.start, x.end)) {
      const past = span.to - span.from;
      if (x.reason === "self_fenced") maxStopMs = Math.max(maxStopMs, past);
      if (past > config.stopAllowanceMs)
        violations.push({
          rule: "ran-past-fence",
          actionId: x.actionId,
          worker: x.worker,
          message: `${what}; it ran ${Math.round(past)} ms past its self-fence deadline ${iso(span.deadline)} (allowed ${config.stopAllowanceMs} ms to stop)`,
        });
    }
    if (x.reason === "self_fenced") selfFenced += 1;
  }
  for (const [actionId, list] of executionsByAction) {
    for (let i = 0; i < list.length; i++) {
      for (let j = i + 1; j < list.length; j++) {
        const [a, b] = [list[i] as Execution, list[j] as Execution];
        if (b.start >= a.end) continue;
        const guarded = (tracks.get(a.pid) ?? new DeadlineTrack()).at(b.start) > b.start;
        violations.push({
          rule: "overlap",
          actionId,
          worker: b.worker,
          message: `${b.worker} (pid ${b.pid}) started epoch ${b.epoch} at ${iso(b.start)} while ${a.worker} (pid ${a.pid}) still ran epoch ${a.epoch} (${iso(a.start)} to ${iso(a.end)}); ${guarded ? "the earlier one was still within its self-fence deadline: re-granted too early" : "the earlier one was past its self-fence deadline: it did not stop"}`,
        });
      }
    }
  }

  // ---- every reaped session explained by measured faults
  const blackouts = blackoutsOf(record);
  const expiries: CheckerFacts["expiries"][number][] = [];
  const reaped = db.sessions.filter((s) => s.endReason === "reaped");
  for (const s of reaped) {
    const restarted = s.endedAt !== null && s.endedAt < s.deadline;
    const from = restarted ? (s.endedAt as number) : s.deadline - config.graceMs + config.expiryAllowanceMs;
    const to = restarted ? (s.endedAt as number) : s.deadline;
    const mine = blackouts.get(s.workerId) ?? [];
    const covering = mine.find(
      (b) =>
        b.from <= from &&
        b.to >= to &&
        (!restarted || b.cause.split("+").some((c) => c.startsWith("agent-kill"))),
    );
    const near = mine.filter((b) => b.to >= from - config.graceMs && b.from <= to + config.graceMs);
    expiries.push({
      sessionId: s.id,
      worker: s.workerId,
      deadline: s.deadline,
      causes: covering ? covering.cause.split("+") : [],
    });
    if (!covering)
      violations.push({
        rule: "unexplained-expiry",
        worker: s.workerId,
        message: `session ${s.id} of ${s.workerId} was reaped with deadline ${iso(s.deadline)}, but no measured blackout covers ${iso(from)} to ${iso(to)}; blackouts near it: ${
          near
            .map((b) => `${b.cause} ${iso(b.from)} to ${Number.isFinite(b.to) ? iso(b.to) : "the end"}`)
            .join(", ") || "none"
        }`,
      });
  }

  for (const e of record.unexpectedExits)
    violations.push({ rule: "process-exit", message: `${e.what} exited by itself at ${iso(e.at)}` });

  return {
    violations,
    facts: {
      executions,
      selfFenced,
      maxStopMs,
      reapedSessions: reaped.length,
      expiredLeases: db.events.filter((e) => e.kind === "lease_expired").length,
      fencedReports: db.events.filter((e) => e.kind === "report_fenced").length,
      partitions: db.events.filter((e) => e.kind === "cluster_partitioned").length,
      expiries,
    },
  };
}
