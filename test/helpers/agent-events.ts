import type { AgentEvent } from "../../src/agent/index.js";

/** An agent's events, kept, with a way to await one (events are pushed, not polled). */
export function agentEvents() {
  const seen: AgentEvent[] = [];
  const waiters = new Set<() => void>();
  return {
    seen,
    onEvent(event: AgentEvent) {
      seen.push(event);
      for (const w of [...waiters]) w();
    },
    /** Resolves with the first event, seen or to come, that `test` holds for. */
    until<T extends AgentEvent>(test: (e: AgentEvent) => e is T): Promise<T> {
      return new Promise((resolve) => {
        const look = () => {
          const found = seen.find(test);
          if (found) {
            waiters.delete(look);
            resolve(found as T);
          }
        };
        waiters.add(look);
        look();
      });
    },
  };
}

export type Finished = Extract<AgentEvent, { type: "finished" }>;

/** Matches the `finished` event of one action. */
export const finishedOf =
  (actionId: string) =>
  (e: AgentEvent): e is Finished =>
    e.type === "finished" && e.actionId === actionId;

/**
 * The process warnings emitted from now on (Node emits them on a later tick),
 * with a way to await one; `stop` removes the listener.
 */
export function processWarnings() {
  const seen: Error[] = [];
  const waiters = new Set<() => void>();
  const onWarning = (w: Error) => {
    seen.push(w);
    for (const look of [...waiters]) look();
  };
  process.on("warning", onWarning);
  return {
    seen,
    /** Resolves with the first warning whose message is `message`. */
    until(message: string): Promise<Error> {
      return new Promise((resolve) => {
        const look = () => {
          const found = seen.find((w) => w.message === message);
          if (found) {
            waiters.delete(look);
            resolve(found);
          }
        };
        waiters.add(look);
        look();
      });
    },
    stop: () => process.off("warning", onWarning),
  };
}
