import type { Db } from "../store/database.js";
import { lastEventSequence, listEvents, listEventsBefore, readEventsAfter } from "../store/events.js";
import type { Page } from "./action-service.js";
import { type ChangeFeed, EVENTS_TOPIC, wakeupsOf } from "./change-feed.js";
import type { EventFilter, EventRecord } from "./event.js";
import { decodeSequencePageToken, toPage } from "./page-token.js";

/** Listing and following the event log. */
export interface EventService {
  /** One page, oldest first; `newestFirst` pages from the newest event backwards. */
  list(
    filter: EventFilter,
    pageSize: number,
    pageToken: string,
    newestFirst?: boolean,
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

/** How many stored events one read of a watch fetches. */
const WATCH_BATCH = 500;
/**
 * How long a watch waits for a missing sequence number. Sequence numbers are
 * taken at insert but become visible at commit, so under concurrent writers
 * event 13 can appear after event 14; a watch that moved past the hole would
 * never send 13. A hole that outlasts this wait was a rolled-back insert.
 */
const GAP_WAIT_MS = 2000;

export function createEventService({ db, feed }: { db: Db; feed: ChangeFeed }): EventService {
  async function list(
    filter: EventFilter,
    size: number,
    pageToken: string,
    newestFirst = false,
  ): Promise<Page<EventRecord>> {
    // The direction is part of what a token was issued for: a token of one cannot page the other.
    const issuedFor = newestFirst ? { ...filter, newestFirst } : filter;
    const cursor = decodeSequencePageToken(pageToken, issuedFor);
    const rows = newestFirst
      ? await listEventsBefore(db, filter, pageToken === "" ? undefined : cursor, size + 1)
      : await listEvents(db, filter, cursor, size + 1);
    return toPage(rows, size, (e) => String(e.sequence), issuedFor);
  }

  async function* watch(filter: EventFilter, afterSequence: number | undefined, signal: AbortSignal) {
    // Subscribe first, then read: an event committed in between is still seen.
    const wakeups = wakeupsOf(feed, EVENTS_TOPIC);
    try {
      let cursor = afterSequence ?? (await lastEventSequence(db));
      let gapSince: number | undefined;
      while (!signal.aborted) {
        const batch = await readEventsAfter(db, filter, cursor, WATCH_BATCH);
        let blocked = false;
        for (const { event, matches } of batch) {
          if (event.sequence !== cursor + 1) {
            gapSince ??= performance.now();
            if (performance.now() - gapSince < GAP_WAIT_MS) {
              blocked = true;
              break;
            }
          }
          gapSince = undefined;
          cursor = event.sequence;
          if (matches) yield event;
        }
        // At a hole, look again soon; the timeout signal's listener goes with the wait.
        if (blocked) await wakeups.next(AbortSignal.any([signal, AbortSignal.timeout(50)]));
        else if (batch.length < WATCH_BATCH) await wakeups.next(signal);
      }
    } finally {
      wakeups[Symbol.dispose]();
    }
  }

  return { list, watch };
}
