import type { Logger } from "pino";
import { createBatcher } from "../../store/batcher.js";
import type { Db } from "../../store/database.js";
import { type FencedReport, recordFencedReports } from "../../store/queries/record-fenced.js";
import { type ChangeFeed, EVENTS_TOPIC } from "../change-feed.js";
import type { LeaseToken } from "../worker-messages.js";
import type { Hosted } from "./hosted.js";

/**
 * Most `report_fenced` events one stream gets one by one per
 * {@link FENCED_WINDOW_MS}. A stale owner's late reports (one, or a few
 * leases' worth) stay well under it.
 */
export const FENCED_EVENTS_PER_WINDOW = 100;
/** The window of {@link FENCED_EVENTS_PER_WINDOW}: it opens at a stream's first fenced report. */
export const FENCED_WINDOW_MS = 10_000;
/**
 * Most fenced-report rows waiting to be written in this process, all streams
 * together; past it, reports are counted as if over their stream's budget.
 */
export const FENCED_EVENTS_QUEUED = 1000;
/** Most rows per insert: the statement other work on the connection may wait behind. */
const FENCED_BATCH = 100;

/**
 * The `report_fenced` events of fenced reports. Writing them is kept off the
 * lease path's way: rows are group-committed (one statement at a time, up to
 * {@link FENCED_BATCH} rows each), so renewals, hellos and reports of other
 * streams wait behind one such statement at most, not behind one per report
 * (PGlite has a single connection). And a stream gets at most
 * {@link FENCED_EVENTS_PER_WINDOW} rows per {@link FENCED_WINDOW_MS}: its
 * further fenced reports in the window (still answered FENCED, with a
 * revoke) are counted, and one more `report_fenced` event, without an
 * action, records their number when the window ends.
 */
export interface FencedEvents {
  /** Records that stream `s` sent a report (`what`) on `token`, which is not its lease. */
  record(s: Hosted, token: LeaseToken, what: string): void;
  /** Writes the counts of open windows and waits for the rows queued. */
  close(): Promise<void>;
}

/** A stream's fenced reports in its current window. */
interface Window {
  readonly s: Hosted;
  /** performance.now() at the window's first fenced report. */
  openedAt: number;
  /** Rows queued for it in this window. */
  recorded: number;
  /** Fenced reports of the window not recorded one by one. */
  unrecorded: number;
  /** The first of those. */
  first: { token: LeaseToken; what: string } | undefined;
  /** Writes the count at the window's end. */
  timer: NodeJS.Timeout | undefined;
}

/** The lease a fenced report named, as the event checks it against the worker's cluster. */
const named = (token: LeaseToken) => ({ action_id: token.actionId, epoch: token.epoch });

export function createFencedEvents(deps: {
  db: Db;
  log: Logger;
  feed: ChangeFeed;
  /** The budget's window. Default {@link FENCED_WINDOW_MS}. */
  windowMs?: number;
}): FencedEvents {
  const { db, log, feed } = deps;
  const windowMs = deps.windowMs ?? FENCED_WINDOW_MS;
  /** Rows added and not yet written (or failed). */
  let queued = 0;
  const rows = createBatcher<FencedReport, undefined>(
    async (batch) => {
      try {
        await recordFencedReports(db, batch);
        feed.publish(EVENTS_TOPIC);
      } catch (error) {
        log.warn({ err: error, events: batch.length }, "could not record fenced reports");
      } finally {
        queued -= batch.length;
      }
      return batch.map(() => undefined);
    },
    { maxBatch: FENCED_BATCH },
  );
  const add = (row: FencedReport) => {
    queued++;
    void rows.add(row);
  };
  const windows = new WeakMap<Hosted, Window>();
  /** Windows with reports not recorded one by one, whose count is still to be written. */
  const counting = new Set<Window>();

  /** Writes the count of the window's unrecorded reports, if any. */
  function flush(w: Window): void {
    clearTimeout(w.timer);
    w.timer = undefined;
    counting.delete(w);
    const { s, unrecorded, first } = w;
    w.unrecorded = 0;
    w.first = undefined;
    if (unrecorded === 0 || !first) return;
    const seconds = Math.round((performance.now() - w.openedAt) / 1000);
    log.warn(
      { workerId: s.workerId, sessionId: s.sessionId, unrecorded, recorded: w.recorded },
      `worker ${s.workerId} sent fenced reports faster than they are recorded: ${unrecorded} were answered FENCED without an event each`,
    );
    const counted =
      `${unrecorded} more fenced reports from worker ${s.workerId} in ${seconds}s were answered FENCED ` +
      `without an event each (over ${FENCED_EVENTS_PER_WINDOW} per ${windowMs / 1000}s from one stream)`;
    const firstNamed = `the first: ${first.what} for action ${first.token.actionId} epoch ${first.token.epoch}`;
    add({
      workerId: s.workerId,
      sessionId: s.sessionId,
      actor: s.principal,
      message: `${counted}; ${firstNamed}`,
      details: {
        unrecorded,
        first_action_id: first.token.actionId,
        first_epoch: first.token.epoch,
        first_report: first.what,
      },
      named: {
        ...named(first.token),
        never_message: `${counted}; ${firstNamed}`,
        // The first named another cluster's action (or none): the count does not name it.
        foreign_message: `${counted}; the first: ${first.what} for a lease it never held (not an action of cluster ${s.cluster})`,
        foreign_details: { unrecorded, first_report: first.what },
      },
    });
  }

  return {
    record(s, token, what) {
      const now = performance.now();
      let w = windows.get(s);
      if (!w) {
        w = { s, openedAt: now, recorded: 0, unrecorded: 0, first: undefined, timer: undefined };
        windows.set(s, w);
      } else if (now - w.openedAt >= windowMs) {
        flush(w);
        w.openedAt = now;
        w.recorded = 0;
      }
      if (w.recorded < FENCED_EVENTS_PER_WINDOW && queued < FENCED_EVENTS_QUEUED) {
        w.recorded++;
        add({
          actionId: token.actionId,
          epoch: token.epoch,
          workerId: s.workerId,
          sessionId: s.sessionId,
          actor: s.principal,
          message: `${what} from worker ${s.workerId} rejected: epoch ${token.epoch} is not the current lease`,
          named: {
            ...named(token),
            // The reason, read from the action's row when the event is written (not on the
            // report's path): insert-worker-events.ts.
            fenced_prefix: `${what} from worker ${s.workerId} rejected: `,
            never_message: `${what} from worker ${s.workerId} rejected: epoch ${token.epoch} is a lease it never held`,
            foreign_message: `${what} from worker ${s.workerId} rejected: a lease it never held (not an action of cluster ${s.cluster})`,
          },
        });
        return;
      }
      w.unrecorded++;
      if (w.first) return;
      w.first = { token, what };
      counting.add(w);
      const window = w;
      w.timer = setTimeout(() => flush(window), Math.max(0, w.openedAt + windowMs - now));
      w.timer.unref();
    },
    async close() {
      for (const w of [...counting]) flush(w);
      await rows.close();
    },
  };
}
