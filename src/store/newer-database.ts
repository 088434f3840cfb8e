import { readFileSync } from "node:fs";

/** One entry of drizzle's migration journal (`migrations/meta/_journal.json`). */
export interface JournalEntry {
  /** The migration's file name without `.sql`, e.g. `0016_resource_request_id`. */
  readonly tag: string;
  /** When it was generated, in ms: drizzle stores it as the applied row's `created_at`. */
  readonly when: number;
}

/** The migrations this build ships, oldest first. */
export function readJournal(migrationsFolder: string): readonly JournalEntry[] {
  const journal = JSON.parse(readFileSync(`${migrationsFolder}/meta/_journal.json`, "utf8")) as {
    entries: JournalEntry[];
  };
  return journal.entries.map(({ tag, when }) => ({ tag, when }));
}

/** A row of `drizzle.__drizzle_migrations`: a migration applied to the database. */
export interface AppliedMigration {
  readonly hash: string;
  /** The journal's `when` of the build that applied it, in ms (drizzle writes it as text or a number). */
  readonly created_at: string | number | null;
}

/**
 * The database was migrated by a newer build than this one (an older binary
 * started after an upgrade: a rollback). drizzle's migrator applies only the
 * migrations newer than the newest applied one, so it would do nothing, and
 * this build would serve on a schema it does not know (columns it does not
 * fill, constraints it does not expect) without a word. Start refuses instead.
 */
export class DatabaseNewerThanBuild extends Error {
  constructor(
    /** How many applied migrations this build does not know. */
    readonly unknown: number,
    /** The newest migration applied, as the database records it. */
    readonly newestApplied: { readonly createdAt: number; readonly hash: string },
    /** The newest migration this build ships. */
    readonly newestKnown: JournalEntry,
  ) {
    const applied = `${new Date(newestApplied.createdAt).toISOString()}, hash ${newestApplied.hash.slice(0, 12)}`;
    super(
      `the database was migrated by a newer leasehold: it has ${unknown} migration${unknown === 1 ? "" : "s"} this build does not know, ` +
        `the newest from ${applied}; the newest this build knows is ${newestKnown.tag} (${new Date(newestKnown.when).toISOString()}). ` +
        "Run a leasehold build at least as new as the one that migrated it (downgrading the schema is not supported)",
    );
    this.name = "DatabaseNewerThanBuild";
  }
}

/**
 * Throws {@link DatabaseNewerThanBuild} when `applied` holds migrations newer
 * than the newest of `journal`. drizzle orders migrations by `created_at`
 * alone (the journal's `when`), so that is what is compared: a hash this
 * build does not know with an older time is one of its own edited, not a
 * newer schema.
 */
export function refuseNewerDatabase(
  applied: readonly AppliedMigration[],
  journal: readonly JournalEntry[],
): void {
  const newestKnown = journal.at(-1);
  if (!newestKnown) return;
  const newer = applied
    .map((row) => ({ createdAt: Number(row.created_at ?? 0), hash: row.hash }))
    .filter((row) => row.createdAt > newestKnown.when)
    .sort((a, b) => a.createdAt - b.createdAt);
  const newest = newer.at(-1);
  if (newest) throw new DatabaseNewerThanBuild(newer.length, newest, newestKnown);
}

/**
 * Reads the applied migrations, or none when the database was never migrated
 * (no `drizzle.__drizzle_migrations` yet). `query` runs one statement.
 */
export async function appliedMigrations(
  query: (text: string) => Promise<readonly Record<string, unknown>[]>,
): Promise<AppliedMigration[]> {
  const [exists] = await query(`select to_regclass('drizzle.__drizzle_migrations') is not null as present`);
  if (!exists?.present) return [];
  const rows = await query("select hash, created_at::text as created_at from drizzle.__drizzle_migrations");
  return rows.map((row) => ({ hash: String(row.hash), created_at: row.created_at as string | null }));
}

/**
 * The migrations of `journal` that drizzle's migrator applies to a database
 * that has `applied`: every one newer (by the journal's `when`) than the
 * newest applied one, oldest first.
 */
export function pendingMigrations(
  applied: readonly AppliedMigration[],
  journal: readonly JournalEntry[],
): readonly JournalEntry[] {
  const newestApplied = Math.max(0, ...applied.map((row) => Number(row.created_at ?? 0)));
  return journal.filter((entry) => entry.when > newestApplied);
}
