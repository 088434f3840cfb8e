import type { Logger } from "pino";
import type { Clock } from "../../store/clock.js";
import type { Db } from "../../store/database.js";
import type { GrantRecord } from "../../store/queries/claim-actions.js";
import type { Finished, FinishReport } from "../../store/queries/finish-actions.js";
import { actionsLeasedTo } from "../../store/queries/leased-actions.js";
import {
  type ClaimRequest,
  type Slot,
  type SlotGroup,
  settleAndGrant,
} from "../../store/queries/settle-and-grant.js";
import { failureLog } from "../failure-log.js";
import type { Hosted, HostedSessions } from "./hosted.js";

/**
 * The one loop of a process that writes the lease hot path: it settles
 * finishing reports and claims queued actions for free slots, both in one
 * statement per round (`settleAndGrant`). A report's slot is refilled by the
 * same commit that applies the report, and its answer and the refill's grant
 * go out to the stream in the same synchronous run. Everything asked while a
 * round runs is done together in the next: one claim serves every freed slot
 * of the process, whatever woke it.
 */
export interface Dispatcher {
  /**
   * Queues a report of stream `s`. `done` runs once it committed, with the
   * result (undefined: fenced); `failed` if its statement failed. Both run
   * in the round's synchronous answer, before that round's grants are sent.
   */
  settle(
    s: Hosted,
    report: FinishReport,
    done: (finished: Finished | undefined) => void,
    failed: (error: unknown) => void,
  ): void;
  /**
   * The queue may have changed (actions submitted or re-queued, a poll):
   * asks for a claim for every stream with room.
   */
  wake(): void;
  /**
   * A stream gained room (a hello, a freed slot, an ack): asks for a claim
   * for the streams with room whose group's queue was not found empty since
   * the last {@link wake}.
   */
  wakeForRoom(): void;
  /** Resolves when no round runs or is scheduled. */
  idle(): Promise<void>;
  /**
   * How long the oldest statement of the dispatcher in flight (a round, or
   * the look for in-doubt grants) has waited for its answer; 0 if none.
   * While one waits, the reports it settles and the slots it claims for wait
   * with it, and while the look waits nothing else is dispatched.
   */
  waitingMs(): number;
  /**
   * Logs an error once a statement has waited longer than `hangMs` (and
   * again, as info, once none has): called on every dispatch poll.
   */
  watch(): void;
}

/**
 * Default of the dispatcher's `hangMs`. A round's statement takes
 * milliseconds; one that waits this long has lost its connection's answer
 * (the driver once dropped a statement sent on a connection that had just
 * been reset, and the dispatcher then waited for it forever).
 */
export const DISPATCH_HANG_MS = 30_000;

/** Largest number of reports settled, and of slots claimed for, per statement. */
export const BATCH = 256;
/** Reports of one stream a round takes before it takes more of any stream's. */
export const SHARE = 32;
/**
 * Statements in flight at once. One at a time, a round waits for the last
 * one's round trip even while the database has cores to spare; a few at once
 * keep it busy, and under load each still carries a growing batch.
 */
const PIPELINE = 3;

interface Pending {
  readonly s: Hosted;
  readonly report: FinishReport;
  readonly done: (finished: Finished | undefined) => void;
  readonly failed: (error: unknown) => void;
}

export function createDispatcher(deps: {
  db: Db;
  clock: Clock;
  log: Logger;
  hosted: HostedSessions;
  graceMs: number;
  /**
   * How long a statement may go unanswered before the dispatcher calls it
   * hung: the look for in-doubt grants (a read) is then given up as failed and
   * tried again on the next wake-up, and {@link Dispatcher.watch} logs an
   * error. A round is not given up: its answer says what it committed. Default
   * {@link DISPATCH_HANG_MS}.
   */
  hangMs?: number;
  /** Called with the grants of every round, after they were sent. */
  granted: (grants: readonly GrantRecord[]) => void;
  stopped: () => boolean;
}): Dispatcher {
  const { db, clock, log, hosted, graceMs } = deps;
  const hangMs = deps.hangMs ?? DISPATCH_HANG_MS;
  let queue: Pending[] = [];
  let wanted = false;
  const rounds = failureLog(log, {
    failed: "dispatch failed; retrying on the next tick",
    still: "dispatch still failing",
    again: "dispatch works again",
  });
  /** Actions whose reports a round in flight settles: a later report of one waits for it. */
  const settling = new Set<string>();
  /**
   * By session: slots claimed for by rounds in flight, less the slots their
   * reports free (neither is in `held` yet).
   */
  const reserved = new Map<string, number>();
  /**
   * Wake-ups so far. One that comes while a round runs may have found its
   * streams' room promised to that round, which may fill less (it claimed
   * before the new actions committed): the round's end claims again.
   */
  let wakes = 0;
  /**
   * Groups (cluster and labels) whose last claim found fewer free queued
   * actions than it had slots for: until the queue changes ({@link wake}),
   * a stream of theirs gaining room does not cost a claim. Without it every
   * hello of 10,000 idle workers ran a claim that found nothing.
   */
  const empty = new Set<string>();
  /** Queue changes so far: a round that claimed before the latest one cannot tell a group empty. */
  let queueChanges = 0;
  const queueChanged = () => {
    queueChanges++;
    empty.clear();
  };
  const reserve = (sessionId: string, n: number) => {
    const r = (reserved.get(sessionId) ?? 0) + n;
    if (r === 0) reserved.delete(sessionId);
    else reserved.set(sessionId, r);
  };

  /**
   * Sessions claimed for by a statement whose outcome is unknown (the
   * connection broke around its commit), and until when to look (a commit
   * can still land late).
   */
  const inDoubt = new Map<string, number>();

  /** The next reports (see {@link takeReports}). */
  function take(): Pending[] {
    if (queue.length === 0) return [];
    const { batch, rest } = takeReports(queue, settling);
    queue = rest;
    return batch;
  }

  /**
   * The free slots to claim for: first those the reports free, then those of
   * other streams with room, longest waiting first, at most {@link BATCH}.
   * Streams of one group get their slots in turns, so claimed actions spread
   * over them.
   */
  function slotsFor(
    freeing: ReadonlyMap<Hosted, number>,
    claimAll: boolean,
  ): ClaimRequest & { groupKeys: string[] } {
    const rooms = new Map<Hosted, number>();
    let total = 0;
    const skip = (groupKey: string) => empty.has(groupKey);
    // A slot a report frees is claimed for even in a group known empty: the mark is a guess
    // (another process may hold the rows it missed), and guessing wrong must not idle a worker.
    const consider = (s: Hosted, always: boolean) => {
      if (total >= BATCH || rooms.has(s) || (!always && skip(s.groupKey))) return;
      const room = hosted.room(s, freeing.get(s) ?? 0);
      const free = room - (reserved.get(s.sessionId) ?? 0);
      const n = Math.min(free, BATCH - total);
      if (n <= 0) return;
      rooms.set(s, n);
      total += n;
    };
    for (const s of freeing.keys()) consider(s, true);
    if (claimAll) {
      // Stop at a full claim: walking every stream with room would make each wake-up cost
      // as much as the number of hosted streams (10,000 idle workers, one hello each).
      for (const s of hosted.roomy(skip)) {
        if (total >= BATCH) break;
        consider(s, false);
      }
    }
    const groups = new Map<string, { group: SlotGroup; members: [Hosted, number][] }>();
    for (const [s, n] of rooms) {
      let entry = groups.get(s.groupKey);
      if (!entry) {
        entry = { group: { g: groups.size, cluster: s.cluster, labels: s.labels, room: 0 }, members: [] };
        groups.set(s.groupKey, entry);
      }
      entry.members.push([s, n]);
    }
    const slots: Slot[] = [];
    const result: SlotGroup[] = [];
    const groupKeys: string[] = [];
    for (const [key, { group, members }] of groups) {
      groupKeys[group.g] = key;
      let n = 0;
      for (let turn = 1; ; turn++) {
        let dealt = false;
        for (const [s, room] of members) {
          if (room < turn) continue;
          dealt = true;
          slots.push({
            g: group.g,
            n: ++n,
            sessionId: s.sessionId,
            streamToken: s.streamToken,
            workerId: s.workerId,
          });
        }
        if (!dealt) break;
      }
      result.push({ g: group.g, cluster: group.cluster, labels: group.labels, room: n });
    }
    return { groups: result, slots, groupKeys };
  }

  /**
   * Sends the in-doubt grants that did commit, same epoch; their workers cannot have started them.
   * A session is let go only by a look that succeeded after its window: while the database is
   * gone, no look can tell whether its grant committed, however long that lasts.
   */
  async function reconcile(): Promise<void> {
    const lookedAt = Date.now();
    let timer: NodeJS.Timeout | undefined;
    // A read: given up when it hangs, it is tried again on the next wake-up. Awaited forever, it
    // stopped every round of this process (they wait for it: see fill).
    const hung = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        // A warning each time, not the dispatch's failure line: that one is a debug line while
        // the dispatch goes on failing, and a hang is worth telling apart from a refusal.
        log.warn(
          { hangMs, sessions: inDoubt.size },
          "the look for grants whose commit was in doubt got no answer; given up, it is tried again on the next wake-up",
        );
        reject(new Error(`the look for grants whose commit was in doubt got no answer in ${hangMs} ms`));
      }, hangMs);
    });
    let found: GrantRecord[];
    try {
      found = await Promise.race([actionsLeasedTo(db, [...inDoubt.keys()]), hung]);
    } finally {
      clearTimeout(timer);
    }
    for (const g of found) {
      const s = hosted.get(g.sessionId);
      if (!s || s.ended || s.held.has(g.actionId)) continue;
      inDoubt.delete(g.sessionId);
      log.info(
        { actionId: g.actionId, sessionId: g.sessionId, epoch: g.epoch },
        "sending a grant again whose commit was in doubt",
      );
      hosted.sendGrant(s, g);
    }
    // A grant that had not committed by the end of its window never will: this look was final.
    for (const [id, untilMs] of inDoubt) if (untilMs < lookedAt) inDoubt.delete(id);
  }

  /** A round taken from the queue and the free slots, not yet run. */
  interface Round {
    readonly batch: Pending[];
    readonly freeing: ReadonlyMap<Hosted, number>;
    readonly claim: ClaimRequest & { groupKeys: string[] };
    readonly wakes: number;
    readonly queueChanges: number;
    /** When its statement was sent (Date.now()). */
    readonly sentAt: number;
    /**
     * Another round was in flight at some point during this one: its claim may
     * have skipped rows that round had locked, so it cannot tell a group empty.
     */
    overlapped: boolean;
  }
  const inFlight = new Set<Round>();

  function prepare(): Round | undefined {
    const batch = take();
    const claimAll = wanted;
    wanted = false;
    // Once stopped, reports are still settled (their answers are owed) but nothing is claimed.
    // The reports' slots, if they hold their leases: refilled in the same statement.
    const freeing = new Map<Hosted, number>();
    for (const { s, report } of batch) {
      if (s.held.get(report.actionId) === report.epoch) freeing.set(s, (freeing.get(s) ?? 0) + 1);
    }
    const claim = deps.stopped() ? { groups: [], slots: [], groupKeys: [] } : slotsFor(freeing, claimAll);
    if (batch.length === 0 && claim.slots.length === 0) return undefined;
    const round: Round = {
      batch,
      freeing,
      claim,
      wakes,
      queueChanges,
      sentAt: Date.now(),
      overlapped: inFlight.size > 0,
    };
    for (const other of inFlight) other.overlapped = true;
    book(round, 1);
    return round;
  }

  /** Counts a round in flight (`sign` 1) or no longer (-1) in `settling` and `reserved`. */
  function book(round: Round, sign: 1 | -1): void {
    const { batch, freeing, claim } = round;
    if (sign > 0) inFlight.add(round);
    else inFlight.delete(round);
    for (const p of batch) {
      if (sign > 0) settling.add(p.report.actionId);
      else settling.delete(p.report.actionId);
    }
    for (const [s, n] of freeing) reserve(s.sessionId, -sign * n);
    for (const slot of claim.slots) reserve(slot.sessionId, sign);
  }

  /**
   * Calls one report's callback: one that throws must not keep the others of its round from
   * their answers (each also lets the next report of its action go: Reports.settle).
   */
  function answerSafely(callback: () => void): void {
    try {
      callback();
    } catch (error) {
      log.error({ err: error }, "answering a report failed");
    }
  }

  async function run(round: Round): Promise<void> {
    const { batch, claim } = round;
    const reports = batch.map((p) => p.report);
    let settled: Awaited<ReturnType<typeof settleAndGrant>>;
    try {
      settled = await settleAndGrant(db, clock, reports, claim);
    } catch (error) {
      if (claim.slots.length > 0) {
        // Committed or not is unknown: look again until a late commit could no longer land.
        const untilMs = Date.now() + 2 * graceMs;
        for (const slot of claim.slots) inDoubt.set(slot.sessionId, untilMs);
      }
      for (const p of batch) answerSafely(() => p.failed(error));
      throw error;
    } finally {
      book(round, -1);
      if (wakes !== round.wakes) wanted = true;
    }
    // One synchronous run: each stream's answers, then its refills.
    const results = new Array<Finished | undefined>(batch.length);
    for (const f of settled.finished) results[f.key] = f;
    let requeued = false;
    for (let i = 0; i < batch.length; i++) {
      const p = batch[i] as Pending;
      const f = results[i];
      if (f?.state === "QUEUED") requeued = true;
      // Claimed for already (see `slotsFor`), so no wake-up.
      hosted.letGo(p.s, p.report.actionId, p.report.epoch, false);
      answerSafely(() => p.done(f));
    }
    for (const g of settled.grants) {
      const s = hosted.get(g.sessionId);
      // A stream that closed meanwhile keeps the lease in its session; a resume re-sends it.
      if (s && !s.ended) hosted.sendGrant(s, g);
      else if (s === undefined)
        log.info(
          { actionId: g.actionId, sessionId: g.sessionId },
          "granted to a session whose stream just closed; a reconnect receives it",
        );
    }
    for (const slot of claim.slots) {
      const s = hosted.get(slot.sessionId);
      if (s) hosted.served(s);
    }
    if (settled.grants.length > 0) deps.granted(settled.grants);
    if (round.queueChanges === queueChanges && !round.overlapped) {
      for (const group of claim.groups) {
        if ((settled.claimed.get(group.g) ?? 0) < group.room) empty.add(claim.groupKeys[group.g] as string);
      }
    }
    // A re-queued action waits for the next claim; a full claim may have left more queued.
    if (requeued) queueChanged();
    if (requeued || (claim.slots.length > 0 && settled.grants.length === claim.slots.length)) wanted = true;
  }

  /** Rounds in flight. */
  let active = 0;
  let scheduled = false;
  let reconciling = false;
  /** When the look in flight was sent. */
  let reconcilingSince = 0;
  /** {@link Dispatcher.watch} logged a statement hung, and none has ended since. */
  let hangLogged = false;
  let idleWaiters: (() => void)[] = [];
  const isIdle = () => active === 0 && !scheduled && !reconciling;

  /** Starts rounds on the next turn, so that everything asked in this one shares them. */
  function schedule(): void {
    if (scheduled) return;
    scheduled = true;
    setImmediate(fill);
  }

  function fill(): void {
    scheduled = false;
    if (inDoubt.size > 0) {
      // Alone: no grant of a round in flight can be mistaken for an in-doubt one.
      if (active > 0 || reconciling) {
        settle();
        return;
      }
      reconciling = true;
      reconcilingSince = Date.now();
      reconcile()
        .catch((error: unknown) => rounds.failed(error))
        .finally(() => {
          reconciling = false;
          // Found or not, claims go on; a grant that commits late is found by a later look.
          fillAfterReconcile();
        });
      return;
    }
    fillAfterReconcile();
  }

  function fillAfterReconcile(): void {
    while (active < PIPELINE && (queue.length > 0 || wanted)) {
      const r = prepare();
      if (!r) break;
      active++;
      run(r)
        .then(
          () => rounds.worked(),
          (error: unknown) => rounds.failed(error),
        )
        .finally(() => {
          active--;
          // On the next turn, not in this promise chain: with PGlite, whose statements run on
          // this thread, a round started here would go on the connection before anything that
          // waits for a timer or a socket (a renewal, a hello, a heartbeat), and a queue of
          // reports one stream floods in kept them all waiting until it was settled.
          if (queue.length > 0 || wanted) schedule();
          else settle();
        });
    }
    settle();
  }

  function waitingMs(): number {
    let since = reconciling ? reconcilingSince : Number.POSITIVE_INFINITY;
    for (const round of inFlight) since = Math.min(since, round.sentAt);
    return since === Number.POSITIVE_INFINITY ? 0 : Date.now() - since;
  }

  function watch(): void {
    const waitedMs = waitingMs();
    if (waitedMs > hangMs && !hangLogged) {
      hangLogged = true;
      log.error(
        {
          waitedMs,
          rounds: inFlight.size,
          lookingForInDoubtGrants: reconciling,
          reportsWaiting: queue.length,
        },
        "the lease dispatcher has waited too long for a statement's answer: until it comes, the completions " +
          "and releases it settles get no answer and their slots no grant" +
          (reconciling ? ", and nothing else is dispatched" : ""),
      );
    } else if (waitedMs <= hangMs && hangLogged) {
      hangLogged = false;
      log.info({ waitingMs: waitedMs }, "the lease dispatcher's hung statement ended");
    }
  }

  /** Wakes `idle()` callers once nothing runs. */
  function settle(): void {
    if (!isIdle()) return;
    const waiters = idleWaiters;
    idleWaiters = [];
    for (const w of waiters) w();
  }

  return {
    settle(s, report, done, failed) {
      queue.push({ s, report, done, failed });
      schedule();
    },
    wake() {
      queueChanged();
      wakes++;
      wanted = true;
      schedule();
    },
    wakeForRoom() {
      wakes++;
      wanted = true;
      schedule();
    },
    idle: () => (isIdle() ? Promise.resolve() : new Promise<void>((r) => idleWaiters.push(r))),
    waitingMs,
    watch,
  };
}

/**
 * The reports of the next round, from `queue` in the order they came: at
 * most {@link BATCH}, at most one per action (one statement may touch an
 * action once), none of an action a round in flight settles. Each stream
 * first gets up to {@link SHARE} of the batch, then the batch fills with the
 * rest: a stream with hundreds of reports waiting does not hold back
 * another's one for the rounds they take. `rest` keeps the order.
 */
export function takeReports<P extends { readonly s: object; readonly report: { readonly actionId: string } }>(
  queue: readonly P[],
  settling: ReadonlySet<string>,
): { batch: P[]; rest: P[] } {
  const batch: P[] = [];
  let rest: P[] = [];
  const ids = new Set<string>();
  const taken = new Map<object, number>();
  let passedOver = false;
  for (const p of queue) {
    const id = p.report.actionId;
    if (batch.length >= BATCH || ids.has(id) || settling.has(id)) rest.push(p);
    else {
      const n = taken.get(p.s) ?? 0;
      if (n >= SHARE) {
        passedOver = true;
        rest.push(p);
        continue;
      }
      taken.set(p.s, n + 1);
      ids.add(id);
      batch.push(p);
    }
  }
  if (passedOver && batch.length < BATCH) {
    const left = rest;
    rest = [];
    for (const p of left) {
      const id = p.report.actionId;
      if (batch.length >= BATCH || ids.has(id) || settling.has(id)) rest.push(p);
      else {
        ids.add(id);
        batch.push(p);
      }
    }
  }
  return { batch, rest };
}
