import { type Span, SpanKind, SpanStatusCode } from "@opentelemetry/api";
import type { Logger } from "pino";
import { createBatcher } from "../../store/batcher.js";
import type { Clock } from "../../store/clock.js";
import type { Db } from "../../store/database.js";
import type { FinishReport } from "../../store/queries/finish-actions.js";
import { type ProgressReport, recordProgress } from "../../store/queries/record-progress.js";
import type { Tracing } from "../../telemetry.js";
import { actionTopic, type ChangeFeed } from "../change-feed.js";
import { failureLog } from "../failure-log.js";
import type { LeaseToken, WorkerMessage } from "../worker-messages.js";
import type { Dispatcher } from "./dispatch.js";
import { createFencedEvents } from "./fenced-events.js";
import type { Hosted, HostedSessions } from "./hosted.js";

/**
 * Who answers reports. Completions and releases go to the dispatcher, which
 * settles them (fenced in SQL by action, epoch and session) in the statement
 * that refills their slots; progress reports are group-committed on their
 * own. Every report is answered once: once its outcome committed (accepted,
 * or FENCED with a revoke), or UNAVAILABLE when the database could not take
 * it, or while this process finds its database lost (see `databaseLost`).
 */
export interface Reports {
  finish(s: Hosted, m: Extract<WorkerMessage, { type: "completion" | "release" }>): void;
  progress(s: Hosted, m: Extract<WorkerMessage, { type: "progress" }>): void;
  /**
   * Settles a finishing report through the dispatcher once the reports of
   * its action received before it are answered (see {@link finish}); for
   * reports the server makes itself (a revoked lease left out of a heartbeat).
   */
  settle: Dispatcher["settle"];
  /** Answers a report as accepted. */
  accept(s: Hosted, reportId: bigint, token: LeaseToken, message: string): void;
  /**
   * Answers a report about a lease the stream does not hold: FENCED, a revoke, and an event row
   * (within the stream's budget: fenced-events.ts).
   */
  fenced(s: Hosted, reportId: bigint, token: LeaseToken, what: string): void;
  /**
   * Resolves once every completion, release and progress report received on
   * `s` so far is answered: a goodbye waits for them (worker.proto, Goodbye).
   */
  answeredAll(s: Hosted): Promise<void>;
  /** Resolves once the reports already received are answered, or handed to the dispatcher. */
  close(): Promise<void>;
  /** Whether a report of `actionId` is being applied (or waits for its turn) in this process. */
  inFlight(actionId: string): boolean;
  /**
   * A statement of this process (a renewal, a health check) was answered:
   * after reports answered UNAVAILABLE, `reports apply again` is logged now,
   * not when the next report happens to be applied (a minute later, or never
   * on a process whose workers went elsewhere).
   */
  databaseAnswered(): void;
}

/**
 * Most reports (completions, releases, progress) a stream may have
 * unanswered before this process stops reading it, until a quarter are left
 * (worker.proto): a stream sending them faster than they commit (a flood)
 * holds itself back, not the other streams' reports queued behind its own,
 * nor this process's memory. A worker holds at most twice its capacity in
 * leases, each with at most one completion or release in flight; 1,024 at
 * least.
 */
export const maxUnansweredReports = (capacity: number) => Math.max(1024, 4 * capacity);

/**
 * Most characters of JSON text (progress details and checkpoints, each up to 1 MiB) a
 * stream's unanswered reports may hold before this process stops reading it,
 * until a quarter is left: progress reports of one action are applied one
 * after another, so a worker sending large ones faster than they commit
 * would otherwise queue them in memory without bound.
 */
export const MAX_UNANSWERED_CHARS = 8 * 1024 * 1024;

/** What a report said, as counted: a completion's outcome, a release, or progress. */
export type ReportKind = "succeeded" | "failed" | "released" | "progress";
/** How a report was answered. */
export type ReportResult = "accepted" | "fenced" | "unavailable";

export function createReports(deps: {
  db: Db;
  clock: Clock;
  log: Logger;
  feed: ChangeFeed;
  hosted: HostedSessions;
  dispatcher: Dispatcher;
  fencedReports: { inc(n?: number): void };
  /** Counts the releases accepted that their workers made on their self-fence. */
  selfFencedReleases?: { inc(n?: number): void };
  /** Counts every report answered, by what it said and its answer. */
  answered: { inc(labels: { kind: ReportKind; result: ReportResult }): void };
  /** Wakes the watchers of these actions (and of the event feed). */
  publishActions: (ids: Iterable<string>) => void;
  /** Spans for the completions and releases of traced actions. */
  tracing: Tracing;
  /** Log every report's answer at debug level. */
  debug?: boolean;
  /** The window of a stream's budget of fenced-report events (fenced-events.ts). */
  fencedEventsWindowMs?: number;
  /**
   * Whether this process finds its database lost now (what the heartbeat
   * acks say, HeartbeatAck.database_unreachable): a report that arrives then
   * is answered UNAVAILABLE at once, and so is every report still waiting
   * for its answer, looked at every `checkEveryMs`: a database that hangs
   * rather than refuses would hold them until it answers. None: reports wait
   * for the database however long it takes (PGlite, in this process).
   *
   * Answering before the statement ends is safe because a report whose
   * statement was sent may still commit after its UNAVAILABLE, and the copy
   * the worker sends again is then taken as what it is: a completion or
   * release whose attempt ended the same way is accepted as a repeat
   * (store/queries/finish-actions.ts, f_repeated); progress is applied again
   * (the same phase, details and checkpoint, or newer ones coalesced with
   * them), or FENCED if the lease ended meanwhile, as it would be anyway.
   * Reports of an action apply in arrival order still: one answered early
   * keeps its action's turn until its statement ends, and one whose turn had
   * not come is never applied. That order is this process's: progress is
   * fenced by action, epoch and session, not by stream, so a progress
   * statement hung here can commit after a newer one the worker sent to
   * another process once it moved (as it could before this early answer,
   * when the worker moved while its report was held); worker.proto says so.
   * And a statement hung on a pool connection after the database answers
   * again keeps its action's turn (the early answers stop with
   * `databaseLost`): later reports of that action wait for it.
   */
  databaseLost?: () => boolean;
  /** How often the reports waiting are looked at while `databaseLost` may say so; default 500 ms. */
  checkEveryMs?: number;
}): Reports {
  const { db, clock, log, feed, hosted, dispatcher, publishActions } = deps;

  /**
   * Splits a batch into rounds with unique action ids (one statement may touch an action once):
   * the indexes of each round's items, the n-th report of an action in the n-th round.
   */
  function rounds(items: readonly { actionId: string }[]): number[][] {
    const seen = new Map<string, number>();
    const result: number[][] = [];
    items.forEach((item, i) => {
      const n = seen.get(item.actionId) ?? 0;
      seen.set(item.actionId, n + 1);
      if (n === result.length) result.push([]);
      result[n]?.push(i);
    });
    return result;
  }

  const progressBatch = createBatcher<ProgressReport, boolean>(async (batch) => {
    const accepted = batch.map(() => false);
    for (const round of rounds(batch)) {
      const applied = await recordProgress(
        db,
        clock,
        round.map((i) => batch[i] as ProgressReport),
      );
      for (const k of applied) accepted[round[k] as number] = true;
    }
    return accepted;
  });

  /** The event rows of fenced reports: group-committed, and bounded per stream. */
  const fencedEvents = createFencedEvents({
    db,
    log,
    feed,
    ...(deps.fencedEventsWindowMs ? { windowMs: deps.fencedEventsWindowMs } : {}),
  });

  /**
   * The reports of one action are applied one after another, in the order
   * they arrived (a batch is handled as if sent one by one). A progress report
   * and a completion or release go through different statements (the
   * progress batch, the dispatcher's round) that could commit in either
   * order: a release committed first fenced the progress sent before it and
   * lost its checkpoint. While an action has a report in flight, its later
   * reports wait here; an action with none costs a map entry.
   */
  const inFlight = new Map<string, (() => void)[] | undefined>();

  function inTurn(actionId: string, apply: () => void): void {
    if (inFlight.has(actionId)) {
      let waiting = inFlight.get(actionId);
      if (!waiting) {
        waiting = [];
        inFlight.set(actionId, waiting);
      }
      waiting.push(apply);
      return;
    }
    inFlight.set(actionId, undefined);
    apply();
  }

  /** The report in flight of `actionId` is answered: the next one of that action goes. */
  function nextInTurn(actionId: string): void {
    const next = inFlight.get(actionId)?.shift();
    if (next) next();
    else {
      inFlight.delete(actionId);
      if (inFlight.size === 0) for (const w of drained.splice(0)) w();
    }
  }

  /** Waiters of {@link close} for the reports in flight. */
  const drained: (() => void)[] = [];

  function settle(...[s, report, done, failed]: Parameters<Dispatcher["settle"]>): void {
    settleUnlessAnswered(undefined, s, report, done, failed);
  }

  /** {@link settle}, unless `p` was answered before its turn came: then it is never applied. */
  function settleUnlessAnswered(
    p: Waiting | undefined,
    ...[s, report, done, failed]: Parameters<Dispatcher["settle"]>
  ): void {
    inTurn(report.actionId, () => {
      if (p?.answered) return nextInTurn(report.actionId);
      dispatcher.settle(
        s,
        report,
        (finished) => {
          nextInTurn(report.actionId);
          done(finished);
        },
        (error) => {
          nextInTurn(report.actionId);
          failed(error);
        },
      );
    });
  }

  function fenced(s: Hosted, reportId: bigint, token: LeaseToken, what: string): void {
    deps.fencedReports.inc();
    // What the worker must do, whichever way the lease ended (worker.proto, Revoke and Connect).
    const message =
      `${what} for action ${token.actionId} epoch ${token.epoch} refused: not a current lease of this session ` +
      "(it expired, was revoked or ended, or a different report of it landed first); " +
      "stop its work and report nothing more of it";
    if (deps.debug)
      log.debug({ ...token, workerId: s.workerId, sessionId: s.sessionId }, `report fenced: ${message}`);
    s.link.send({
      type: "report_result",
      reportId,
      ...token,
      accepted: false,
      rejectReason: "FENCED",
      message,
    });
    s.link.send({ type: "revoke", ...token, reason: "SUPERSEDED", message });
    hosted.letGo(s, token.actionId, token.epoch);
    fencedEvents.record(s, token, what);
  }

  /**
   * Reports answered UNAVAILABLE, which workers send again every few hundred
   * milliseconds while the database is down. The error says why (most often
   * the database cannot be reached).
   */
  const unapplied = failureLog(log, {
    failed:
      "could not apply a report; answering reports UNAVAILABLE until one applies again, for their workers to send them again",
    still: "could not apply a report",
    again: "reports apply again",
  });

  /**
   * A report received and not answered yet, while `deps.databaseLost` may
   * answer it early: once answered, what its statement does later tells
   * nobody (the worker sends it again, and that copy gets its own answer).
   */
  interface Waiting {
    readonly s: Hosted;
    readonly reportId: bigint;
    readonly token: LeaseToken;
    readonly kind: ReportKind;
    readonly span: Span | undefined;
    /** Says it was answered to the stream's counts (see {@link hold}). */
    readonly release: () => void;
    answered: boolean;
  }
  const waiting = new Set<Waiting>();
  let lookingAtWaiting: ReturnType<typeof setInterval> | undefined;

  /** Counts a report received on `s` until it is answered (see {@link hold}), to be answered once. */
  function receive(
    s: Hosted,
    m: { reportId: bigint; actionId: string; epoch: number },
    kind: ReportKind,
    span: Span | undefined,
    chars: number,
  ): Waiting {
    const token = { actionId: m.actionId, epoch: m.epoch };
    const p: Waiting = {
      s,
      reportId: m.reportId,
      token,
      kind,
      span,
      release: hold(s, chars),
      answered: false,
    };
    if (deps.databaseLost) {
      waiting.add(p);
      lookingAtWaiting ??= setInterval(answerWaitingIfLost, deps.checkEveryMs ?? 500);
      lookingAtWaiting.unref();
    }
    return p;
  }

  /** Marks `p` answered; false if it was already (early): then nothing more is said of it. */
  function answering(p: Waiting): boolean {
    if (p.answered) return false;
    p.answered = true;
    p.release();
    waiting.delete(p);
    if (waiting.size === 0 && lookingAtWaiting) {
      clearInterval(lookingAtWaiting);
      lookingAtWaiting = undefined;
    }
    return true;
  }

  const databaseLostError = () =>
    new Error(
      "this process finds its database unreachable (it refuses or hangs); reports are not held for it",
    );

  /** Answers every report waiting UNAVAILABLE, if the database is lost (a hang holds them). */
  function answerWaitingIfLost(): void {
    if (!deps.databaseLost?.()) return;
    const error = databaseLostError();
    for (const p of [...waiting]) {
      if (!answering(p)) continue;
      deps.answered.inc({ kind: p.kind, result: "unavailable" });
      endSpan(p.span, false, "UNAVAILABLE");
      unavailable(p.s, p.reportId, p.token, error);
    }
  }

  /** Answers a report UNAVAILABLE at once, unread, if the database is lost; false if not. */
  function refusedWhileLost(
    s: Hosted,
    m: { reportId: bigint; actionId: string; epoch: number },
    kind: ReportKind,
    span: Span | undefined,
  ): boolean {
    if (!deps.databaseLost?.()) return false;
    deps.answered.inc({ kind, result: "unavailable" });
    endSpan(span, false, "UNAVAILABLE");
    unavailable(s, m.reportId, { actionId: m.actionId, epoch: m.epoch }, databaseLostError());
    return true;
  }

  function unavailable(s: Hosted, reportId: bigint, token: LeaseToken, error: unknown): void {
    unapplied.failed(error, { actionId: token.actionId, workerId: s.workerId });
    s.link.send({
      type: "report_result",
      reportId,
      ...token,
      accepted: false,
      rejectReason: "UNAVAILABLE",
      message: "the server could not apply the report now (database unavailable); send it again",
    });
  }

  function accept(s: Hosted, reportId: bigint, token: LeaseToken, message: string): void {
    if (deps.debug)
      log.debug({ ...token, workerId: s.workerId, sessionId: s.sessionId }, `report accepted: ${message}`);
    s.link.send({ type: "report_result", reportId, ...token, accepted: true, message });
  }

  /**
   * A span from a report's arrival to its answer (completion, release,
   * progress), in the trace of the agent's work (the completion's
   * trace_parent) or of the grant; none for an action that is not traced.
   */
  function reportSpan(s: Hosted, m: Extract<WorkerMessage, { type: "completion" | "release" | "progress" }>) {
    if (!deps.tracing.enabled) return undefined;
    const parent = (m.type === "completion" && m.traceParent) || hosted.traceOf(s, m.actionId);
    if (!parent) return undefined;
    return deps.tracing.start(
      `leasehold.report.${m.type}`,
      parent,
      {
        "leasehold.action_id": m.actionId,
        "leasehold.epoch": m.epoch,
        "leasehold.worker_id": s.workerId,
        "leasehold.session_id": s.sessionId,
        ...(m.type === "completion" ? { "leasehold.outcome": m.outcome.kind } : {}),
        ...(m.type === "progress" ? { "leasehold.phase": m.phase } : {}),
      },
      SpanKind.CONSUMER,
    );
  }

  function endSpan(span: Span | undefined, accepted: boolean, result: string): void {
    if (!span) return;
    span.setAttributes({ "leasehold.accepted": accepted, "leasehold.result": result });
    if (!accepted) span.setStatus({ code: SpanStatusCode.ERROR, message: result });
    span.end();
  }

  function finish(s: Hosted, m: Extract<WorkerMessage, { type: "completion" | "release" }>): void {
    const token = { actionId: m.actionId, epoch: m.epoch };
    const span = reportSpan(s, m);
    // Fenced in SQL by (action, epoch, session). The session is this stream's, and the hello
    // checked that its principal owns the session, so the report needs no principal check.
    // Written out field by field: V8 (Node 20) takes microseconds for an object literal that
    // begins with a spread and goes on with more properties, on every report.
    const { actionId, epoch } = m;
    const { sessionId, principal: actor } = s;
    const report: FinishReport =
      m.type === "release"
        ? { actionId, epoch, sessionId, actor, kind: "released", reason: m.reason, selfFenced: m.selfFenced }
        : m.outcome.kind === "succeeded"
          ? { actionId, epoch, sessionId, actor, kind: "succeeded", output: m.outcome.output }
          : {
              actionId,
              epoch,
              sessionId,
              actor,
              kind: "failed",
              error: {
                message: m.outcome.message,
                retryable: m.outcome.retryable,
                details: m.outcome.details,
              },
            };
    const kind = report.kind;
    if (refusedWhileLost(s, m, kind, span)) return;
    const p = receive(s, m, kind, span, 0);
    settleUnlessAnswered(
      p,
      s,
      report,
      (finished) => {
        unapplied.worked();
        if (!answering(p)) {
          // Answered UNAVAILABLE while its statement hung, and committed since: the copy sent
          // again is accepted as a repeat.
          if (finished) publishActions([token.actionId]);
          return;
        }
        if (!finished) {
          deps.answered.inc({ kind, result: "fenced" });
          endSpan(span, false, "FENCED");
          return fenced(s, m.reportId, token, m.type);
        }
        deps.answered.inc({ kind, result: "accepted" });
        if (m.type === "release" && m.selfFenced) deps.selfFencedReleases?.inc();
        accept(s, m.reportId, token, `action is now ${finished.state}`);
        endSpan(span, true, finished.state);
        publishActions([token.actionId]);
      },
      (error) => {
        if (!answering(p)) return;
        deps.answered.inc({ kind, result: "unavailable" });
        endSpan(span, false, "UNAVAILABLE");
        unavailable(s, m.reportId, token, error);
      },
    );
  }

  /**
   * Counts a report received on `s` until it is answered, with the JSON text it holds: past
   * either bound the stream is not read, until a quarter of both is left. Returns the call that
   * says it was answered.
   */
  function hold(s: Hosted, chars: number): () => void {
    const max = maxUnansweredReports(s.capacity);
    s.unansweredChars += chars;
    if (++s.unanswered >= max || s.unansweredChars >= MAX_UNANSWERED_CHARS) {
      s.heldBack = true;
      s.link.throttle(true);
    }
    return () => {
      s.unansweredChars -= chars;
      if (--s.unanswered <= max / 4 && s.unansweredChars <= MAX_UNANSWERED_CHARS / 4 && s.heldBack) {
        s.heldBack = false;
        s.link.throttle(false);
      }
      if (s.unanswered === 0) {
        allAnswered.get(s)?.();
        allAnswered.delete(s);
      }
    };
  }

  /** Streams waiting for their last report to be answered (a goodbye), and what to call then. */
  const allAnswered = new WeakMap<Hosted, () => void>();
  function answeredAll(s: Hosted): Promise<void> {
    if (s.unanswered === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const before = allAnswered.get(s);
      allAnswered.set(s, () => {
        before?.();
        resolve();
      });
    });
  }

  function progress(s: Hosted, m: Extract<WorkerMessage, { type: "progress" }>): void {
    const token = { actionId: m.actionId, epoch: m.epoch };
    const span = reportSpan(s, m);
    const details = m.details === undefined ? undefined : JSON.stringify(m.details);
    const checkpoint = m.checkpoint === undefined ? undefined : JSON.stringify(m.checkpoint);
    if (refusedWhileLost(s, m, "progress", span)) return;
    const p = receive(s, m, "progress", span, (details?.length ?? 0) + (checkpoint?.length ?? 0));
    inTurn(m.actionId, () => {
      if (p.answered) return nextInTurn(m.actionId);
      progressBatch
        .add({
          actionId: m.actionId,
          epoch: m.epoch,
          sessionId: s.sessionId,
          phase: m.phase,
          details,
          checkpoint,
        })
        .then(
          (ok) => {
            nextInTurn(m.actionId);
            unapplied.worked();
            if (!answering(p)) {
              // Answered UNAVAILABLE while its statement hung: the copy sent again is applied again.
              if (ok) feed.publish(actionTopic(token.actionId));
              return;
            }
            if (!ok) {
              deps.answered.inc({ kind: "progress", result: "fenced" });
              endSpan(span, false, "FENCED");
              return fenced(s, m.reportId, token, "progress");
            }
            deps.answered.inc({ kind: "progress", result: "accepted" });
            accept(s, m.reportId, token, "progress recorded");
            endSpan(span, true, "RECORDED");
            feed.publish(actionTopic(token.actionId));
          },
          (error: unknown) => {
            nextInTurn(m.actionId);
            if (!answering(p)) return;
            deps.answered.inc({ kind: "progress", result: "unavailable" });
            endSpan(span, false, "UNAVAILABLE");
            unavailable(s, m.reportId, token, error);
          },
        );
    });
  }

  async function close(): Promise<void> {
    while (inFlight.size > 0) await new Promise<void>((resolve) => drained.push(resolve));
    clearInterval(lookingAtWaiting);
    lookingAtWaiting = undefined;
    await progressBatch.close();
    await fencedEvents.close();
  }

  return {
    finish,
    progress,
    settle,
    accept,
    fenced,
    answeredAll,
    close,
    inFlight: (actionId) => inFlight.has(actionId),
    databaseAnswered: () => unapplied.worked(),
  };
}
