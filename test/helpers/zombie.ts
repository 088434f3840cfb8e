import { type ChildProcess, spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { setTimeout as delay } from "node:timers/promises";

/** The fields of `/proc/<pid>/stat` after the command name: state is [0], start time [19]. */
const statFields = (pid: number): string[] | undefined => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
};

/** The children of `pid`, from /proc. */
const childrenOf = (pid: number): number[] =>
  readdirSync("/proc")
    .filter((name) => /^\d+$/.test(name))
    .map(Number)
    .filter((p) => statFields(p)?.[1] === String(pid));

/**
 * A process killed and never reaped (a zombie), with its start time as
 * /proc gives it, and its parent (kill it to let init reap the zombie).
 *
 * The parent is a shell that started `sleep 300` in the background and then
 * became `sleep 301`, which never waits for children. The child is killed
 * only once the shell has become `sleep`: killed before, while the shell
 * still ran, it was reaped by the shell on a busy machine, and the tests
 * that read its /proc entry failed with ENOENT.
 */
export async function makeZombie(): Promise<{ pid: number; started: string; parent: ChildProcess }> {
  const parent = spawn("sh", ["-c", "sleep 300 & exec sleep 301"], { stdio: "ignore" });
  const parentPid = parent.pid as number;
  // Bounded: neither an exec nor a process's death is an event another process can wait for.
  let child: number | undefined;
  for (let i = 0; i < 1000 && child === undefined; i++) {
    const became = readFileSync(`/proc/${parentPid}/cmdline`, "utf8").split("\0").join(" ").trim();
    if (became === "sleep 301") child = childrenOf(parentPid)[0];
    if (child === undefined) await delay(10);
  }
  if (child === undefined) throw new Error("makeZombie: the shell did not become sleep with a child");
  const started = statFields(child)?.[19] as string;
  process.kill(child, "SIGKILL");
  for (let i = 0; i < 1000 && statFields(child)?.[0] !== "Z"; i++) await delay(10);
  if (statFields(child)?.[0] !== "Z") throw new Error(`makeZombie: ${child} did not become a zombie`);
  return { pid: child, started, parent };
}
