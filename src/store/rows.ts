import type { SQL } from "drizzle-orm";
import type { Db } from "./database.js";

/**
 * Runs raw SQL and returns its rows. postgres.js answers with an array,
 * PGlite with `{ rows }`; callers see the same thing on both.
 */
export async function queryRows<T>(db: Db, query: SQL): Promise<T[]> {
  const result: unknown = await db.execute(query);
  return Array.isArray(result) ? (result as T[]) : (result as { rows: T[] }).rows;
}

/** int8 columns arrive as string (postgres.js), bigint or number (PGlite). */
export const toNumber = (value: unknown): number => (value === null ? 0 : Number(value));

/** timestamptz columns arrive as Date on both drivers; strings are parsed defensively. */
export const toDate = (value: unknown): Date => (value instanceof Date ? value : new Date(String(value)));
export const toDateOrNull = (value: unknown): Date | null =>
  value === null || value === undefined ? null : toDate(value);
