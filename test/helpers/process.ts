import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const BIN = fileURLToPath(new URL("../../bin/leasehold.js", import.meta.url));

/** A `leasehold` child process with its JSON log lines. */
/**
 * Runs `leasehold <args>` to completion, with `stdin` as its input and
 * without any LEASEHOLD_* variable of the caller: its exit code and output.
 */
export function runCli(
  args: string[],
  stdin = "",
): Promise<{ code: number; stdout: string; stderr: string }> {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("LEASEHOLD_")));
  return new Promise((resolve) => {
    const child = execFile(
      process.execPath,
      [BIN, ...args],
      { env, maxBuffer: 64 * 1024 * 1024 },
      (error, stdout, stderr) =>
        resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
    child.stdin?.end(stdin);
  });
}

export interface LeaseholdProcess {
  readonly child: ChildProcess;
  /** Every log line so far, parsed. */
  readonly logs: Record<string, unknown>[];
  /** Resolves with the first log line matching `test` (now or later). */
  waitForLog(test: (line: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
  /** Resolves with the exit code (or signal name). */
  readonly exited: Promise<number | string>;
}

/**
 * Runs `leasehold <args>` with `DATABASE_URL` set to `databaseUrl`, or unset
 * for PGlite: this checkout's bin/leasehold.js, or `options.command` (an
 * installed package's bin) in `options.cwd`.
 */
export function runLeasehold(
  args: string[],
  databaseUrl: string | undefined,
  options: { command?: string; cwd?: string; env?: Record<string, string> } = {},
): LeaseholdProcess {
  const env = { ...process.env, ...options.env };
  delete env.DATABASE_URL;
  if (databaseUrl) env.DATABASE_URL = databaseUrl;
  const [command, argv] = options.command ? [options.command, args] : [process.execPath, [BIN, ...args]];
  const child = spawn(command, argv, { env, cwd: options.cwd, stdio: ["ignore", "pipe", "pipe"] });
  const logs: Record<string, unknown>[] = [];
  // The end of stderr, for the error when it exits unexpectedly.
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString("utf8")).slice(-4000);
  });
  const waiters: {
    test: (l: Record<string, unknown>) => boolean;
    resolve: (l: Record<string, unknown>) => void;
  }[] = [];
  createInterface({ input: child.stdout as NodeJS.ReadableStream }).on("line", (text) => {
    let line: Record<string, unknown>;
    try {
      line = JSON.parse(text);
    } catch {
      line = { msg: text };
    }
    logs.push(line);
    for (const w of [...waiters]) {
      if (w.test(line)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(line);
      }
    }
  });
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? -1)),
  );
  return {
    child,
    logs,
    exited,
    waitForLog(test) {
      const found = logs.find(test);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        waiters.push({ test, resolve });
        exited.then((code) =>
          reject(new Error(`leasehold exited (${code}) before the expected log line; stderr:\n${stderr}`)),
        );
      });
    },
  };
}

/** A fixture agent process (test/fixtures/raw-agent.ts) with its JSON output lines. */
export interface AgentProcess {
  readonly child: ChildProcess;
  readonly lines: Record<string, unknown>[];
  waitForLine(test: (line: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
}

const RAW_AGENT = fileURLToPath(new URL("../fixtures/raw-agent.ts", import.meta.url));

/** Starts the raw fixture agent: `<address> <cluster> <worker-id> <hold|complete>`. */
export function runAgent(args: string[]): AgentProcess {
  return runFixture(RAW_AGENT, args);
}

const SDK_AGENT = fileURLToPath(new URL("../fixtures/sdk-agent.ts", import.meta.url));

/** Starts the SDK fixture agent: `<addresses,...> <cluster> <worker-id> [slots]`. */
export function runSdkAgent(args: string[]): AgentProcess {
  return runFixture(SDK_AGENT, args);
}

const SDK_COMMAND_AGENT = fileURLToPath(new URL("../fixtures/sdk-command-agent.ts", import.meta.url));

/** Starts the SDK fixture agent that runs commands under a fence keeper: `<address> <cluster> <worker-id> <work-dir>`. */
export function runSdkCommandAgent(args: string[]): AgentProcess {
  return runFixture(SDK_COMMAND_AGENT, args);
}

function runFixture(file: string, args: string[]): AgentProcess {
  const child = spawn(process.execPath, ["--import", "tsx", file, ...args], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const { lines, waitFor } = collectLines(child);
  return { child, lines, waitForLine: waitFor };
}

/**
 * The stdout lines of a child process (parsed as JSON, or `{ text }` when not
 * JSON), with `waitFor`, which resolves with the first line matching `test`,
 * now or later, and rejects if the process exits first.
 */
export function collectLines(
  child: ChildProcess,
  from: "stdout" | "stderr" = "stdout",
): {
  lines: Record<string, unknown>[];
  waitFor(test: (line: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
} {
  const lines: Record<string, unknown>[] = [];
  const waiters = new Set<() => void>();
  createInterface({ input: child[from] as NodeJS.ReadableStream }).on("line", (text) => {
    let line: Record<string, unknown>;
    try {
      line = JSON.parse(text);
    } catch {
      line = { text };
    }
    lines.push(line);
    for (const w of [...waiters]) w();
  });
  return {
    lines,
    waitFor(test) {
      return new Promise((resolve, reject) => {
        const look = () => {
          const found = lines.find(test);
          if (found) {
            waiters.delete(look);
            resolve(found);
          }
        };
        waiters.add(look);
        child.once("exit", (code) => {
          waiters.delete(look);
          reject(new Error(`process exited (${code}) before the expected line`));
        });
        look();
      });
    },
  };
}

/**
 * Runs the reference agent (`leasehold agent`) with JSON event lines,
 * `slots` slots, its deployments under `workDir`, `allow` as its command
 * flags and `clientFlags` (TLS, tokens) before the subcommand, and waits
 * until it is connected.
 */
export async function runReferenceAgent(options: {
  server: string;
  cluster: string;
  workerId: string;
  workDir: string;
  slots?: number;
  /** The agent's command flags; default `--allow-any-command`. */
  allow?: readonly string[];
  /** Global client flags placed before `agent`, e.g. `--tls-ca`, `--tls-cert`, `--tls-key`. */
  clientFlags?: readonly string[];
}): Promise<LeaseholdProcess> {
  const agent = runLeasehold(
    [
      "--server",
      options.server,
      "--json",
      ...(options.clientFlags ?? []),
      "agent",
      "--cluster",
      options.cluster,
      "--worker-id",
      options.workerId,
      "--capacity",
      String(options.slots ?? 4),
      "--work-dir",
      options.workDir,
      ...(options.allow ?? ["--allow-any-command"]),
    ],
    undefined,
  );
  await agent.waitForLog((l) => l.type === "connected");
  return agent;
}
