import { readFileSync } from "node:fs";

let version: string | undefined;

/**
 * The version in the package's own package.json, read once: this file runs
 * as src/version.ts (tests, tsx) and as dist/version.js, both one level
 * below the package root.
 */
export function packageVersion(): string {
  version ??= (
    JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string }
  ).version;
  return version;
}
