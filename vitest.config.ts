import { availableParallelism } from "node:os";
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Starts an embedded PostgreSQL when DATABASE_URL is unset (see the file).
    globalSetup: ["test/global-setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Real servers, streams and child processes: forks isolate them best.
    pool: "forks",
    // Most test files spend their time waiting on servers, streams and grace periods, so two
    // files at a time pay even on two cores (vitest's default there is one): about a fifth off
    // the suite's wall time, measured on PGlite and PostgreSQL.
    maxWorkers: Math.max(2, availableParallelism() - 1),
  },
});
