import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runsDriverNeutralTests } from "../helpers/database.js";

const BENCH = fileURLToPath(new URL("../../bench", import.meta.url));

/**
 * The benchmark scripts refuse a flag they cannot use, as bench/README.md
 * says: exit 2 with a message naming it, before they start a server or make
 * a temporary directory. Each script runs as a user runs it, with tsx.
 */
describe.runIf(runsDriverNeutralTests())("benchmark scripts", { timeout: 120_000 }, () => {
  let tmp: string;
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), "leasehold-bench-flags-"));
  });
  afterAll(() => {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  /** Runs `bench/<script> <args>` with its own TMPDIR; a script still running after 60 s is killed (a hang). */
  const bench = (script: string, args: string[]) =>
    new Promise<{ code: number | string; stdout: string; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        ["--import", "tsx", join(BENCH, script), ...args],
        { env: { ...process.env, TMPDIR: tmp }, timeout: 60_000, killSignal: "SIGKILL" },
        (error, stdout, stderr) => {
          const e = error as { code?: number; signal?: string } | null;
          resolve({ code: e ? (e.code ?? e.signal ?? -1) : 0, stdout, stderr });
        },
      );
    });
  const database = ["--database-url", "postgres://bench@127.0.0.1:1/nowhere"];

  it.each([
    ["actions-e2e.ts", ["--actions", "abc"], "--actions: expected a whole number of at least 1"],
    ["actions-e2e.ts", ["--agents", "0"], "--agents: expected a whole number of at least 1"],
    ["actions-e2e.ts", ["--slots", "1.5"], "--slots: expected a whole number of at least 1"],
    ["actions-e2e.ts", ["--watchers", "some"], "--watchers: expected a whole number of at least 0"],
    ["actions-e2e.ts", ["--auth", "foo"], "--auth: expected one of none, tls, mtls, token"],
    ["actions-e2e.ts", ["--watchers", "1", "--auth", "tls"], "--watchers: only with --auth none"],
    ["heartbeats.ts", ["--connections", "many"], "--connections: expected a whole number of at least 1"],
    ["heartbeats.ts", ["--client", "curl"], "--client: expected one of raw, grpc"],
    ["heartbeats.ts", ["--flood", "lots"], "--flood: expected a whole number of at least 0"],
    ["flood.ts", ["--clients", "4"], "--target is required (host:port of the server)"],
    [
      "flood.ts",
      ["--target", "127.0.0.1:1", "--fields", "many"],
      "--fields: expected a whole number of at least 0",
    ],
    ["non-reading-worker.ts", ["--seconds", "abc"], "--seconds: expected a whole number of at least 1"],
    ["non-reading-worker.ts", ["--grace-period", "soon"], "--grace-period: must be a duration"],
    ["restart.ts", [...database, "--sessions", "1e3x"], "--sessions: expected a whole number of at least 1"],
    ["restart.ts", [...database, "--max-wait", "soon"], "--max-wait: must be a duration"],
    ["startup.ts", ["--runs", "0"], "--runs: expected a whole number of at least 1"],
  ])(
    "bench/%s %j exits 2 saying what is wrong, leaving no temporary directory",
    async (script, args, says) => {
      const result = await bench(script, args);
      expect(result).toMatchObject({ code: 2, stdout: "" });
      expect(result.stderr.slice(0, says.length)).toBe(says);
      expect(result.stderr).toMatch(/\n\(--help says how to run this benchmark\)\n$/);
      expect(readdirSync(tmp).filter((name) => name.startsWith("leasehold-"))).toEqual([]);
    },
  );

  it("actions-e2e --help lists every flag it takes", async () => {
    const help = await bench("actions-e2e.ts", ["--help"]);
    expect(help.code).toBe(0);
    for (const flag of [
      "--actions",
      "--agents",
      "--slots",
      "--database-url",
      "--auth",
      "--bulk",
      "--watchers",
    ])
      expect(help.stdout).toContain(flag);
  });
});
