import { spawn } from "node:child_process";
import { chownSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { claimWorkDir, createProcessRegistry, ownWorkDir } from "../../src/agent/process-registry.js";
import { makeZombie } from "../helpers/zombie.js";

/** A process's start time, as /proc/<pid>/stat gives it (field 22). */
function startOf(pid: number): string | undefined {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
}

describe("the process registry", () => {
  const dirs: string[] = [];
  afterEach(async () => {
    for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
  });
  const scratch = async () => {
    const d = await mkdtemp(join(tmpdir(), "leasehold-registry-"));
    dirs.push(d);
    return d;
  };
  /** A directory with a file in it, as a deployment's attempt leaves one. */
  const workDirectory = (root: string, name: string) => {
    const path = join(root, name);
    mkdirSync(join(path, "out"), { recursive: true });
    writeFileSync(join(path, "out", "result.txt"), "partial");
    return path;
  };

  it("removes the directories an earlier run recorded and did not remove, and only those", async () => {
    const root = await scratch();
    const earlier = createProcessRegistry(root, "w1");
    const left = workDirectory(root, "01a2.1");
    const cleaned = workDirectory(root, "01a2.2");
    const unrecorded = workDirectory(root, "not-ours");
    earlier.addDirectory(left);
    earlier.addDirectory(cleaned);
    // The attempt that ended removed its directory and forgot it.
    await rm(cleaned, { recursive: true });
    earlier.removeDirectory(cleaned);
    // Recorded, but gone before the sweep: nothing to count.
    const vanished = join(root, "01a2.3");
    earlier.addDirectory(vanished);

    const next = createProcessRegistry(root, "w1");
    expect(next.sweep()).toEqual({ groups: 0, directories: 1 });
    expect(existsSync(left)).toBe(false);
    expect(existsSync(unrecorded)).toBe(true);
    // Forgotten once removed: a second sweep finds nothing.
    expect(next.sweep()).toEqual({ groups: 0, directories: 0 });
  });

  it("removes only directories directly in the work directory, whatever a record names", async () => {
    const root = await scratch();
    const elsewhere = await scratch();
    const outside = workDirectory(elsewhere, "precious");
    const nested = workDirectory(join(root, "deeper"), "01a2.1");
    const registry = createProcessRegistry(root, "w1");
    for (const path of [outside, nested, join(root, ".processes"), root]) registry.addDirectory(path);
    // A record cut short by a kill while being written.
    writeFileSync(join(root, ".processes", "w1", ".partial-dir-x"), '{"directo');
    expect(createProcessRegistry(root, "w1").sweep()).toEqual({ groups: 0, directories: 0 });
    for (const path of [outside, nested, join(root, ".processes"), root]) expect(existsSync(path)).toBe(true);
    // The records are gone all the same: they could never be acted on.
    expect(readdirSync(join(root, ".processes", "w1"))).toEqual([]);
  });

  it("leaves what another worker sharing the work directory recorded", async () => {
    const root = await scratch();
    const other = createProcessRegistry(root, "w2");
    const theirs = workDirectory(root, "01b3.1");
    other.addDirectory(theirs);
    expect(createProcessRegistry(root, "w1").sweep()).toEqual({
      groups: 0,
      directories: 0,
    });
    expect(existsSync(theirs)).toBe(true);
  });

  it("kills the recorded process groups still alive, then removes the directories", async () => {
    const root = await scratch();
    const earlier = createProcessRegistry(root, "w1");
    const dir = workDirectory(root, "01c4.1");
    // A group leader of its own, as the agent starts commands and containers.
    const child = spawn("sleep", ["300"], { detached: true, stdio: "ignore" });
    const exited = new Promise((resolve) => child.once("exit", (_code, signal) => resolve(signal)));
    earlier.add(child.pid as number, "sleep 300");
    earlier.addDirectory(dir);
    expect(createProcessRegistry(root, "w1").sweep()).toEqual({
      groups: 1,
      directories: 1,
    });
    expect(await exited).toBe("SIGKILL");
    expect(existsSync(dir)).toBe(false);
  });

  it("lets one live agent at a time claim a worker's records in a work directory", async () => {
    const root = await scratch();
    expect(claimWorkDir(root, "w1")).toBeUndefined();
    // This process again (the same agent): still its own.
    expect(claimWorkDir(root, "w1")).toBeUndefined();
    // Another live process recorded as the agent of w1: refused, and its record kept.
    const child = spawn("sleep", ["300"], { stdio: "ignore" });
    const stopped = new Promise((resolve) => child.once("exit", resolve));
    const pid = child.pid as number;
    const record = join(root, ".processes", "w1.agent");
    writeFileSync(record, JSON.stringify({ pid, started: startOf(pid) }));
    expect(claimWorkDir(root, "w1")).toBe(pid);
    expect(claimWorkDir(root, "w2")).toBeUndefined();
    child.kill("SIGKILL");
    await stopped;
    // Gone: the next agent claims it. So does it after an agent killed but never reaped.
    const zombie = await makeZombie();
    const parent = zombie.parent;
    writeFileSync(record, JSON.stringify({ pid: zombie.pid, started: startOf(zombie.pid) }));
    expect(claimWorkDir(root, "w1")).toBeUndefined();
    parent.kill("SIGKILL");
    expect(claimWorkDir(root, "w1")).toBeUndefined();
    expect(JSON.parse(readFileSync(record, "utf8")).pid).toBe(process.pid);
  });

  it.runIf(process.getuid?.() === 0)("refuses a work directory that belongs to another user", async () => {
    const root = await scratch();
    const theirs = join(root, "theirs");
    mkdirSync(theirs);
    chownSync(theirs, 65534, 65534);
    expect(() => ownWorkDir(theirs)).toThrow(/belongs to another user \(uid 65534\)/);
    expect(() => ownWorkDir(join(root, "mine"))).not.toThrow();
  });
});
