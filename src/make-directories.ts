import { mkdirSync, statSync } from "node:fs";
import { dirname, resolve } from "node:path";

/**
 * Makes `path` and the directories above it that are missing, one `mkdir`
 * at a time; says whether it made `path` itself (false: it was there).
 *
 * Node's own `mkdirSync(path, { recursive: true })` loops forever, a core
 * busy, when a parent exists but `mkdir` in it answers ENOENT, as under
 * /proc (`--work-dir /proc/nope`). Here that error reaches the caller. A
 * `path` that exists and is not a directory throws ENOTDIR.
 */
export function makeDirectories(path: string, mode?: number): boolean {
  const missing: string[] = [];
  for (let at = resolve(path); ; at = dirname(at)) {
    const found = statOrMissing(at);
    if (found === "directory") break;
    if (found === "other")
      throw Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${at}'`), {
        code: "ENOTDIR",
        path: at,
      });
    missing.push(at);
    // The root always exists: this stops only a path that claims otherwise.
    if (dirname(at) === at) break;
  }
  for (const dir of missing.reverse()) {
    try {
      mkdirSync(dir, { mode });
    } catch (error) {
      // Made meanwhile by someone else: as good.
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    }
  }
  return missing.length > 0;
}

function statOrMissing(path: string): "directory" | "other" | "missing" {
  try {
    return statSync(path).isDirectory() ? "directory" : "other";
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return "missing";
    throw error;
  }
}
