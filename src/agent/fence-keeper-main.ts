/**
 * The fence keeper's process (see fence-keeper.ts): reads lines from stdin,
 *
 *   +<pid> <start time>   a process group the agent started (start time as in /proc/<pid>/stat, or -)
 *   -<pid>                that group is gone
 *   d<ms>                 the agent's leases are guaranteed for <ms> more
 *
 * and SIGKILLs every group still recorded when the last guarantee runs out
 * without a newer one, or at once when stdin ends (the agent is gone), then
 * exits. A group whose leader's start time no longer matches is a pid reused
 * by another process: left alone.
 */
import { createInterface } from "node:readline";
import { startTime } from "./process-registry.js";

const groups = new Map<number, string>();
let timer: NodeJS.Timeout | undefined;

function killAll(): void {
  for (const [pid, started] of groups) {
    if (started !== "-" && startTime(pid) !== started) continue;
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // ESRCH: nothing left in the group.
    }
  }
  groups.clear();
}

// Detached from the agent's terminal: Ctrl-C there is the agent's to handle, and it ends stdin.
process.on("SIGINT", () => {});
createInterface({ input: process.stdin })
  .on("line", (line) => {
    const [head = "", started = "-"] = line.slice(1).split(" ");
    const n = Number(head);
    if (!Number.isFinite(n)) return;
    if (line[0] === "+") groups.set(n, started);
    else if (line[0] === "-") groups.delete(n);
    else if (line[0] === "d") {
      clearTimeout(timer);
      timer = setTimeout(killAll, Math.max(0, n));
    }
  })
  .on("close", () => {
    killAll();
    process.exit(0);
  });
