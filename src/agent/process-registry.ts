import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/**
 * The process groups an agent started, one small file each in `dir`, so
 * that an agent killed with SIGKILL (which cannot stop its children) has
 * them stopped by the next agent started with the same work directory.
 *
 * A file records the group leader's pid and its start time from
 * `/proc/<pid>/stat`, so a pid reused by an unrelated process is never
 * touched. Without `/proc` (not Linux) nothing is recorded.
 */
export interface ProcessRegistry {
  /** Records a process group this agent started. */
  add(pid: number, label: string): void;
  /** Forgets it once it is gone. */
  remove(pid: number): void;
  /** Kills the groups recorded by an earlier run that are still alive; returns how many. */
  sweep(): number;
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
  return {
    add(pid, label) {
      const started = startTime(pid);
      if (started === undefined) return;
      writeFileSync(file(pid), JSON.stringify({ pid, started, label }));
    },
    remove(pid) {
      rmSync(file(pid), { force: true });
    },
    sweep() {
      let killed = 0;
      for (const name of readdirSync(dir)) {
        const path = join(dir, name);
        try {
          const { pid, started } = JSON.parse(readFileSync(path, "utf8")) as { pid: number; started: string };
          if (startTime(pid) === started) {
            process.kill(-pid, "SIGKILL");
            killed += 1;
          }
        } catch {
          // Unreadable, or gone between the check and the kill: nothing to stop.
        }
        rmSync(path, { force: true });
      }
      return killed;
    },
  };
}
