import { availableParallelism } from "node:os";
import { defineConfig } from "vitest/config";
import { BaseSequencer, type TestSpecification } from "vitest/node";

/**
 * The files that take 15 s or more in a CI pass, longest first (the larger of their PGlite and
 * PostgreSQL times at 67c54d5), started before the others. Without a list vitest runs larger files
 * first, which on a clean clone put the 50 s multi-process and 45 s cli files last in the
 * PostgreSQL pass, one worker running them alone at the end: about 35 s of each pass's wall time.
 * A file missing from the list only runs later; keep it roughly current when a file grows.
 */
const LONGEST = [
  "test/chaos/chaos.test.ts",
  "test/interop/python-agent.test.ts",
  "test/integration/work-leases.test.ts",
  "test/integration/multi-process.test.ts",
  "test/integration/cli.test.ts",
  "test/integration/walkthrough.test.ts",
  "test/integration/lease-run.test.ts",
  "test/integration/agent-fence.test.ts",
  "test/integration/agent-database-unreachable.test.ts",
  "test/integration/agent-sdk.test.ts",
  "test/integration/scope-leases.test.ts",
  "test/integration/console-browser.test.ts",
  "test/integration/database-back-acks.test.ts",
  "test/integration/bench-flags.test.ts",
  "test/integration/lease-upkeep.test.ts",
  "test/integration/agent-fencing.test.ts",
  "test/integration/deployments.test.ts",
  "test/integration/flow-control.test.ts",
  "test/integration/cli-usage.test.ts",
];

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
