import { execFileSync } from "node:child_process";
import { readFileSync, realpathSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** The package's root: this file runs as src/version.ts (tests, tsx) and as dist/version.js, both one level below. */
const PACKAGE_ROOT = fileURLToPath(new URL("..", import.meta.url));

/** What `npm run build` records next to the compiled files (dist/build-info.json). */
const BUILD_INFO = new URL("./build-info.json", import.meta.url);

/** The commit of a build made without git, or outside a checkout of its own. */
export const UNKNOWN_COMMIT = "unknown";

let version: string | undefined;
let commit: string | undefined;

/** The version in the package's own package.json, read once. It is the same in every build of a release. */
export function packageVersion(): string {
  version ??= (
    JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string }
  ).version;
  return version;
}

/**
 * The commit this build was made from, which tells builds of one version
 * apart: `9050c2b`, `9050c2b-dirty` when tracked files differed from it, or
 * {@link UNKNOWN_COMMIT}. `npm run build` records it in dist/build-info.json;
 * without that file (running from src/ with tsx, as tests do) it is the
 * checkout's commit now.
 */
export function buildCommit(): string {
  commit ??= recordedCommit() ?? checkoutCommit(PACKAGE_ROOT);
  return commit;
}

/** `0.1.0 (commit 9050c2b)`: what `leasehold --version` prints. */
export function versionText(): string {
  return `${packageVersion()} (commit ${buildCommit()})`;
}

function recordedCommit(): string | undefined {
  try {
    const recorded = (JSON.parse(readFileSync(BUILD_INFO, "utf8")) as { commit?: unknown }).commit;
    return typeof recorded === "string" && recorded ? recorded : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The commit checked out at `root`: `git rev-parse --short HEAD`, with
 * `-dirty` when a tracked file differs from it (untracked files are not
 * looked at). {@link UNKNOWN_COMMIT} without git, outside a checkout, or when
 * `root` is not the checkout's top (a package unpacked inside some other
 * repository would otherwise take that repository's commit).
 */
export function checkoutCommit(root: string): string {
  const git = (...args: string[]) =>
    // --no-optional-locks: `git status` would otherwise refresh the index under index.lock, in the
    // way of the developer's own git commands while tests start many processes from src.
    execFileSync("git", ["--no-optional-locks", ...args], {
      cwd: root,
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    }).trim();
  try {
    if (realpathSync(git("rev-parse", "--show-toplevel")) !== realpathSync(root)) return UNKNOWN_COMMIT;
    const head = git("rev-parse", "--short", "HEAD");
    return git("status", "--porcelain", "--untracked-files=no") ? `${head}-dirty` : head;
  } catch {
    return UNKNOWN_COMMIT;
  }
}

/**
 * Writes dist/build-info.json with the checkout's commit: the last step of
 * `npm run build`, run as dist/version.js.
 */
export function recordBuild(): void {
  writeFileSync(BUILD_INFO, `${JSON.stringify({ commit: checkoutCommit(PACKAGE_ROOT) })}\n`);
}
