import { describe, expect, inject, it } from "vitest";
import { runChaos } from "./run.js";

/** The CI run's seed: fixed, so a failure reproduces; CHAOS_SEED picks another. */
const SEED = Number(process.env.CHAOS_SEED ?? 20261203);

// Real processes, a real PostgreSQL (its own: this run stops and starts it), real TCP. It needs no
// shared database, so it runs once per CI run: in the run against PostgreSQL (DATABASE_URL set),
// and is skipped in the PGlite run.
describe.runIf(inject("driver") === "postgres")(
  "the chaos run, short and seeded (PostgreSQL run only)",
  () => {
    it("keeps every lease rule through cuts, stalls, refusals, kill -9 of agents and servers, and PostgreSQL outages", async () => {
      const result = await runChaos({ seed: SEED, durationMs: 70_000, actions: 450 });
      // The summary (seed, faults, expiries) shows in the test output either way.
      console.log(result.summary);
      expect(result.violations, result.summary).toEqual([]);
    }, 300_000);
  },
);
