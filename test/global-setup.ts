import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestProject } from "vitest/node";
import { openDatabase } from "../src/store/database.js";
import { startOwnPostgres } from "./embedded-postgres.js";

declare module "vitest" {
  export interface ProvidedContext {
    /** Admin URL of a PostgreSQL server tests may create databases on. */
    postgresAdminUrl: string;
    /** The driver the shared suites run on: PGlite unless DATABASE_URL is set. */
    driver: "pglite" | "postgres";
    /** A migrated PGlite data directory that fresh PGlite stores are copied from. */
    pgliteTemplate: string;
  }
}

/**
 * Tests that need a real PostgreSQL (concurrency, several processes) get one
 * in every run: the server at DATABASE_URL when set, otherwise an embedded
 * PostgreSQL started here, so nothing is skipped on a machine without one.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const url = process.env.DATABASE_URL;
  project.provide("driver", url ? "postgres" : "pglite");
  // Creating and migrating a PGlite directory takes seconds; copying one is instant.
  const template = join(tmpdir(), `leasehold-pglite-template-${randomBytes(6).toString("hex")}`);
  const database = await openDatabase({ dataDir: template });
  await database.close();
  project.provide("pgliteTemplate", template);
  const dropTemplate = () => rmSync(template, { recursive: true, force: true });
  if (url) {
    project.provide("postgresAdminUrl", url);
    return async () => dropTemplate();
  }
  const pg = await startOwnPostgres();
  project.provide("postgresAdminUrl", pg.url);
  return async () => {
    await pg.destroy();
    dropTemplate();
  };
}
