import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import type { LeaseholdError } from "../../src/errors.js";
import { lockDataDir } from "../../src/store/data-dir-lock.js";
import { makeZombie } from "../helpers/zombie.js";

describe("the data directory's lock", () => {
  const dirs: string[] = [];
  afterEach(() => {
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });
  const fresh = () => {
    const d = mkdtempSync(join(tmpdir(), "leasehold-lock-"));
    dirs.push(d);
    return d;
  };
  const refusal = (dir: string) => {
    try {
      lockDataDir(dir)();
      return undefined;
    } catch (error) {
      return error as LeaseholdError;
    }
  };

  it("writes its pid and start time, and removes the file on unlock", () => {
    const dir = fresh();
    const unlock = lockDataDir(dir);
    const [pid, started] = readFileSync(join(dir, "leasehold.pid"), "utf8").split(" ");
    expect(Number(pid)).toBe(process.pid);
    expect(started).toMatch(/^\d+$/);
    unlock();
    expect(() => readFileSync(join(dir, "leasehold.pid"))).toThrow(/ENOENT/);
  });

  it("refuses a directory a live process holds", async () => {
    const dir = fresh();
    const child = spawn("sleep", ["30"]);
    try {
      const started = readFileSync(`/proc/${child.pid}/stat`, "utf8").split(") ")[1]?.split(" ")[19];
      writeFileSync(join(dir, "leasehold.pid"), `${child.pid} ${started}`);
      expect(refusal(dir)?.message).toMatch(new RegExp(`is in use by process ${child.pid}; stop it`));
    } finally {
      child.kill("SIGKILL");
    }
  });

  it("takes over the file of a process that is gone, a zombie, or another process with its pid", async () => {
    const dir = fresh();
    // Gone.
    writeFileSync(join(dir, "leasehold.pid"), "999999999 1");
    expect(refusal(dir)).toBeUndefined();
    // A live pid (1, init) that started at another time: the pid was given to another process.
    writeFileSync(join(dir, "leasehold.pid"), "1 123");
    expect(refusal(dir)).toBeUndefined();
    // A zombie: killed, and its parent (which never waits) has not reaped it.
    const zombie = await makeZombie();
    try {
      writeFileSync(join(dir, "leasehold.pid"), `${zombie.pid} ${zombie.started}`);
      expect(refusal(dir)).toBeUndefined();
    } finally {
      zombie.parent.kill("SIGKILL");
    }
  });

  it("takes a stale file over only under the takeover mutex, and clears a mutex left by a dead process", () => {
    const dir = fresh();
    const file = join(dir, "leasehold.pid");
    writeFileSync(file, "999999999 1");
    // Another process is taking it over right now: this one waits for it (2 s), then gives up
    // rather than remove a file the other may have just written.
    mkdirSync(`${file}.takeover`);
    const started = performance.now();
    expect(refusal(dir)?.message).toBe(`could not lock data directory ${dir}; retry`);
    expect(performance.now() - started).toBeGreaterThanOrEqual(1500);
    expect(readFileSync(file, "utf8")).toBe("999999999 1");
    // A mutex untouched for longer than a takeover takes was left by a process that died in it.
    const old = new Date(Date.now() - 60_000);
    utimesSync(`${file}.takeover`, old, old);
    expect(refusal(dir)).toBeUndefined();
  });

  it("names --data-dir when it is a file or holds something else", () => {
    const dir = fresh();
    writeFileSync(join(dir, "a-file"), "x");
    expect(refusal(join(dir, "a-file"))?.message).toBe(
      `--data-dir ${join(dir, "a-file")} is not a directory`,
    );
    mkdirSync(join(dir, "notes"));
    writeFileSync(join(dir, "notes", "todo.txt"), "x");
    expect(refusal(join(dir, "notes"))?.message).toMatch(
      /holds files that are not a Leasehold database \(todo\.txt\); give an empty or new directory/,
    );
  });
});
