import { matchesGlob } from "../auth/access.js";
import { Code, LeaseholdError } from "../errors.js";
import type { Db } from "../store/database.js";
import { lastEventSequence, listEventPage, readEventsAfter } from "../store/events.js";
import { eventsRemovedThrough } from "../store/queries/remove-history.js";
import type { ChangeFeed } from "./change-feed.js";
import type { EventFilter, EventRecord } from "./event.js";
import { createEventTail, createHoleWait, DEFAULT_TAIL_CAPACITY } from "./event-tail.js";
import { createGate } from "./gate.js";
import { type PAGE_BYTES, type Page, toPage } from "./page.js";
import { decodeSequencePageToken, issuedFor } from "./page-token.js";

/** Listing and following the event log. */
export interface EventService {
  /**
   * One page, oldest first; `newestFirst` pages from the newest event
   * backwards. With `sizeOf` (an event's size as the caller sends it), the
   * page also ends before that size passes {@link PAGE_BYTES}, with a next
   * page token; it always holds one event.
   */
  list(
    filter: EventFilter,
    pageSize: number,
    pageToken: string,
    newestFirst?: boolean,
    sizeOf?: (event: EventRecord) => number,
  ): Promise<Page<EventRecord>>;
  /**
   * Events matching `filter`, forever: stored ones after `afterSequence`
   * first (when given), then new ones as they commit.
   */
  watch(
    filter: EventFilter,
    afterSequence: number | undefined,
    signal: AbortSignal,
  ): AsyncIterable<EventRecord>;
}

/** How many stored events one read of a watch behind the tail fetches. */
const WATCH_BATCH = 500;
/**
 * Reads of the log by watches behind the tail, in flight at once in a
 * process; the others wait their turn. Each watch replaying from the start
 * read on its own: 400 of them queued thousands of reads ahead of the lease
 * renewals (PGlite runs one statement at a time, a pool has ten
 * connections), and healthy workers' sessions expired.
 */
export const CATCH_UP_READS = 2;

export function createEventService({
  db,
  feed,
  tailCapacity = DEFAULT_TAIL_CAPACITY,
}: {
  db: Db;
  feed: ChangeFeed;
  /** Events the shared tail of the watches holds in memory; default {@link DEFAULT_TAIL_CAPACITY}. */
  tailCapacity?: number;
}): EventService {
  const tail = createEventTail({ db, feed }, tailCapacity);
  const catchUp = createGate(CATCH_UP_READS);
  async function list(
    filter: EventFilter,
    size: number,
    pageToken: string,
    newestFirst = false,
    sizeOf?: (event: EventRecord) => number,
  ): Promise<Page<EventRecord>> {
    // The direction is part of what a token was issued for: a token of one cannot page the other.
    // The clusters a scoped caller may read are not: its token goes on after a policy change.
    const { clusterGlobs, ...chosen } = filter;
    const issued = issuedFor("events", newestFirst ? { ...chosen, newestFirst } : chosen);
    const cursor = decodeSequencePageToken(pageToken, issued);
    // One row more than asked tells whether another page exists.
    const { items, cut } = await listEventPage(
      db,
      filter,
      pageToken === "" ? undefined : cursor,
      size + 1,
      newestFirst,
    );
    return toPage(items, size, (e) => String(e.sequence), issued, { more: cut, sizeOf });
  }

  async function* watch(filter: EventFilter, afterSequence: number | undefined, signal: AbortSignal) {
    const follower = tail.join();
    try {
      await follower.start();
      // A resume from before what --history-retention removed would skip events without a word, as
      // etcd refuses a watch from a compacted revision; 0, "from the oldest kept", is always served.
      // Looked up once, under the gate of the reads behind the tail: many watches resuming at once
      // must not crowd the database.
      // A resume from past the newest event would wait forever: the events that follow get lower
      // sequences. The end of the log is the database's, not how far this process's tail has read
      // (another process may have committed events it has not read yet); read before the removed
      // sequence, which only grows, so that a removal between the two reads cannot hide the end.
      if (afterSequence !== undefined && afterSequence > 0) {
        const release = await catchUp.enter(signal);
        let newest: number;
        let through: number;
        try {
          newest = await lastEventSequence(db);
          through = await eventsRemovedThrough(db);
        } finally {
          release();
        }
        if (afterSequence < through) throw eventsRemoved(afterSequence, through);
        if (afterSequence > Math.max(newest, through))
          throw cursorAhead(afterSequence, Math.max(newest, through));
      }
      // From now: the end of the log, not how far the tail has read (it may be waiting at a
      // hole below the end, and must not hand this watch events stored before it opened).
      let cursor = afterSequence ?? (await lastEventSequence(db));
      // The database path's wait at holes; each spell behind the tail waits anew, except at holes
      // old enough that the insert which took them cannot still commit.
      const holes = createHoleWait(follower.settled);
      while (!signal.aborted) {
        const held = follower.after(cursor);
        if (held !== undefined) {
          holes.reset();
          // Caught up: the tail has read these once for every watch of this process.
          if (held.length === 0) await follower.next(signal);
          for (const event of held) {
            cursor = event.sequence;
            if (matches(filter, event)) yield event;
          }
          continue;
        }
        // Behind what the tail holds: read the log itself, waiting at holes as the tail does.
        const release = await catchUp.enter(signal);
        let batch: Awaited<ReturnType<typeof readEventsAfter>>;
        try {
          // A resume from before what --history-retention removed would skip events without a
          // word, as etcd refuses a watch from a compacted revision; 0, "from the oldest kept", is
          // always served. Only the first read can be that far back; one the tail serves is not.
          batch = await readEventsAfter(db, filter, cursor, WATCH_BATCH);
        } finally {
          release();
        }
        let blocked = false;
        for (const { event, matches: matching } of batch) {
          if (!holes.passes(cursor, event.sequence)) {
            blocked = true;
            break;
          }
          cursor = event.sequence;
          if (matching) yield event;
        }
        if (blocked) await follower.next(AbortSignal.any([signal, AbortSignal.timeout(50)]));
        else if (batch.length === 0) await follower.next(signal);
      }
    } finally {
      follower[Symbol.dispose]();
    }
  }

  return { list, watch };
}

/** Whether `event` passes `filter` (the conditions of `readEventsAfter`, in memory). */
function matches(filter: EventFilter, event: EventRecord): boolean {
  return (
    (!filter.actionId || event.actionId === filter.actionId) &&
    (!filter.workerId || event.workerId === filter.workerId) &&
    (!filter.cluster || event.cluster === filter.cluster) &&
    (!filter.kind || event.kind === filter.kind) &&
    (!filter.leaseId || event.leaseId === filter.leaseId) &&
    (!filter.clusterGlobs ||
      (event.cluster !== null && filter.clusterGlobs.some((g) => matchesGlob(g, event.cluster ?? ""))))
  );
}

/** A watch asked to resume where removed events were: OUT_OF_RANGE, naming the sequence to resume from. */
function eventsRemoved(after: number, through: number): LeaseholdError {
  return new LeaseholdError(
    Code.OutOfRange,
    `events up to sequence ${through} were removed past the server's --history-retention, so a watch after ` +
      `${after} would miss some: watch with after_sequence ${through} to go on from the oldest place nothing ` +
      `is missing after, or 0 for every event kept; the current state of actions and leases is in ` +
      `ListActions and ListLeases`,
    { reason: "EVENTS_REMOVED", metadata: { removed_through: String(through) } },
  );
}

/** A watch asked to resume past the newest event: OUT_OF_RANGE, naming the newest sequence. */
function cursorAhead(after: number, newest: number): LeaseholdError {
  return new LeaseholdError(
    Code.OutOfRange,
    `after_sequence ${after} is past the newest event of the log (sequence ${newest}), so the watch would ` +
      `never see an event: new ones get the sequences after ${newest}. Watch with an after_sequence you were ` +
      `sent (at most ${newest}), or without one to follow only new events`,
    { reason: "CURSOR_AHEAD", metadata: { newest_sequence: String(newest) } },
  );
}
