import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { appendFileSync, readdirSync, rmSync, statSync, utimesSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import postgres from "postgres";
import type { TestProject } from "vitest/node";
import { openDatabase } from "../src/store/database.js";
import { startOwnPostgres } from "./embedded-postgres.js";
import { scratchDir } from "./helpers/scratch.js";

declare module "vitest" {
  export interface ProvidedContext {
    /** Admin URL of a PostgreSQL server tests may create databases on. */
    postgresAdminUrl: string;
    /** The driver the shared suites run on: PGlite unless DATABASE_URL is set. */
    driver: "pglite" | "postgres";
    /** A migrated PGlite data directory that fresh PGlite stores are copied from. */
    pgliteTemplate: string;
    /** A migrated database on postgresAdminUrl's server that fresh PostgreSQL stores are copied from. */
    postgresTemplate: string;
    /** Names this run's PostgreSQL databases (`leasehold_test_<run>_…`): the teardown drops any left. */
    postgresRun: string;
  }
}

/**
 * Tests that need a real PostgreSQL (concurrency, several processes) get one
 * in every run: the server at DATABASE_URL when set, otherwise an embedded
 * PostgreSQL started here, so nothing is skipped on a machine without one.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  buildWhenStale();
  const url = process.env.DATABASE_URL;
  project.provide("driver", url ? "postgres" : "pglite");
  // Creating and migrating a PGlite directory takes seconds; copying one is instant.
  const template = join(scratchDir(), `leasehold-pglite-template-${randomBytes(6).toString("hex")}`);
  const database = await openDatabase({ dataDir: template });
  await database.close();
  appendFileSync(join(template, "postgresql.conf"), TEST_SETTINGS);
  project.provide("pgliteTemplate", template);
  const dropTemplate = () => rmSync(template, { recursive: true, force: true });
  if (url) {
    project.provide("postgresAdminUrl", url);
    const dropPostgresTemplate = await providePostgresTemplate(project, url);
    return async () => {
      await dropPostgresTemplate();
      dropTemplate();
    };
  }
  const pg = await startOwnPostgres();
  project.provide("postgresAdminUrl", pg.url);
  await providePostgresTemplate(project, pg.url);
  return async () => {
    await pg.destroy();
    dropTemplate();
  };
}

/**
 * Makes and migrates the database fresh PostgreSQL stores are copied from
 * (`create database … template`, which needs nobody connected to it: the
 * connections that migrated it are closed here); returns what drops it.
 */
async function providePostgresTemplate(project: TestProject, adminUrl: string): Promise<() => Promise<void>> {
  const run = randomBytes(6).toString("hex");
  const name = `leasehold_template_${run}`;
  const asAdmin = async (statement: string) => {
    const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
    try {
      await admin.unsafe(statement);
    } finally {
      await admin.end();
    }
  };
  await asAdmin(`create database ${name}`);
  const url = new URL(adminUrl);
  url.pathname = `/${name}`;
  const migrated = await openDatabase({ url: url.toString(), dataDir: "" });
  await migrated.close();
  project.provide("postgresTemplate", name);
  project.provide("postgresRun", run);
  return async () => {
    // With the template, any test database of this run a test left behind (its drop never ran).
    const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
    try {
      const left = await admin<{ datname: string }[]>`
        select datname from pg_database where datname like ${`leasehold_test_${run}_%`}`;
      for (const { datname } of left) await admin.unsafe(`drop database if exists ${datname} with (force)`);
    } finally {
      await admin.end();
    }
    await asAdmin(`drop database if exists ${name} with (force)`);
  };
}

/**
 * Settings of the test servers' PGlite directories (a later line of
 * postgresql.conf wins). PostgreSQL sets up all of its shared buffers when it
 * starts, which in PGlite's WebAssembly took about half of a server's start
 * with the default 128 MB: some 0.4 s of CPU for each of the hundreds of
 * servers the suite starts. A test database fits in 16 MB many times over.
 */
const TEST_SETTINGS = "\n# Set by test/global-setup.ts for test servers only.\nshared_buffers = 16MB\n";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

/** The newest modification time under `dir`, in ms. */
function newestChange(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) newest = Math.max(newest, statSync(join(entry.parentPath, entry.name)).mtimeMs);
  }
  return newest;
}

/**
 * Tests start servers and CLI commands as `bin/leasehold.js`, which runs the
 * compiled dist/: build it first when a file of src/ is newer than the last
 * build, so that a test never runs yesterday's code.
 */
function buildWhenStale(): void {
  const stamp = join(ROOT, "dist", ".tsbuildinfo");
  const built = statSync(stamp, { throwIfNoEntry: false })?.mtimeMs ?? 0;
  const inputs = ["package.json", "tsconfig.json", "tsconfig.build.json"].map(
    (f) => statSync(join(ROOT, f)).mtimeMs,
  );
  if (Math.max(newestChange(join(ROOT, "src")), ...inputs) <= built) return;
  execFileSync("npm", ["run", "--silent", "build"], { cwd: ROOT, stdio: "inherit" });
  // tsc leaves its build info alone when no output changed (a file saved without an edit).
  const now = new Date();
  utimesSync(stamp, now, now);
}
