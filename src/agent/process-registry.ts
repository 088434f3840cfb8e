import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/**
 * The process groups an agent started, and the work directories of its
 * deployments, one small file each in `dir`, so that an agent killed with
 * SIGKILL (which cannot stop its children nor clean up) has them stopped
 * and removed by the next agent started with the same work directory and
 * worker id.
 *
 * A process's file records the group leader's pid and its start time from
 * `/proc/<pid>/stat`, so a pid reused by an unrelated process is never
 * touched. Without `/proc` (not Linux) no process is recorded.
 */
export interface ProcessRegistry {
  /** Records a process group this agent started. */
  add(pid: number, label: string): void;
  /** Forgets it once it is gone. */
  remove(pid: number): void;
  /** Records a directory this agent made and removes when its work ends. */
  addDirectory(path: string): void;
  /** Forgets it once it is removed. */
  removeDirectory(path: string): void;
  /**
   * Kills the groups recorded by an earlier run that are still alive, then
   * removes the directories it recorded; says how many of each.
   */
  sweep(): { groups: number; directories: number };
}

/** The start time of a process in clock ticks since boot, or undefined if unknown. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Field 22, counted after the command name, which may itself contain spaces and parentheses.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

export function createProcessRegistry(dir: string): ProcessRegistry {
  mkdirSync(dir, { recursive: true });
  const file = (pid: number) => join(dir, String(pid));
  // Named by a hash of the path: a path can be longer than a file name may be.
  const directoryFile = (path: string) => join(dir, `dir-${createHash("sha256").update(path).digest("hex")}`);
  return {
    add(pid, label) {
      const started = startTime(pid);
      if (started === undefined) return;
      writeFileSync(file(pid), JSON.stringify({ pid, started, label }));
    },
    remove(pid) {
      rmSync(file(pid), { force: true });
    },
    addDirectory(path) {
      writeFileSync(directoryFile(path), JSON.stringify({ directory: path }));
    },
    removeDirectory(path) {
      rmSync(directoryFile(path), { force: true });
    },
    sweep() {
      let groups = 0;
      const directories: string[] = [];
      for (const name of readdirSync(dir)) {
        const path = join(dir, name);
        try {
          const entry = JSON.parse(readFileSync(path, "utf8")) as
            | { pid: number; started: string }
            | { directory: string };
          if ("directory" in entry) {
            // After every group is killed: what they were writing goes with them.
            directories.push(entry.directory);
            continue;
          }
          if (startTime(entry.pid) === entry.started) {
            process.kill(-entry.pid, "SIGKILL");
            groups += 1;
          }
        } catch {
          // Unreadable, or gone between the check and the kill: nothing to stop.
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
