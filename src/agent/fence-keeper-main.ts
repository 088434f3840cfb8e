/**
 * The fence keeper's process (see fence-keeper.ts): reads lines from stdin,
 *
 *   +<pid> <start time>   a process group the agent started (start time as in /proc/<pid>/stat, or -)
 *   -<pid>                that group is gone
 *   d<ns>                 the agent's leases are guaranteed until <ns> on the monotonic clock
 *                         (process.hrtime.bigint(), shared by every process of the machine)
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
    if (!/^\d+$/.test(head)) return;
    if (line[0] === "+") groups.set(Number(head), started);
    else if (line[0] === "-") groups.delete(Number(head));
    else if (line[0] === "d") {
      clearTimeout(timer);
      const ms = Number((BigInt(head) - process.hrtime.bigint()) / 1_000_000n);
      timer = setTimeout(killAll, Math.max(0, ms));
    }
  })
  .on("close", () => {
    killAll();
    process.exit(0);
  });
