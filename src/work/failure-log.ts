import type { Logger } from "pino";

/**
 * How a task that may fail over and over (a poll, a tick, a report sent again
 * while the database is down) is logged: its first failure as a warning, the
 * ones that follow as debug lines, so that an outage writes one warning and
 * not one per try, and its first success after them as an info line that
 * counts them.
 */
export interface FailureLog {
  /** A failure: a warning if the task worked until now, else a debug line. */
  failed(error: unknown, fields?: Readonly<Record<string, unknown>>): void;
  /** A success: the info line, if the task had failed since the last one. */
  worked(): void;
}

export function failureLog(
  log: Logger,
  lines: {
    /** The warning of the first failure. */
    readonly failed: string;
    /** The debug line of each failure after it. */
    readonly still: string;
    /** The info line of the first success after failures. */
    readonly again: string;
  },
): FailureLog {
  let failures = 0;
  return {
    failed(error, fields = {}) {
      failures += 1;
      if (failures === 1) log.warn({ err: error, ...fields }, lines.failed);
      else log.debug({ err: error, ...fields }, lines.still);
    },
    worked() {
      if (failures === 0) return;
      log.info({ failures }, lines.again);
      failures = 0;
    },
  };
}
