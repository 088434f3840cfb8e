import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Code, LeaseholdError } from "../errors.js";

/**
 * PGlite is one embedded PostgreSQL in one process: two processes opening the
 * same data directory would corrupt it. A pid file guards it; a pid file left
 * by a process that no longer exists is taken over.
 */
export function lockDataDir(dataDir: string): () => void {
  const file = join(dataDir, "leasehold.pid");
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(file, String(process.pid), { flag: "wx" });
      return () => rmSync(file, { force: true });
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      const owner = Number(readFileSync(file, "utf8"));
      if (owner !== process.pid && isAlive(owner)) {
        throw new LeaseholdError(
          Code.FailedPrecondition,
          `data directory ${dataDir} is in use by process ${owner}; stop it, or use another --data-dir ` +
            "(several servers need PostgreSQL: --database-url)",
          { reason: "DATA_DIR_LOCKED" },
        );
      }
      rmSync(file, { force: true });
    }
  }
  throw new LeaseholdError(Code.Aborted, `could not lock data directory ${dataDir}; retry`);
}

function isAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    // EPERM: it exists but belongs to someone else.
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}
