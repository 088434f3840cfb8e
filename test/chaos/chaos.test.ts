import { describe, expect, it } from "vitest";
import { runsPostgresTests } from "../helpers/database.js";
import { runChaos } from "./run.js";

/** The CI run's seed: fixed, so a failure reproduces; CHAOS_SEED picks another. */
const SEED = Number(process.env.CHAOS_SEED ?? 20261203);

// Real processes, a real PostgreSQL (its own: this run stops and starts it), real TCP. It needs no
// shared database: CI runs it once, in its PostgreSQL pass (see runsPostgresTests).
describe.runIf(runsPostgresTests())("the chaos run, short and seeded", () => {
  it("keeps every lease rule through cuts, stalls, refusals, kill -9 of agents and servers, and PostgreSQL outages", async () => {
    const result = await runChaos({ seed: SEED, durationMs: 70_000, actions: 450 });
    // The summary (seed, faults, expiries) shows in the test output either way.
    console.log(result.summary);
    expect(result.violations, result.summary).toEqual([]);
  }, 300_000);
});
