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
  },
});
