import { constants } from "node:os";

/**
 * Signals this close to the last one counted are the same one delivered
 * twice: Ctrl-C under `npm start` or `npx` reaches the process from the
 * terminal and again forwarded by npm. Only a later one is a second Ctrl-C.
 */
export const SAME_SIGNAL_MS = 1000;

/** The exit status of a process a signal interrupted, as shells give it: 128 + its number. */
export function exitOnSignal(signal: NodeJS.Signals): number {
  return 128 + (constants.signals[signal] ?? 0);
}

/**
 * Counts the interrupts (SIGINT, SIGTERM) a command receives, for commands
 * whose second Ctrl-C does more than the first: each call returns 1 for the
 * first signal, 2 for the second and so on, or undefined for one within
 * {@link SAME_SIGNAL_MS} of the last one counted.
 */
export function interruptCounter(now: () => number = () => performance.now()): () => number | undefined {
  let count = 0;
  let lastAt = 0;
  return () => {
    const at = now();
    if (count > 0 && at - lastAt < SAME_SIGNAL_MS) return undefined;
    lastAt = at;
    count += 1;
    return count;
  };
}
