import type { SQL } from "drizzle-orm";
import type { Db } from "./database.js";

/** Runs a statement as a named prepared statement of its connection, returning its rows. */
export type PreparedRunner = (query: SQL) => Promise<unknown[]>;

const preparedRunners = new WeakMap<Db, PreparedRunner>();

/** Called by `openDatabase` for a driver that can keep prepared statements (postgres.js). */
export function registerPreparedRunner(db: Db, run: PreparedRunner): void {
  preparedRunners.set(db, run);
}

/**
 * Runs raw SQL and returns its rows. postgres.js answers with an array,
 * PGlite with `{ rows }`; callers see the same thing on both.
 *
 * `prepared`: on PostgreSQL, the statement is parsed and planned once per
 * connection and reused by its text (a big hot-path statement spends more
 * time being parsed and planned than run). Only for statements whose text
 * does not grow with their input: every distinct text stays prepared on
 * each pooled connection. PGlite runs it as usual.
 */
export async function queryRows<T>(db: Db, query: SQL, options?: { prepared?: boolean }): Promise<T[]> {
  const prepared = options?.prepared ? preparedRunners.get(db) : undefined;
  const result: unknown = prepared ? await prepared(query) : await db.execute(query);
  return Array.isArray(result) ? (result as T[]) : (result as { rows: T[] }).rows;
}

/** int8 columns arrive as string (postgres.js), bigint or number (PGlite). */
export const toNumber = (value: unknown): number => (value === null ? 0 : Number(value));

/** timestamptz columns arrive as Date on both drivers; strings are parsed defensively. */
export const toDate = (value: unknown): Date => (value instanceof Date ? value : new Date(String(value)));
export const toDateOrNull = (value: unknown): Date | null =>
  value === null || value === undefined ? null : toDate(value);

/** What the drivers (postgres.js, PGlite) put on an error of theirs. */
export interface DriverError {
  /** The SQLSTATE, or the driver's own code (e.g. CONNECTION_CLOSED). */
  readonly code: string;
  /** ERROR, FATAL or PANIC: FATAL and PANIC end the connection. */
  readonly severity?: unknown;
  /** The constraint a violation names: postgres.js's field. */
  readonly constraint_name?: unknown;
  /** The same, PGlite's field. */
  readonly constraint?: unknown;
}

/** The driver's error in `error` or its cause chain (drizzle wraps it): the first with a string `code`. */
export function driverError(error: unknown): DriverError | undefined {
  for (let e = error, depth = 0; e !== null && typeof e === "object" && depth < 8; depth++) {
    if (typeof (e as { code?: unknown }).code === "string") return e as DriverError;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/** A deadlock (40P01) or a serialization failure (40001): the transaction was rolled back whole. */
export function isConflict(error: unknown): boolean {
  const code = driverError(error)?.code;
  return code === "40P01" || code === "40001";
}

/**
 * Runs `attempt`, a whole transaction (or one statement), again while it fails
 * on a conflict ({@link isConflict}), `tries` times in all; the last failure
 * is thrown. Only for work that is safe to repeat from the start: a conflict
 * rolled back everything the failed try did.
 */
export async function retryOnConflict<T>(tries: number, attempt: () => Promise<T>): Promise<T> {
  for (let n = 1; ; n++) {
    try {
      return await attempt();
    } catch (error) {
      if (n >= tries || !isConflict(error)) throw error;
    }
  }
}
