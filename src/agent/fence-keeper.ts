import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import type { Socket } from "node:net";
import { fileURLToPath } from "node:url";
import { type ProcessRegistry, startTime } from "./process-registry.js";

/**
 * A process of its own that kills what the agent started once the agent can
 * no longer stop it in time itself. The agent's self-fence stops its work
 * before its leases' guarantee runs out, but only while the agent runs: paused
 * (SIGSTOP, a frozen VM) or killed (SIGKILL, the OOM killer), it stops nothing,
 * and its commands ran on while the server handed their actions to another
 * worker. The keeper, told of every process group and of each new guarantee,
 * kills the groups when the guarantee runs out without a newer one (the agent
 * paused), or at once when the agent's end of the pipe closes (the agent
 * gone). It is detached from the agent's terminal, so a Ctrl-Z or Ctrl-C
 * there does not reach it.
 */
export interface FenceKeeper {
  /** A process group the agent started. */
  add(pid: number): void;
  /** That group is gone. */
  remove(pid: number): void;
  /** The agent's leases are guaranteed for `ms` more: the keeper kills at the end of it, unless told again. */
  guaranteed(ms: number): void;
  /** Ends the keeper (what it was told of is killed if still alive: nothing, after a clean stop). */
  close(): void;
}

/** The keeper's script: compiled, or the source when the agent itself runs from it (tsx). */
function keeperMain(): string[] {
  const compiled = fileURLToPath(new URL("./fence-keeper-main.js", import.meta.url));
  if (existsSync(compiled)) return [compiled];
  return [...process.execArgv, fileURLToPath(new URL("./fence-keeper-main.ts", import.meta.url))];
}

/**
 * Starts the keeper; `onExit` hears of it ending (or failing to start) before
 * {@link FenceKeeper.close}. Tell it of the process groups through
 * {@link keptBy}, and of each guarantee from the agent's `onGuarantee`
 * (the reference agent adds 250 ms, half the self-fence margin, so the
 * agent's own fence comes first); without guarantees it still kills at once
 * when the agent dies, but not when it is paused. Close it after the agent.
 */
export function startFenceKeeper(onExit: (code: number | null) => void = () => {}): FenceKeeper {
  let closing = false;
  let ended = false;
  const end = (code: number | null) => {
    if (closing || ended) return;
    ended = true;
    onExit(code);
  };
  const child = spawn(process.execPath, keeperMain(), {
    detached: true,
    stdio: ["pipe", "ignore", "inherit"],
  });
  child.unref();
  // A spawn that fails (EAGAIN, EMFILE, ENOMEM) says so here, not by throwing.
  child.once("error", () => end(null));
  // The pipe must not keep the agent alive either; a keeper gone makes writes fail, not throw.
  const stdin = child.stdin as Socket;
  stdin.unref();
  stdin.on("error", () => {});
  child.once("exit", end);
  const write = (line: string) => {
    if (!stdin.destroyed) stdin.write(`${line}\n`);
  };
  return {
    add: (pid) => write(`+${pid} ${startTime(pid) ?? "-"}`),
    remove: (pid) => write(`-${pid}`),
    // As a time on the machine's monotonic clock, which every process shares: a keeper slow to
    // read its pipe still kills when the guarantee ends, not that long after.
    guaranteed: (ms) => write(`d${process.hrtime.bigint() + BigInt(Math.round(ms * 1e6))}`),
    close() {
      closing = true;
      stdin.end();
    },
  };
}

/** `registry`, also telling `keeper` of every process group added and removed. */
export function keptBy(registry: ProcessRegistry, keeper: FenceKeeper): ProcessRegistry {
  return {
    ...registry,
    // The keeper first: a pause between the two would leave the group with its record only.
    add(pid, label) {
      keeper.add(pid);
      registry.add(pid, label);
    },
    remove(pid) {
      registry.remove(pid);
      keeper.remove(pid);
    },
  };
}
