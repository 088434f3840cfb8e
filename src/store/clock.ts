import { type SQL, sql } from "drizzle-orm";

/**
 * The time lease arithmetic uses. In production it is the database's `now()`:
 * one clock for every server process sharing the database (SPEC §4). Tests
 * inject a fake clock so that grace periods pass without waiting.
 */
export interface Clock {
  /** An SQL expression for "now". */
  now(): SQL;
}

/** The database clock. */
export const databaseClock: Clock = { now: () => sql`now()` };

/** A clock tests move by hand. */
export interface FakeClock extends Clock {
  /** The fake current time. */
  current(): Date;
  /** Moves time forward. */
  advance(ms: number): void;
}

/** A fake clock starting at `start` (default: now, so rows stamped by `now()` defaults stay comparable). */
export function createFakeClock(start = new Date()): FakeClock {
  let nowMs = start.getTime();
  return {
    now: () => sql`${new Date(nowMs).toISOString()}::timestamptz`,
    current: () => new Date(nowMs),
    advance(ms) {
      nowMs += ms;
    },
  };
}
