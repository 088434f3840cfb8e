import { spawn } from "node:child_process";
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

const MAIN = fileURLToPath(new URL("./fence-keeper-main.js", import.meta.url));

/** Starts the keeper; `onExit` hears of it ending before {@link FenceKeeper.close}. */
export function startFenceKeeper(onExit: (code: number | null) => void = () => {}): FenceKeeper {
  const child = spawn(process.execPath, [MAIN], { detached: true, stdio: ["pipe", "ignore", "inherit"] });
  child.unref();
  // The pipe must not keep the agent alive either; a keeper gone makes writes fail, not throw.
  const stdin = child.stdin as Socket;
  stdin.unref();
  stdin.on("error", () => {});
  let closing = false;
  child.once("exit", (code) => {
    if (!closing) onExit(code);
  });
  const write = (line: string) => {
    if (!stdin.destroyed) stdin.write(`${line}\n`);
  };
  return {
    add: (pid) => write(`+${pid} ${startTime(pid) ?? "-"}`),
    remove: (pid) => write(`-${pid}`),
    guaranteed: (ms) => write(`d${Math.round(ms)}`),
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
    add(pid, label) {
      registry.add(pid, label);
      keeper.add(pid);
    },
    remove(pid) {
      registry.remove(pid);
      keeper.remove(pid);
    },
  };
}
