import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { makeDirectories } from "../../src/make-directories.js";

describe("makeDirectories", () => {
  const root = mkdtempSync(join(tmpdir(), "leasehold-mkdirs-"));
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it("makes every missing directory, with the mode, and says whether it made the last", () => {
    const deep = join(root, "a", "b", "c");
    expect(makeDirectories(deep, 0o700)).toBe(true);
    expect(statSync(deep).isDirectory()).toBe(true);
    expect(statSync(join(root, "a")).mode & 0o777).toBe(0o700);
    expect(makeDirectories(deep, 0o700)).toBe(false);
  });

  it("refuses a path through a file", () => {
    const file = join(root, "file");
    writeFileSync(file, "");
    expect(() => makeDirectories(file)).toThrow(expect.objectContaining({ code: "ENOTDIR" }));
    expect(() => makeDirectories(join(file, "below"))).toThrow(expect.objectContaining({ code: "ENOTDIR" }));
  });

  it.runIf(existsSync("/proc/self"))(
    "answers ENOENT where the parent takes no new directory (Node's loops)",
    () => {
      expect(() => makeDirectories("/proc/nope/deeper")).toThrow(expect.objectContaining({ code: "ENOENT" }));
    },
  );
});
