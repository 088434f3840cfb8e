import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { makeDirectories } from "../make-directories.js";

/**
 * The process groups an agent started, and the work directories of its
 * deployments, one small file each under `<work dir>/.processes/<worker id>`,
 * so that an agent killed with SIGKILL (which cannot stop its children nor
 * clean up) has them stopped and removed by the next agent started with the
 * same work directory and worker id.
 *
 * A process's file records the group leader's pid and its start time from
 * `/proc/<pid>/stat`, so a pid reused by an unrelated process is never
 * touched. Without `/proc` (not Linux) no process is recorded. Only
 * directories directly in the work directory are ever removed, whatever a
 * record says.
 */
export interface ProcessRegistry {
  /** Records a process group this agent started. */
  add(pid: number, label: string): void;
  /** Forgets it once it is gone. */
  remove(pid: number): void;
  /** Records a directory this agent made in the work directory and removes when its work ends. */
  addDirectory(path: string): void;
  /** Forgets it once it is removed (never throws: a record left behind only costs the next sweep a look). */
  removeDirectory(path: string): void;
  /**
   * Kills the groups recorded by an earlier run that are still alive, then
   * removes the directories it recorded; says how many of each.
   */
  sweep(): { groups: number; directories: number };
}

/** A process's state letter and start time (clock ticks since boot), or undefined if unknown. */
function processStat(pid: number): { state: string; started: string } | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields 3 and 22, counted after the command name, which may itself contain spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return { state: fields[0] as string, started: fields[19] as string };
  } catch {
    return undefined;
  }
}

/** The start time of a process, or undefined if unknown. */
export const startTime = (pid: number): string | undefined => processStat(pid)?.started;

/** Prefix of a record being written: renamed when complete, so no record is ever read half written. */
const PARTIAL = ".partial-";

/** Writes `file` whole or not at all. */
function writeRecord(file: string, content: object): void {
  const partial = join(dirname(file), `${PARTIAL}${basename(file)}`);
  writeFileSync(partial, JSON.stringify(content));
  renameSync(partial, file);
}

/**
 * The work directory, made if missing (readable by its owner only), and
 * refused when it belongs to another user: the records in it say which
 * processes to kill and which directories to remove. Says whether it was
 * made now.
 */
export function ownWorkDir(workDir: string): boolean {
  let made: boolean;
  try {
    made = makeDirectories(workDir, 0o700);
  } catch (error) {
    const { code, message } = error as NodeJS.ErrnoException;
    throw new Error(`cannot make the work directory ${workDir}: ${code ?? message}`);
  }
  const uid = process.getuid?.();
  const owner = statSync(workDir).uid;
  if (uid !== undefined && owner !== uid)
    throw new Error(
      `the work directory ${workDir} belongs to another user (uid ${owner}): pass a --work-dir of your own`,
    );
  return made;
}

/**
 * Records this process as the agent of `workerId` in `workDir`, unless another
 * live process is recorded there: then its pid, and nothing is recorded (the
 * sweep of a second agent would stop the first one's work).
 */
export function claimWorkDir(workDir: string, workerId: string): number | undefined {
  const dir = join(workDir, ".processes");
  makeDirectories(dir);
  const file = join(dir, `${workerId}.agent`);
  try {
    const { pid, started } = JSON.parse(readFileSync(file, "utf8")) as { pid: number; started: string };
    // A zombie (killed, not yet reaped by whoever adopted it: PID 1 in some containers) is gone.
    const other = processStat(pid);
    if (pid !== process.pid && started !== undefined && other?.started === started && other.state !== "Z")
      return pid;
  } catch {
    // No record, or an unreadable one: nobody holds it.
  }
  writeRecord(file, { pid: process.pid, started: startTime(process.pid) });
  return undefined;
}

/** A record of the registry, or undefined when it cannot be read. */
function readRecord(path: string): { pid: number; started: string } | { directory: string } | undefined {
  try {
    const entry = JSON.parse(readFileSync(path, "utf8")) as Record<string, unknown>;
    if (typeof entry.directory === "string") return { directory: entry.directory };
    if (typeof entry.pid === "number" && typeof entry.started === "string")
      return { pid: entry.pid, started: entry.started };
  } catch {
    // Unreadable: nothing to act on.
  }
  return undefined;
}

/**
 * The registry of worker `workerId` under `workDir` (made if missing). Call
 * `sweep()` before the agent connects, to stop what a killed earlier run of
 * the same worker left; pass it to commandHandler and createDeploymentHandler
 * (wrapped by keptBy, to tell a fence keeper too). A work directory holds
 * the records that decide what is killed and removed: use one only this
 * agent's user can write (the reference agent refuses one owned by another user).
 */
export function createProcessRegistry(workDir: string, workerId: string): ProcessRegistry {
  const dir = join(workDir, ".processes", workerId);
  makeDirectories(dir);
  const root = resolve(workDir);
  const file = (pid: number) => join(dir, String(pid));
  // Named by a hash of the path: a path can be longer than a file name may be.
  const directoryFile = (path: string) => join(dir, `dir-${createHash("sha256").update(path).digest("hex")}`);
  /** A directory a deployment's attempt gets: directly in the work directory, not one of ours. */
  const removable = (path: string) =>
    dirname(resolve(path)) === root && !basename(path).startsWith(".") && basename(path) !== "";
  return {
    add(pid, label) {
      const started = startTime(pid);
      if (started === undefined) return;
      writeRecord(file(pid), { pid, started, label });
    },
    remove(pid) {
      rmSync(file(pid), { force: true });
    },
    addDirectory(path) {
      writeRecord(directoryFile(path), { directory: path });
    },
    removeDirectory(path) {
      try {
        rmSync(directoryFile(path), { force: true });
      } catch {
        // Left for the next sweep, which finds the directory gone.
      }
    },
    sweep() {
      let groups = 0;
      const directories: string[] = [];
      for (const name of readdirSync(dir)) {
        const path = join(dir, name);
        // A record cut short by a kill while being written is only removed.
        const entry = name.startsWith(PARTIAL) ? undefined : readRecord(path);
        if (entry && "directory" in entry && removable(entry.directory)) {
          // Removed after every group is killed: what they were writing goes with them.
          directories.push(entry.directory);
          continue;
        }
        if (entry && "pid" in entry && startTime(entry.pid) === entry.started) {
          try {
            process.kill(-entry.pid, "SIGKILL");
            groups += 1;
          } catch {
            // Gone between the check and the kill: nothing to stop.
          }
        }
        rmSync(path, { force: true });
      }
      let removed = 0;
      for (const directory of directories) {
        try {
          if (existsSync(directory)) {
            // Retried: a process killed a moment ago may still be writing in it.
            rmSync(directory, { recursive: true, force: true, maxRetries: 3 });
            removed += 1;
          }
          rmSync(directoryFile(directory), { force: true });
        } catch {
          // Left recorded: the next sweep tries again.
        }
      }
      return { groups, directories: removed };
    },
  };
}
