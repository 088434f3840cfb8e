import {
  linkSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { Code, LeaseholdError } from "../errors.js";
import { makeDirectories } from "../make-directories.js";

/** Tries at taking over a stale pid file while another process takes it over too. */
const TAKEOVER_TRIES = 100;
/** Pause between those tries. */
const TAKEOVER_PAUSE_MS = 20;
/** A takeover mutex older than this was left by a process that died inside it. */
const STALE_MUTEX_MS = 10_000;

/**
 * PGlite is one embedded PostgreSQL in one process: two processes opening the
 * same data directory would corrupt it (a test of two such processes lost
 * committed rows). A pid file guards it, created exclusively.
 *
 * A pid file whose process is gone is taken over. "Gone" includes a zombie
 * (killed, not yet reaped by its parent) and a pid the system gave to another
 * process since: the file holds the process's start time as well (Linux), and
 * a live process with another start time is not the owner. Taking over is
 * check, remove, create: two processes doing it at once could both remove
 * and both create, so one at a time does it, under a directory created
 * exclusively beside the file. The file is written whole first and then
 * linked into place, so it is never seen empty.
 */
export function lockDataDir(dataDir: string): () => void {
  prepare(dataDir);
  const file = join(dataDir, "leasehold.pid");
  const me = ownerText(process.pid);
  // Written whole beside it, then linked into place: a file created and then written could be
  // read empty in between, and taken for a stale one.
  const mine = `${file}.${process.pid}`;
  try {
    writeFileSync(mine, me);
  } catch (error) {
    throw dataDirError(dataDir, error);
  }
  try {
    for (let attempt = 0; attempt < TAKEOVER_TRIES; attempt++) {
      try {
        linkSync(mine, file);
        return () => {
          // Only our own file: never one another process wrote after taking over.
          if (readText(file) === me) rmSync(file, { force: true });
        };
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw dataDirError(dataDir, error);
      }
      if (!takeOverStale(dataDir, file)) pause(TAKEOVER_PAUSE_MS);
    }
  } finally {
    rmSync(mine, { force: true });
  }
  throw new LeaseholdError(Code.Aborted, `could not lock data directory ${dataDir}; retry`);
}

/**
 * Removes `file` if the process it names is gone, under the takeover mutex;
 * throws if it is alive. False when another process holds the mutex: wait,
 * then try again.
 */
function takeOverStale(dataDir: string, file: string): boolean {
  const mutex = `${file}.takeover`;
  const owner = readText(file);
  if (owner === undefined) return true; // removed meanwhile: try again at once
  const pid = Number.parseInt(owner, 10);
  if (pid !== process.pid && isOwnerAlive(owner)) {
    throw new LeaseholdError(
      Code.FailedPrecondition,
      `data directory ${dataDir} is in use by process ${pid}; stop it, or use another --data-dir ` +
        "(several servers need PostgreSQL: --database-url)",
      { reason: "DATA_DIR_LOCKED" },
    );
  }
  if (!enter(mutex)) return false;
  try {
    // Still the stale file read above, not one another process wrote after taking it over.
    if (readText(file) === owner) rmSync(file, { force: true });
  } finally {
    rmdirSync(mutex);
  }
  return true;
}

/**
 * Creates the data directory if need be, and refuses one that holds files of
 * something else: PGlite would initialize its database among them.
 */
function prepare(dataDir: string): void {
  let entries: string[];
  try {
    makeDirectories(dataDir);
    entries = readdirSync(dataDir);
  } catch (error) {
    throw dataDirError(dataDir, error);
  }
  const ours =
    entries.length === 0 ||
    entries.includes("PG_VERSION") ||
    entries.some((e) => e.startsWith("leasehold.pid"));
  if (!ours) {
    throw new LeaseholdError(
      Code.FailedPrecondition,
      `--data-dir ${dataDir} holds files that are not a Leasehold database (${entries.slice(0, 3).join(", ")}` +
        `${entries.length > 3 ? ", …" : ""}); give an empty or new directory`,
      { reason: "DATA_DIR_UNUSABLE" },
    );
  }
}

/** What the pid file says of a process: its pid, and its start time where the system tells it. */
function ownerText(pid: number): string {
  const started = startTimeOf(pid);
  return started === undefined ? String(pid) : `${pid} ${started}`;
}

/** Whether the process a pid file names still runs: alive, not a zombie, and the same process. */
function isOwnerAlive(owner: string): boolean {
  const [pidText, started] = owner.trim().split(/\s+/);
  const pid = Number(pidText);
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
  } catch (error) {
    // EPERM: it exists but belongs to someone else.
    if ((error as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  const stat = procStat(pid);
  if (stat === undefined) return true; // no /proc: the signal's answer is all there is
  if (stat.state === "Z" || stat.state === "X") return false;
  return started === undefined || stat.started === started;
}

/** The start time of `pid` in clock ticks since boot, from /proc (Linux); undefined elsewhere. */
function startTimeOf(pid: number): string | undefined {
  return procStat(pid)?.started;
}

/** State and start time of a process, from /proc/<pid>/stat, whose second field may hold spaces. */
function procStat(pid: number): { state: string; started: string } | undefined {
  const text = readText(`/proc/${pid}/stat`);
  if (text === undefined) return undefined;
  const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
  const state = fields[0];
  const started = fields[19];
  return state && started ? { state, started } : undefined;
}

/** Creates the takeover mutex; false if another process holds it (one that died in it long ago is cleared). */
function enter(mutex: string): boolean {
  try {
    mkdirSync(mutex);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
  }
  try {
    if (Date.now() - statSync(mutex).mtimeMs > STALE_MUTEX_MS) rmdirSync(mutex);
  } catch {
    // Gone meanwhile: the next try creates it.
  }
  return false;
}

function readText(file: string): string | undefined {
  try {
    return readFileSync(file, "utf8");
  } catch {
    return undefined;
  }
}

/** Waits without returning to the event loop: the lock is taken before the server starts. */
function pause(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** An error creating the pid file, naming the option to change. */
function dataDirError(dataDir: string, error: unknown): LeaseholdError {
  const code = (error as NodeJS.ErrnoException).code;
  const why =
    code === "ENOTDIR" || code === "EEXIST"
      ? "is not a directory"
      : code === "EACCES" || code === "EPERM"
        ? "cannot be written by this user"
        : code === "ENOENT"
          ? "does not exist and cannot be made there"
          : `cannot be used (${(error as Error).message})`;
  return new LeaseholdError(Code.FailedPrecondition, `--data-dir ${dataDir} ${why}`, {
    reason: "DATA_DIR_UNUSABLE",
  });
}
