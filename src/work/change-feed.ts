import type { ClusterBus } from "./cluster-bus.js";

/**
 * Wake-ups: "something about this topic changed, look again". Watchers
 * re-read the database on a wake-up instead of trusting a payload, so a
 * missed or merged wake-up never loses a change. With a cluster bus, every
 * publish also wakes the subscribers of the other processes sharing the
 * database (LISTEN/NOTIFY).
 */
export interface ChangeFeed {
  /** Wakes every subscriber of the topic, here and in the other processes. */
  publish(topic: string): void;
  /** Calls `listener` on every publish to the topic; returns its `off`. */
  subscribe(topic: string, listener: () => void): () => void;
  /**
   * While other processes share the database, the longest a {@link wakeupsOf}
   * waiter goes without looking again. Their wake-ups are hints that can be
   * lost: a NOTIFY that failed, a process killed between its commit and its
   * NOTIFY, a process started a moment before the others heard of it. An
   * action's watcher hears of its action only through such a hint, so
   * without this look it could wait forever. Undefined while this process is
   * alone (no bus, or the bus sees no other process listening): every change
   * then comes from here and wakes its waiters at once.
   */
  readonly lookAgainMs: number | undefined;
}

/** Default of {@link ChangeFeed.lookAgainMs} when there is a bus. */
export const LOOK_AGAIN_MS = 1000;

/** Topic of changes to one action. */
export const actionTopic = (actionId: string) => `action:${actionId}`;
/** Topic of new events. */
export const EVENTS_TOPIC = "events";
/** Topic of newly queued actions: wakes the dispatcher. */
export const QUEUE_TOPIC = "queue";

export function createChangeFeed(bus?: ClusterBus, lookAgainMs = LOOK_AGAIN_MS): ChangeFeed {
  const listeners = new Map<string, Set<() => void>>();
  const wake = (topic: string) => {
    const set = listeners.get(topic);
    if (set) for (const listener of [...set]) listener();
  };
  bus?.subscribe((message) => {
    if (message.kind === "wake") for (const topic of message.topics) wake(topic);
  });
  // Wake-ups sent while the listener was reconnecting were lost: everyone looks again.
  bus?.onReconnect(() => {
    for (const topic of [...listeners.keys()]) wake(topic);
  });
  return {
    get lookAgainMs() {
      return bus?.hasPeers() ? lookAgainMs : undefined;
    },
    publish(topic) {
      wake(topic);
      bus?.send({ kind: "wake", topics: [topic] });
    },
    subscribe(topic, listener) {
      let set = listeners.get(topic);
      if (!set) {
        set = new Set();
        listeners.set(topic, set);
      }
      set.add(listener);
      return () => {
        set.delete(listener);
        if (set.size === 0) listeners.delete(topic);
      };
    },
  };
}

/**
 * A subscription as an awaitable: `next()` resolves at the next publish after
 * the previous `next()` (publishes in between are merged, never lost), or
 * after the feed's {@link ChangeFeed.lookAgainMs} when it has one.
 */
export interface Wakeups extends Disposable {
  next(signal: AbortSignal): Promise<void>;
}

export function wakeupsOf(feed: ChangeFeed, topic: string): Wakeups {
  let pending = false;
  let resolve: (() => void) | undefined;
  const off = feed.subscribe(topic, () => {
    pending = true;
    resolve?.();
  });
  return {
    next(signal) {
      if (pending || signal.aborted) {
        pending = false;
        return Promise.resolve();
      }
      return new Promise<void>((done) => {
        const finish = () => {
          clearTimeout(timer);
          signal.removeEventListener("abort", finish);
          resolve = undefined;
          pending = false;
          done();
        };
        const timer =
          feed.lookAgainMs === undefined ? undefined : setTimeout(finish, feed.lookAgainMs).unref();
        resolve = finish;
        signal.addEventListener("abort", finish);
      });
    },
    [Symbol.dispose]: off,
  };
}
