/**
 * How long `leasehold` takes to start: `serve` from the spawn to its
 * `leasehold serving` log line, and CLI commands from the spawn to their exit.
 *
 *   npm run build && node --import tsx bench/startup.ts [--runs 10] [--database-url URL]
 *
 * Runs bin/leasehold.js, the compiled dist/ a user runs. Each figure is over
 * `--runs` processes started one after another: `serve` on an existing PGlite
 * directory, on a fresh one (initdb and every migration), on `memory://`, and
 * on PostgreSQL when `--database-url` is given; then `--help` and
 * `workers list` against the last server. Prints one JSON line of medians
 * and maxima, in milliseconds.
 */
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { freePort } from "../test/helpers/ports.js";
import { benchArgs, wholeNumberFlag } from "./args.js";

const { values } = benchArgs(import.meta.url, {
  options: {
    runs: { type: "string", default: "10" },
    "database-url": { type: "string" },
  },
});
const runs = wholeNumberFlag("--runs", values.runs);
const BIN = join(import.meta.dirname, "..", "bin", "leasehold.js");
const dir = mkdtempSync(join(tmpdir(), "leasehold-startup-"));

/** Starts `serve`, resolves with the ms to `leasehold serving`; leaves it running for `then`. */
async function serveOnce(args: string[], then?: (address: string) => Promise<void>): Promise<number> {
  const port = await freePort();
  const started = performance.now();
  const child = spawn(
    process.execPath,
    [BIN, "serve", "--listen", `127.0.0.1:${port}`, "--metrics-listen", "off", ...args],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  try {
    const ms = await new Promise<number>((resolve, reject) => {
      child.once("exit", (code) => reject(new Error(`serve exited (${code}) before serving`)));
      createInterface({ input: child.stdout }).on("line", (line) => {
        if (line.includes('"leasehold serving"')) resolve(performance.now() - started);
      });
    });
    await then?.(`127.0.0.1:${port}`);
    return ms;
  } finally {
    child.kill("SIGTERM");
    await exited;
  }
}

/** Ms from the spawn of `leasehold <args>` to its exit (which must be 0). */
function commandOnce(args: string[]): Promise<number> {
  const started = performance.now();
  return new Promise((resolve, reject) =>
    execFile(process.execPath, [BIN, ...args], (error) =>
      error ? reject(error) : resolve(performance.now() - started),
    ),
  );
}

async function repeat(fn: (i: number) => Promise<number>): Promise<{ medianMs: number; maxMs: number }> {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) times.push(await fn(i));
  times.sort((a, b) => a - b);
  return {
    medianMs: Math.round(times[Math.floor((times.length - 1) / 2)] as number),
    maxMs: Math.round(times.at(-1) as number),
  };
}

const result: Record<string, unknown> = { runs };
try {
  const existing = join(dir, "existing");
  await serveOnce(["--data-dir", existing]); // creates it
  result.servePgliteExisting = await repeat(() => serveOnce(["--data-dir", existing]));
  result.servePgliteFresh = await repeat((i) => serveOnce(["--data-dir", join(dir, `fresh-${i}`)]));
  result.servePgliteMemory = await repeat(() => serveOnce(["--data-dir", "memory://"]));
  const url = values["database-url"];
  if (url) result.servePostgres = await repeat(() => serveOnce(["--database-url", url]));
  await serveOnce(["--data-dir", existing], async (address) => {
    result.help = await repeat(() => commandOnce(["--help"]));
    result.workersList = await repeat(() => commandOnce(["--server", address, "workers", "list"]));
  });
} finally {
  rmSync(dir, { recursive: true, force: true });
}
console.log(JSON.stringify(result));
