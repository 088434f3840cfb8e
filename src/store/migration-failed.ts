import { readMigrationFiles } from "drizzle-orm/migrator";
import type { AppliedMigration, JournalEntry } from "./newer-database.js";

/** The most of the failed statement a message shows. */
const MAX_STATEMENT = 200;

/**
 * A migration the database refused (a column or index it already has, a
 * constraint its rows break). drizzle applies all pending migrations in one
 * transaction, so nothing of them stayed: the database is as it was before
 * this start. Its own error (message and SQLSTATE), which drizzle keeps as
 * the `cause` of a "Failed query" error, is in the message: without it an
 * operator had to find it in the database's log.
 */
export class MigrationFailed extends Error {
  constructor(
    /** The database, as a message names it: `the database at <url>` or `the database in <dir>`. */
    where: string,
    /** The tag of the migration whose statement failed; undefined for one of drizzle's own (its bookkeeping). */
    readonly migration: string | undefined,
    /** The database's own message, e.g. `column "x" of relation "y" already exists`. */
    readonly databaseMessage: string,
    /** Its SQLSTATE, e.g. 42701, when it gave one. */
    readonly sqlState: string | undefined,
    /** The statement that failed, without its comments, shortened. */
    readonly statement: string,
    /** The newest migration the database still has, as a message says it. */
    readonly leftAt: string,
    options: { cause: unknown },
  ) {
    super(
      `cannot migrate ${where}: ${migration ? `migration ${migration}` : "migrating"} failed: ${databaseMessage}` +
        `${sqlState ? ` (SQLSTATE ${sqlState})` : ""}, in: ${statement}. ` +
        `Nothing was applied: pending migrations run in one transaction, which was rolled back, so the database is still at ${leftAt}. ` +
        "Something in the database conflicts with that migration (made by hand, or by a build that shipped a different migration of that number): " +
        "resolve that conflict and start again, or go on running the build that migrated it last (not retrying: this is not an outage)",
      options,
    );
    this.name = "MigrationFailed";
  }
}

/**
 * Runs `migrate`; when a statement of a migration fails in the database,
 * throws {@link MigrationFailed} saying which migration, the database's error
 * and what state the database is in. Any other failure (the connection lost
 * in the middle) is thrown as it is: the caller may retry those.
 */
export async function migrateExplained(
  migrate: () => Promise<void>,
  context: {
    readonly where: string;
    readonly migrationsFolder: string;
    readonly applied: readonly AppliedMigration[];
    readonly journal: readonly JournalEntry[];
    /** Failures that are not the database refusing a migration (an outage): thrown as they are. */
    readonly isTransient: (error: unknown) => boolean;
  },
): Promise<void> {
  try {
    await migrate();
  } catch (error) {
    const query = (error as { query?: unknown } | null)?.query;
    const refusal = databaseError(error);
    if (typeof query !== "string" || !refusal || context.isTransient(error)) throw error;
    const newestApplied = Math.max(0, ...context.applied.map((row) => Number(row.created_at ?? 0)));
    const files = readMigrationFiles({ migrationsFolder: context.migrationsFolder });
    const pending = context.journal
      .map((entry, i) => ({ tag: entry.tag, when: entry.when, statements: files[i]?.sql ?? [] }))
      .filter((entry) => entry.when > newestApplied);
    const failed = pending.find((entry) => entry.statements.includes(query));
    throw new MigrationFailed(
      context.where,
      failed?.tag,
      refusal.message,
      refusal.code,
      shortStatement(query),
      leftAt(context.applied, context.journal, newestApplied),
      { cause: error },
    );
  }
}

/** The first error in `error`'s cause chain that carries a SQLSTATE (postgres.js, PGlite). */
function databaseError(error: unknown): { message: string; code: string } | undefined {
  let e = (error as { cause?: unknown } | null)?.cause;
  for (let depth = 0; e !== null && typeof e === "object" && depth < 8; depth++) {
    const { code, message } = e as { code?: unknown; message?: unknown };
    if (typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) && typeof message === "string")
      return { message, code };
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/** The statement without its comment lines, on one line, cut at {@link MAX_STATEMENT} characters. */
function shortStatement(statement: string): string {
  const text = statement
    .split("\n")
    .filter((line) => !line.trim().startsWith("--"))
    .join(" ")
    .replace(/\s+/g, " ")
    .trim()
    .replace(/;$/, "");
  return text.length > MAX_STATEMENT ? `${text.slice(0, MAX_STATEMENT)}…` : text;
}

/** The newest migration applied, by its tag when this build ships it. */
function leftAt(
  applied: readonly AppliedMigration[],
  journal: readonly JournalEntry[],
  newestApplied: number,
): string {
  if (applied.length === 0) return "no migration (as empty as before)";
  const known = journal.find((entry) => entry.when === newestApplied);
  if (known) return `migration ${known.tag}`;
  return `a migration from ${new Date(newestApplied).toISOString()} that this build does not ship (an earlier text of one of its migrations)`;
}
