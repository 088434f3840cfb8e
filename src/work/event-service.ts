import type { Db } from "../store/database.js";
import { lastEventSequence, listEvents } from "../store/events.js";
import type { Page } from "./action-service.js";
import { type ChangeFeed, EVENTS_TOPIC, wakeupsOf } from "./change-feed.js";
import type { EventFilter, EventRecord } from "./event.js";
import { decodePageToken, encodePageToken } from "./page-token.js";

/** Listing and following the event log. */
export interface EventService {
  list(filter: EventFilter, pageSize: number, pageToken: string): Promise<Page<EventRecord>>;
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

export function createEventService({ db, feed }: { db: Db; feed: ChangeFeed }): EventService {
  async function list(filter: EventFilter, size: number, pageToken: string): Promise<Page<EventRecord>> {
    const cursor = decodePageToken(pageToken, filter);
    const rows = await listEvents(db, filter, cursor ? Number(cursor.after) : 0, size + 1);
    const items = rows.slice(0, size);
    const last = items.at(-1);
    return {
      items,
      nextPageToken: rows.length > size && last ? encodePageToken(String(last.sequence), filter) : "",
    };
  }

  async function* watch(filter: EventFilter, afterSequence: number | undefined, signal: AbortSignal) {
    // Subscribe first, then read: an event committed in between is still seen.
    const wakeups = wakeupsOf(feed, EVENTS_TOPIC);
    try {
      let cursor = afterSequence ?? (await lastEventSequence(db));
      while (!signal.aborted) {
        const batch = await listEvents(db, filter, cursor, WATCH_BATCH);
        for (const event of batch) {
          cursor = event.sequence;
          yield event;
        }
        if (batch.length < WATCH_BATCH) await wakeups.next(signal);
      }
    } finally {
      wakeups[Symbol.dispose]();
    }
  }

  return { list, watch };
}
