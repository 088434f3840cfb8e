import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { PGlite } from "@electric-sql/pglite";
import { drizzle as drizzlePglite } from "drizzle-orm/pglite";
import { migrate as migratePglite } from "drizzle-orm/pglite/migrator";
import { drizzle as drizzlePostgres } from "drizzle-orm/postgres-js";
import { migrate as migratePostgres } from "drizzle-orm/postgres-js/migrator";
import postgres from "postgres";
import type { TestStore } from "./database.js";
import { scratchDir } from "./scratch.js";

/** src/store/migrations: the migrations this build ships. */
export const MIGRATIONS = fileURLToPath(new URL("../../src/store/migrations", import.meta.url));

/** The journal of the migrations this build ships, oldest first. */
export const shippedJournal = JSON.parse(readFileSync(join(MIGRATIONS, "meta/_journal.json"), "utf8")) as {
  entries: { tag: string; when: number }[];
};

/**
 * Migrates `store` with the migrations in `folder` alone, as the build that shipped them did,
 * then runs `statements` (rows that build would have written).
 */
export async function migrateWith(
  store: TestStore,
  folder: string,
  statements: readonly string[] = [],
): Promise<void> {
  if (store.url) {
    const client = postgres(store.url, { max: 1, onnotice: () => {} });
    try {
      await migratePostgres(drizzlePostgres(client), { migrationsFolder: folder });
      for (const statement of statements) await client.unsafe(statement);
    } finally {
      await client.end();
    }
  } else {
    const client = await PGlite.create(store.dataDir);
    try {
      await migratePglite(drizzlePglite(client), { migrationsFolder: folder });
      for (const statement of statements) await client.exec(statement);
    } finally {
      await client.close();
    }
  }
}

/**
 * Migrates `store` as an older build did: with this build's migrations up to `count` of them
 * (the first `count` of the journal), then runs `statements`.
 */
export async function migrateWithFirst(
  store: TestStore,
  count: number,
  statements: readonly string[] = [],
): Promise<void> {
  const folder = mkdtempSync(join(scratchDir(), "leasehold-migrations-"));
  try {
    cpSync(MIGRATIONS, folder, { recursive: true });
    writeFileSync(
      join(folder, "meta/_journal.json"),
      JSON.stringify({ ...shippedJournal, entries: shippedJournal.entries.slice(0, count) }),
    );
    await migrateWith(store, folder, statements);
  } finally {
    rmSync(folder, { recursive: true, force: true });
  }
}

/** Runs one statement on `store` on a connection of its own: its rows. */
export async function queryStore(store: TestStore, text: string): Promise<Record<string, unknown>[]> {
  if (store.url) {
    const client = postgres(store.url, { max: 1, onnotice: () => {} });
    try {
      return [...(await client.unsafe(text))];
    } finally {
      await client.end();
    }
  }
  const client = await PGlite.create(store.dataDir);
  try {
    return (await client.query<Record<string, unknown>>(text)).rows;
  } finally {
    await client.close();
  }
}
