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
