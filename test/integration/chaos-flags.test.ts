import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { runsDriverNeutralTests } from "../helpers/database.js";

const RUN = fileURLToPath(new URL("../chaos/run.ts", import.meta.url));

/**
 * `npm run chaos` says how to run it for --help, and refuses a flag it does
 * not know or a value it cannot use with exit 2, before it starts anything
 * (as the benchmark scripts do). A run that started would outlast the 30 s
 * each call is given here.
 */
describe.runIf(runsDriverNeutralTests())("the chaos run's flags", { timeout: 120_000 }, () => {
  const chaos = (args: string[]) =>
    new Promise<{ code: number | string; stdout: string; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        ["--import", "tsx", RUN, ...args],
        { timeout: 30_000, killSignal: "SIGKILL" },
        (error, stdout, stderr) => {
          const e = error as { code?: number; signal?: string } | null;
          resolve({ code: e ? (e.code ?? e.signal ?? -1) : 0, stdout, stderr });
        },
      );
    });

  it("--help prints how to run it, every flag included, and runs nothing", async () => {
    const help = await chaos(["--help"]);
    expect(help).toMatchObject({ code: 0, stderr: "" });
    for (const flag of ["--seed", "--duration", "--actions", "--agents", "--keep", "--check"])
      expect(help.stdout).toContain(flag);
  });

  it.each([
    [["--bogus"], "Unknown option '--bogus'"],
    [["--seed", "abc"], '--seed: expected a whole number from 0 to 4294967295, not "abc"'],
    [["--agents", "0"], "--agents: expected a whole number from 1 to"],
    [["--actions", "1.5"], "--actions: expected a whole number from 1 to"],
    [["--duration", "soon"], "--duration: must be a duration like"],
  ])("%j exits 2 saying what is wrong", async (args, says) => {
    const result = await chaos(args);
    expect(result).toMatchObject({ code: 2, stdout: "" });
    expect(result.stderr.slice(0, says.length)).toBe(says);
    expect(result.stderr).toMatch(/\n\(--help says how to run the chaos run\)\n$/);
  });
});
