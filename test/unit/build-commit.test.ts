import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { checkoutCommit, UNKNOWN_COMMIT } from "../../src/version.js";

const git = (cwd: string, ...args: string[]) =>
  execFileSync("git", args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();

/** What `npm run build` records as the build's commit, on checkouts made here. */
describe("the commit of a build", () => {
  let dir: string;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-commit-"));
  });
  afterEach(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  /** A repository in `root` with one commit of `file`. */
  const checkout = (root: string) => {
    mkdirSync(root, { recursive: true });
    git(root, "init", "-q");
    writeFileSync(join(root, "file.txt"), "one\n");
    git(root, "add", "file.txt");
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one");
    return git(root, "rev-parse", "--short", "HEAD");
  };

  it("is the checkout's short commit, with -dirty once a tracked file differs, not for untracked ones", () => {
    const head = checkout(dir);
    expect(head).toMatch(/^[0-9a-f]{7,}$/);
    writeFileSync(join(dir, "untracked.txt"), "new\n");
    expect(checkoutCommit(dir)).toBe(head);
    writeFileSync(join(dir, "file.txt"), "two\n");
    expect(checkoutCommit(dir)).toBe(`${head}-dirty`);
  });

  it("is unknown outside a checkout, and for a package inside another repository", () => {
    expect(checkoutCommit(dir)).toBe(UNKNOWN_COMMIT);
    checkout(dir);
    const unpacked = join(dir, "node_modules", "leasehold");
    mkdirSync(unpacked, { recursive: true });
    expect(checkoutCommit(unpacked)).toBe(UNKNOWN_COMMIT);
  });
});
