/**
 * The page's one event stream. It keeps the most recent events for the
 * Events view, tells listeners about each new one (the shell refreshes the
 * current view), and reconnects after any error or end of stream, resuming
 * after the last sequence it saw so that nothing is missed or repeated.
 */
import type { Client } from "@connectrpc/connect";
import type { Event, EventService } from "../../gen/leasehold/v1/event_pb.js";
import { describeError } from "./api.js";

/** `live` while the stream is open; `reconnecting` before it first opens and after it broke. */
export type LiveState = "live" | "reconnecting";

export interface LiveStatus {
  state: LiveState;
  /** Why it is not live (code and server message); empty while live and before the first try. */
  error: string;
}

export interface EventFeed {
  /** The most recent events, newest first, at most FEED_SIZE. */
  readonly events: readonly Event[];
  readonly status: LiveStatus;
  /** Calls `listener` with each new event; returns its `off`. */
  onEvent(listener: (event: Event) => void): () => void;
  /** Calls `listener` at each status change; returns its `off`. */
  onStatus(listener: (status: LiveStatus) => void): () => void;
  /** Connects: once, then on its own after failures. */
  start(): void;
  /** Drops the stream and connects again at once with a fresh backoff (after the token changed). */
  reconnect(): void;
  /** Ends the stream for good. */
  close(): void;
}

/** How many events the feed keeps. */
export const FEED_SIZE = 500;

/** Reconnect delays: from 0.5 s, doubling up to 10 s, each drawn from its upper half (jitter). */
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;

export function createEventFeed(events: Client<typeof EventService>): EventFeed {
  const feed: Event[] = [];
  // The last sequence received; undefined until known (the stream then starts at "now").
  let after: bigint | undefined;
  let historyRead = false;
  let status: LiveStatus = { state: "reconnecting", error: "" };
  let controller: AbortController | undefined;
  // When the current connection's stream opened (performance.now()); undefined before.
  let openedAt: number | undefined;
  const eventListeners = new Set<(event: Event) => void>();
  const statusListeners = new Set<(status: LiveStatus) => void>();

  function setStatus(next: LiveStatus): void {
    if (next.state === status.state && next.error === status.error) return;
    status = next;
    for (const listener of statusListeners) listener(status);
  }

  function accept(event: Event): void {
    // A resumed stream starts after `after`; this guards against a replay overlap all the same.
    if (after !== undefined && event.sequence <= after) return;
    after = event.sequence;
    feed.unshift(event);
    if (feed.length > FEED_SIZE) feed.length = FEED_SIZE;
    for (const listener of eventListeners) listener(event);
  }

  /**
   * The most recent events (ListEvents, newest first), then the watch
   * resumes after the newest of them; on an empty log it follows from the
   * log's start, so that nothing committed meanwhile is missed.
   */
  async function readHistory(signal: AbortSignal): Promise<void> {
    const page = await events.listEvents({ pageSize: FEED_SIZE, newestFirst: true }, { signal });
    for (const event of [...page.events].reverse()) accept(event);
    after ??= 0n;
  }

  /** One connection: resolves when the server ends the stream, rejects on error. */
  async function connect(signal: AbortSignal): Promise<void> {
    if (!historyRead) {
      await readHistory(signal);
      historyRead = true;
    } else {
      // An answer says the server is back (and takes the token) before any event comes:
      // the stream's headers may only arrive with its first event.
      await events.listEvents({ pageSize: 1 }, { signal });
    }
    openedAt = performance.now();
    setStatus({ state: "live", error: "" });
    const request = after === undefined ? {} : { afterSequence: after };
    for await (const response of events.watchEvents(request, { signal })) {
      if (response.event) accept(response.event);
    }
  }

  async function run(signal: AbortSignal): Promise<void> {
    let delay = BACKOFF_MIN_MS;
    while (!signal.aborted) {
      openedAt = undefined;
      try {
        await connect(signal);
        setStatus({ state: "reconnecting", error: "the server ended the stream" });
      } catch (error) {
        if (signal.aborted) return;
        const problem = describeError(error);
        setStatus({ state: "reconnecting", error: `${problem.code}: ${problem.detail}` });
      }
      // A stream that stayed open a while broke for a new reason: start the backoff over.
      // (One that breaks at once, say a proxy refusing streams, keeps backing off.)
      if (openedAt !== undefined && performance.now() - openedAt > BACKOFF_MAX_MS) delay = BACKOFF_MIN_MS;
      await sleep(delay / 2 + (Math.random() * delay) / 2, signal);
      delay = Math.min(delay * 2, BACKOFF_MAX_MS);
    }
  }

  function start(): void {
    controller?.abort();
    controller = new AbortController();
    void run(controller.signal);
  }

  return {
    get events() {
      return feed;
    },
    get status() {
      return status;
    },
    onEvent(listener) {
      eventListeners.add(listener);
      return () => eventListeners.delete(listener);
    },
    onStatus(listener) {
      statusListeners.add(listener);
      return () => statusListeners.delete(listener);
    },
    start() {
      if (controller === undefined) start();
    },
    reconnect: start,
    close() {
      controller?.abort();
    },
  };
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}
