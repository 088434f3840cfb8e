import { spawn } from "node:child_process";
import type { JsonObject } from "../work/action.js";
import { type ActionContext, ActionFailure, LeaseLost } from "./agent.js";
import { type CommandAllowList, type CommandPolicy, requireAllowedCommand } from "./command-policy.js";
import type { keptBy, startFenceKeeper } from "./fence-keeper.js";
import type { createProcessRegistry, ProcessRegistry } from "./process-registry.js";

/** The payload the reference agent runs: a command. */
export interface CommandPayload {
  /**
   * Program and arguments; a bare argv[0] is looked up in PATH (under an
   * allow-list, the agent's own PATH: see {@link CommandPolicy}).
   */
  readonly argv: readonly string[];
  /** Extra environment variables. */
  readonly env: Readonly<Record<string, string>>;
  /** Working directory; default the agent's. */
  readonly cwd: string | undefined;
  /** Seconds before the command is killed and the action fails (retryable). Default: none. */
  readonly timeoutSeconds: number | undefined;
  /** Whether a non-zero exit may be retried. Default true. */
  readonly retryable: boolean;
}

/** Bytes of stdout and stderr kept for the result. */
const TAIL_BYTES = 4096;
/** How long a killed command gets between SIGTERM and SIGKILL. */
const KILL_GRACE_MS = 2000;
/** Least time between two progress reports of output. */
const PROGRESS_EVERY_MS = 1000;

/**
 * The longest `timeout` a command may have, in seconds: Node's timers hold at
 * most 2^31 - 1 ms (24.8 days), and a longer one fires at once.
 */
export const MAX_COMMAND_TIMEOUT_SECONDS = Math.floor((2 ** 31 - 1) / 1000);

/** A `timeout` the CLI lets through: whole seconds, 1 to {@link MAX_COMMAND_TIMEOUT_SECONDS}. */
export const isCommandTimeout = (seconds: number): boolean =>
  Number.isInteger(seconds) && seconds >= 1 && seconds <= MAX_COMMAND_TIMEOUT_SECONDS;

/** Validates a payload; the error says which field to fix (and is not retryable). */
export function parseCommandPayload(payload: JsonObject): CommandPayload {
  const fail = (message: string) => new ActionFailure(`payload.${message}`, { retryable: false });
  const { argv, env = {}, cwd, timeout, retryable = true } = payload as Record<string, unknown>;
  if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === "string")) {
    throw fail('argv: must be a non-empty list of strings, e.g. ["make", "test"]');
  }
  if (typeof env !== "object" || env === null || !Object.values(env).every((v) => typeof v === "string")) {
    throw fail("env: must map names to string values");
  }
  if (cwd !== undefined && typeof cwd !== "string") throw fail("cwd: must be a string");
  if (timeout !== undefined && (typeof timeout !== "number" || !(timeout > 0))) {
    throw fail("timeout: must be a positive number of seconds");
  }
  if ((timeout as number) > MAX_COMMAND_TIMEOUT_SECONDS) {
    throw fail(`timeout: must be at most ${MAX_COMMAND_TIMEOUT_SECONDS} seconds (24 days)`);
  }
  if (typeof retryable !== "boolean") throw fail("retryable: must be true or false");
  return {
    argv: argv as string[],
    env: env as Record<string, string>,
    cwd,
    timeoutSeconds: timeout as number | undefined,
    retryable,
  };
}

/** Keeps the last `TAIL_BYTES` of a stream. */
export function tail() {
  let buffer = Buffer.alloc(0);
  return {
    push(chunk: Buffer) {
      buffer = Buffer.concat([buffer, chunk]);
      if (buffer.length > TAIL_BYTES) buffer = buffer.subarray(buffer.length - TAIL_BYTES);
    },
    text: () => buffer.toString("utf8"),
  };
}

/** Why a lease ended without the server waiting for its release: its command is killed at once. */
const LEASE_GONE: ReadonlySet<string> = new Set(["self_fenced", "expired", "superseded"]);

/** Sends `signal` to a whole process group, ignoring one that is already gone. */
export function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // ESRCH: nothing left in the group.
  }
}

/**
 * The reference agent's handler: runs the payload's command in its own
 * process group, reports progress (start, then the latest output line at most
 * once a second), and resolves with the exit code and the tails of stdout and
 * stderr. The command's environment is the agent's and the payload's `env`,
 * plus `LEASEHOLD_ACTION_ID` and `LEASEHOLD_EPOCH` (set last, so a payload
 * cannot change them): the lease's fencing token, for the command to pass to
 * what it writes to. A non-zero exit or a timeout fails the action. When the lease is
 * revoked, the whole process group is killed (SIGTERM, then SIGKILL) before
 * the handler returns: no orphans while the agent runs. When the lease is gone
 * or about to be (expired, superseded, or the agent self-fenced), SIGKILL at
 * once: the server may already have handed the action to another worker.
 *
 * An agent that is killed (SIGKILL, the OOM killer) or paused (SIGSTOP) stops
 * nothing itself, and its commands would run on beside the next attempt.
 * For the reference agent's guarantee, pass `registry` built with
 * {@link keptBy} over a {@link startFenceKeeper} keeper, and tell the keeper
 * each guarantee (`onGuarantee`): the keeper kills every group at once when
 * the agent dies, and when its guarantee runs out while it is paused (see
 * the README, "Agents: the SDK and the reference agent").
 *
 * A command, environment variable or working directory that `options.allow`
 * does not allow fails the action without running, not retryable (see
 * {@link CommandPolicy}; a bare {@link CommandAllowList} allows no variables
 * and no `cwd`). Under a list, a bare argv[0] runs as the agent's own PATH
 * resolves it. Without `allow`, anything runs: an agent that takes payloads
 * from callers it does not fully trust should always pass a list.
 */
export async function commandHandler(
  ctx: ActionContext,
  options: {
    /**
     * Told of each command's process group (started and gone): a
     * {@link createProcessRegistry} records them for a later agent's sweep,
     * and one wrapped by {@link keptBy} also tells a fence keeper.
     */
    registry?: ProcessRegistry;
    allow?: CommandPolicy | CommandAllowList;
    /** How long a stopped command gets between SIGTERM and SIGKILL (default 2 s). */
    killGraceMs?: number;
  } = {},
): Promise<JsonObject> {
  const command = parseCommandPayload(ctx.payload);
  const { program, args, argv0 } = requireAllowedCommand(command, options.allow ?? "any");
  // An abort listener added to an already aborted signal never fires: a command
  // started now would run with nothing left to stop it.
  if (ctx.signal.aborted) throw ctx.signal.reason;
  const stdout = tail();
  const stderr = tail();
  const child = spawn(program, args, {
    argv0,
    cwd: command.cwd,
    env: {
      ...process.env,
      ...command.env,
      LEASEHOLD_ACTION_ID: ctx.actionId,
      LEASEHOLD_EPOCH: String(ctx.epoch),
    },
    stdio: ["ignore", "pipe", "pipe"],
    detached: true, // its own process group, so the whole tree can be killed
  });
  if (child.pid !== undefined) options.registry?.add(child.pid, `action ${ctx.actionId}`);
  let lastProgress = 0;
  let lastLine = "";
  const onOutput = (sink: ReturnType<typeof tail>) => (chunk: Buffer) => {
    sink.push(chunk);
    const lines = chunk.toString("utf8").trimEnd().split("\n");
    lastLine = lines.at(-1) ?? lastLine;
    if (Date.now() - lastProgress >= PROGRESS_EVERY_MS) {
      lastProgress = Date.now();
      ctx.progress("running", { pid: child.pid ?? 0, line: lastLine.slice(0, 512) });
    }
  };
  child.stdout?.on("data", onOutput(stdout));
  child.stderr?.on("data", onOutput(stderr));

  let stopReason: string | undefined;
  let killTimer: NodeJS.Timeout | undefined;
  const stop = (reason: string, at = options.killGraceMs ?? KILL_GRACE_MS) => {
    if (stopReason !== undefined || child.pid === undefined) return;
    stopReason = reason;
    if (at === 0) {
      killGroup(child.pid, "SIGKILL");
      return;
    }
    killGroup(child.pid, "SIGTERM");
    killTimer = setTimeout(() => child.pid !== undefined && killGroup(child.pid, "SIGKILL"), at);
  };
  const onAbort = () => {
    const why = ctx.signal.reason;
    // The lease is gone, or about to be (the server may hand the action on within the fence's
    // margin): no time for SIGTERM's grace, another worker may run the work now.
    const gone = why instanceof LeaseLost && LEASE_GONE.has(why.reason);
    stop(why instanceof Error ? why.message : "aborted", gone ? 0 : undefined);
  };
  ctx.signal.addEventListener("abort", onAbort);
  const timeout =
    command.timeoutSeconds !== undefined
      ? setTimeout(() => stop(`timed out after ${command.timeoutSeconds}s`), command.timeoutSeconds * 1000)
      : undefined;

  try {
    // Settle when the leader exits, not when its pipes close: a backgrounded
    // grandchild can hold stdout open forever. Whatever the leader left in its
    // group is killed, and the output already written is drained briefly.
    const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>(
      (resolve, reject) => {
        child.once("error", reject);
        child.once("exit", (code, signal) => resolve({ code, signal }));
      },
    ).catch((error: NodeJS.ErrnoException) => {
      throw new ActionFailure(`could not start ${argv0}: ${error.message}`, {
        retryable: error.code !== "ENOENT",
      });
    });
    if (child.pid !== undefined) killGroup(child.pid, "SIGKILL");
    await Promise.race([new Promise((r) => child.once("close", r)), new Promise((r) => setTimeout(r, 500))]);
    child.stdout?.destroy();
    child.stderr?.destroy();
    ctx.progress("exited", { code: exit.code ?? -1 });
    const result: JsonObject = {
      exitCode: exit.code ?? -1,
      ...(exit.signal ? { signal: exit.signal } : {}),
      stdoutTail: stdout.text(),
      stderrTail: stderr.text(),
    };
    if (stopReason !== undefined) {
      throw new ActionFailure(`command stopped: ${stopReason}`, { retryable: true, details: result });
    }
    if (exit.code !== 0) {
      throw new ActionFailure(
        `command exited with ${exit.signal ? `signal ${exit.signal}` : `code ${exit.code}`}`,
        {
          retryable: command.retryable,
          details: result,
        },
      );
    }
    return result;
  } finally {
    clearTimeout(timeout);
    clearTimeout(killTimer);
    ctx.signal.removeEventListener("abort", onAbort);
    // The leader is gone; make sure nothing it started outlives it.
    if (child.pid !== undefined) {
      killGroup(child.pid, "SIGKILL");
      options.registry?.remove(child.pid);
    }
  }
}
