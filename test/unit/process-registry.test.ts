import { spawn } from "node:child_process";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { createProcessRegistry } from "../../src/agent/process-registry.js";

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
    const earlier = createProcessRegistry(join(root, ".processes", "w1"));
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

    const next = createProcessRegistry(join(root, ".processes", "w1"));
    expect(next.sweep()).toEqual({ groups: 0, directories: 1 });
    expect(existsSync(left)).toBe(false);
    expect(existsSync(unrecorded)).toBe(true);
    // Forgotten once removed: a second sweep finds nothing.
    expect(next.sweep()).toEqual({ groups: 0, directories: 0 });
  });

  it("leaves what another worker sharing the work directory recorded", async () => {
    const root = await scratch();
    const other = createProcessRegistry(join(root, ".processes", "w2"));
    const theirs = workDirectory(root, "01b3.1");
    other.addDirectory(theirs);
    expect(createProcessRegistry(join(root, ".processes", "w1")).sweep()).toEqual({
      groups: 0,
      directories: 0,
    });
    expect(existsSync(theirs)).toBe(true);
  });

  it("kills the recorded process groups still alive, then removes the directories", async () => {
    const root = await scratch();
    const earlier = createProcessRegistry(join(root, ".processes", "w1"));
    const dir = workDirectory(root, "01c4.1");
    // A group leader of its own, as the agent starts commands and containers.
    const child = spawn("sleep", ["300"], { detached: true, stdio: "ignore" });
    const exited = new Promise((resolve) => child.once("exit", (_code, signal) => resolve(signal)));
    earlier.add(child.pid as number, "sleep 300");
    earlier.addDirectory(dir);
    expect(createProcessRegistry(join(root, ".processes", "w1")).sweep()).toEqual({
      groups: 1,
      directories: 1,
    });
    expect(await exited).toBe("SIGKILL");
    expect(existsSync(dir)).toBe(false);
  });
});
