import type { Db } from "../store/database.js";
import { lastEventSequence, listEvents } from "../store/events.js";
import { type ChangeFeed, EVENTS_TOPIC, wakeupsOf } from "./change-feed.js";
import type { EventRecord } from "./event.js";

/**
 * The newest events of the log, read once per process for all of its
 * watches. Without it every watch read the log on every wake-up: N open
 * consoles meant N reads of the same rows per dispatch round. The tail reads
 * each new event once, keeps the newest `capacity` of them in memory, and
 * each watch filters them there; a watch that falls behind what memory holds
 * (a slow reader, or a resume from an old sequence) reads the database until
 * it has caught up.
 *
 * The tail runs only while someone follows it: the first follower starts it,
 * the last one to leave stops it.
 */
export interface EventTail {
  /** Starts following; dispose of the follower when done. */
  join(): TailFollower;
}

/** One watch's view of the tail. */
export interface TailFollower extends Disposable {
  /**
   * Resolves once the tail knows where it starts, before which `after`
   * cannot tell memory from the database. Rejects like `next`.
   */
  start(): Promise<void>;
  /**
   * The events in memory after `cursor`, oldest first (empty when there is
   * none yet); undefined when memory no longer reaches back to `cursor`, so
   * the caller must read the database.
   */
  after(cursor: number): readonly EventRecord[] | undefined;
  /** Resolves when the tail has read more, or at once if it did since the last call; rejects when it failed. */
  next(signal: AbortSignal): Promise<void>;
  /**
   * A sequence number at or below which every number was taken at least
   * {@link GAP_WAIT_MS} ago (0 when none is known yet): a hole there is a
   * rolled-back insert, and a reader of the database need not wait at it.
   */
  settled(): number;
}

/** Events held in memory by default: a few seconds of a busy cluster. */
export const DEFAULT_TAIL_CAPACITY = 4096;
/** How many events one read of the log fetches. */
const READ_BATCH = 500;
/**
 * How long the tail waits for a missing sequence number. Sequence numbers are
 * taken at insert but become visible at commit, so under concurrent writers
 * event 13 can appear after event 14; a tail that moved past the hole would
 * never send 13. A hole that outlasts this wait was a rolled-back insert.
 */
export const GAP_WAIT_MS = 2000;

/**
 * The wait at holes of one reader walking the log in sequence order: an
 * event right after the cursor passes; one further on passes only once the
 * hole before it has been waited at for {@link GAP_WAIT_MS}.
 */
export interface HoleWait {
  /** Whether the event with `sequence` may be taken after `cursor` now. */
  passes(cursor: number, sequence: number): boolean;
  /** Forgets the hole waited at (the reader moved on some other way). */
  reset(): void;
}

export function createHoleWait(settled: () => number = () => 0): HoleWait {
  let since: number | undefined;
  return {
    passes(cursor, sequence) {
      // A hole whose numbers were all taken long enough ago is passed at once (see `settled`).
      if (sequence !== cursor + 1 && sequence - 1 > settled()) {
        since ??= performance.now();
        if (performance.now() - since < GAP_WAIT_MS) return false;
      }
      since = undefined;
      return true;
    },
    reset() {
      since = undefined;
    },
  };
}

/** One run of the tail, from its first follower to its last (or its failure). */
interface Run {
  followers: number;
  /** The position before the oldest event held: memory serves any cursor at or after it. */
  base: number;
  /** The position after the newest event read (holes given up on are passed). */
  head: number;
  readonly events: EventRecord[];
  readonly listeners: Set<() => void>;
  readonly started: Promise<number>;
  failure: { readonly error: unknown } | undefined;
  readonly stop: AbortController;
}

export function createEventTail(
  { db, feed }: { db: Db; feed: ChangeFeed },
  capacity = DEFAULT_TAIL_CAPACITY,
): EventTail {
  let current: Run | undefined;
  /**
   * Ends of the log this process's tails have seen, and when, oldest first. A
   * number below one seen was taken before it; seen {@link GAP_WAIT_MS} ago,
   * every number up to it was taken at least that long ago. Kept across runs,
   * so that a watch resuming from an old sequence after the tail restarted
   * does not wait at every old hole again.
   */
  const seen: { sequence: number; at: number }[] = [];
  function saw(sequence: number): void {
    const last = seen.at(-1);
    if (last === undefined || sequence > last.sequence) seen.push({ sequence, at: performance.now() });
    // Bounded by the reads of GAP_WAIT_MS, whether or not any watch asks.
    settled();
  }
  function settled(): number {
    const before = performance.now() - GAP_WAIT_MS;
    let i = seen.length - 1;
    while (i >= 0 && (seen[i] as { at: number }).at > before) i--;
    if (i < 0) return 0;
    // The older ends are passed by this one: forget them.
    if (i > 0) seen.splice(0, i);
    return (seen[0] as { sequence: number }).sequence;
  }

  function notify(run: Run) {
    for (const listener of [...run.listeners]) listener();
  }

  function start(): Run {
    // Subscribe first, then read the position: an event committed in between is still read.
    const wakeups = wakeupsOf(feed, EVENTS_TOPIC);
    const stop = new AbortController();
    const started = lastEventSequence(db);
    const run: Run = {
      followers: 0,
      base: 0,
      head: 0,
      events: [],
      listeners: new Set(),
      started,
      failure: undefined,
      stop,
    };
    void (async () => {
      try {
        run.head = run.base = await started;
        saw(run.head);
        const holes = createHoleWait();
        while (!stop.signal.aborted) {
          const batch = await listEvents(db, {}, run.head, READ_BATCH);
          if (stop.signal.aborted) break;
          let blocked = false;
          let read = 0;
          for (const event of batch) {
            if (!holes.passes(run.head, event.sequence)) {
              blocked = true;
              break;
            }
            run.head = event.sequence;
            run.events.push(event);
            read++;
          }
          // Drop the oldest in chunks, so that each read does not shift the whole array.
          if (run.events.length > capacity + capacity / 4) {
            const dropped = run.events.splice(0, run.events.length - capacity);
            run.base = (dropped.at(-1) as EventRecord).sequence;
          }
          if (read > 0) {
            saw(run.head);
            notify(run);
          }
          // At a hole, look again soon; the timeout signal's listener goes with the wait.
          if (blocked) await wakeups.next(AbortSignal.any([stop.signal, AbortSignal.timeout(50)]));
          else if (batch.length < READ_BATCH) await wakeups.next(stop.signal);
        }
      } catch (error) {
        run.failure = { error };
        if (current === run) current = undefined;
        notify(run);
      } finally {
        wakeups[Symbol.dispose]();
      }
    })();
    return run;
  }

  function join(): TailFollower {
    current ??= start();
    const run = current;
    run.followers++;
    let pending = false;
    let wake: (() => void) | undefined;
    const listener = () => {
      pending = true;
      wake?.();
    };
    run.listeners.add(listener);
    let left = false;
    return {
      async start() {
        await run.started;
        if (run.failure) throw run.failure.error;
      },
      after(cursor) {
        if (cursor < run.base) return undefined;
        const { events } = run;
        // The first event after the cursor, by binary search on the ordered sequences.
        let lo = 0;
        let hi = events.length;
        while (lo < hi) {
          const mid = (lo + hi) >>> 1;
          if ((events[mid] as EventRecord).sequence <= cursor) lo = mid + 1;
          else hi = mid;
        }
        return lo === events.length ? [] : events.slice(lo);
      },
      next(signal) {
        if (run.failure) return Promise.reject(run.failure.error);
        if (pending || signal.aborted) {
          pending = false;
          return Promise.resolve();
        }
        return new Promise<void>((resolve, reject) => {
          const finish = () => {
            signal.removeEventListener("abort", finish);
            wake = undefined;
            pending = false;
            if (run.failure) reject(run.failure.error);
            else resolve();
          };
          wake = finish;
          signal.addEventListener("abort", finish);
        });
      },
      settled,
      [Symbol.dispose]() {
        if (left) return;
        left = true;
        run.listeners.delete(listener);
        if (--run.followers === 0) {
          run.stop.abort();
          if (current === run) current = undefined;
        }
      },
    };
  }

  return { join };
}
