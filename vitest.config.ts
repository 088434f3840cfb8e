import { availableParallelism } from "node:os";
import { defineConfig } from "vitest/config";
import { BaseSequencer, type TestSpecification } from "vitest/node";

/**
 * Files that take a minute or more on their own, started before the others: vitest runs larger
 * files first, and these are small, so one worker was left running one of them alone at the end
 * (the chaos run's 80 s in the PostgreSQL run of CI).
 */
const LONGEST = ["test/chaos/chaos.test.ts", "test/integration/walkthrough.test.ts"];

class LongestFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const rank = (file: TestSpecification) => {
      const i = LONGEST.findIndex((path) => file.moduleId.endsWith(path));
      return i === -1 ? LONGEST.length : i;
    };
    // Array sort is stable: the rest keep vitest's order.
    return (await super.sort(files)).sort((a, b) => rank(a) - rank(b));
  }
}

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Starts an embedded PostgreSQL when DATABASE_URL is unset (see the file).
    globalSetup: ["test/global-setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    // Real servers, streams and child processes: forks isolate them best.
    pool: "forks",
    // Each worker process runs file after file instead of a fresh process each: every file
    // imported the server anew, about half a second of CPU each, 16 % of a CI run. Test files
    // must then leave nothing behind in the process (timers, servers, patched globals).
    isolate: false,
    // Most test files spend their time waiting on servers, streams and grace periods, so two
    // files at a time pay even on two cores (vitest's default there is one): about a fifth off
    // the suite's wall time, measured on PGlite and PostgreSQL.
    maxWorkers: Math.max(2, availableParallelism() - 1),
    sequence: { sequencer: LongestFirst },
  },
});
