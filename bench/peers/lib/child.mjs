/**
 * Child processes of the comparison: every worker (and every Leasehold server)
 * runs in a process of its own, as in production. Workers talk to the runner
 * over Node's IPC channel with small JSON messages:
 *
 *   child → runner  { type: "loaded" }          modules imported, waiting for "go"
 *                   { type: "ready" }           consuming (connected, polling or streaming)
 *                   { type: "started", at }     hold mode: the handler began a job (ms, wall clock)
 *                   { type: "done", count, at } burn mode: `count` completions confirmed
 *                   { type: "error", message }
 *   runner → child  { type: "go" }              start consuming
 *                   { type: "stop" }            close gracefully and exit
 */
import { execFileSync, fork, spawn } from "node:child_process";
import { readFileSync } from "node:fs";

/** Every process started here and not yet exited, so that a crashing runner leaves none behind. */
const live = new Set();

function track(child) {
  live.add(child);
  child.on("exit", () => live.delete(child));
}

/** Kills (SIGKILL) every process started here that is still running. */
export function killAll() {
  for (const child of live) child.kill("SIGKILL");
}

/** Milliseconds on a clock shared by all processes of this machine (wall clock, sub-ms precision). */
export function nowMs() {
  return performance.timeOrigin + performance.now();
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Node flags for every child process, from PEERS_NODE_ARGS (space-separated),
 * e.g. `--cpu-prof --cpu-prof-dir=/tmp/prof` to profile servers and workers.
 */
function extraNodeArgs() {
  return (process.env.PEERS_NODE_ARGS ?? "").split(" ").filter(Boolean);
}

/**
 * Forks `script` with `config` as its one argument (JSON). `execArgv` lets a
 * Leasehold child load tsx. The handle collects messages and resolves waits.
 */
export function startWorker(script, config, { execArgv = [], cwd } = {}) {
  const child = fork(script, [JSON.stringify(config)], {
    execArgv: [...extraNodeArgs(), ...execArgv],
    ...(cwd ? { cwd } : {}),
    stdio: ["ignore", "inherit", "inherit", "ipc"],
  });
  track(child);
  const seen = [];
  const waiters = [];
  let exited = false;
  child.on("message", (message) => {
    if (message.type === "error") console.error(`  worker ${child.pid}: ${message.message}`);
    seen.push(message);
    for (const w of [...waiters]) {
      if (w.match(message)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(message);
      }
    }
  });
  const exit = new Promise((resolve) => {
    child.on("exit", (code, signal) => {
      exited = true;
      for (const w of waiters.splice(0))
        w.reject(new Error(`worker exited (${code ?? signal}) before "${w.type}"`));
      resolve({ code, signal });
    });
  });
  return {
    child,
    pid: child.pid,
    exit,
    /** Resolves with the first message of `type` (already seen or still to come), or null after `timeoutMs`. */
    waitFor(type, timeoutMs = 120_000, match = () => true) {
      const found = seen.find((m) => m.type === type && match(m));
      if (found) return Promise.resolve(found);
      if (exited) return Promise.reject(new Error(`worker exited before "${type}"`));
      return new Promise((resolve, reject) => {
        const w = {
          type,
          match: (m) => m.type === type && match(m),
          resolve: (m) => {
            clearTimeout(timer);
            resolve(m);
          },
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        };
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(w), 1);
          resolve(null);
        }, timeoutMs);
        waiters.push(w);
      });
    },
    send(message) {
      if (!exited) child.send(message);
    },
    /** Asks the child to stop, then kills it if it has not exited within `graceMs`. */
    async stop(graceMs = 5000) {
      if (exited) return;
      child.send({ type: "stop" });
      const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
      await exit;
      clearTimeout(timer);
    },
    async kill() {
      if (exited) return;
      child.kill("SIGKILL");
      await exit;
    },
  };
}

/** Starts a plain process (a Leasehold server), output prefixed with `name`. */
export function startProcess(name, command, args, { cwd, env } = {}) {
  const nodeArgs = command === process.execPath ? extraNodeArgs() : [];
  const child = spawn(command, [...nodeArgs, ...args], {
    cwd,
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  track(child);
  const prefix = (chunk) =>
    chunk
      .toString()
      .split("\n")
      .filter((l) => l.trim())
      .map((l) => `  [${name}] ${l}`)
      .join("\n");
  child.stdout.on("data", (c) => console.error(prefix(c)));
  child.stderr.on("data", (c) => console.error(prefix(c)));
  const exit = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  return { child, pid: child.pid, exit };
}

/** Whether a URL's host is this machine (the only place /proc can see a server's processes). */
export function isLocalHost(hostname) {
  return ["localhost", "127.0.0.1", "[::1]", "::1", ""].includes(hostname);
}

/** The command line of a process, from /proc (Linux); throws when there is no such process. */
export function processCommand(pid) {
  return readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
}

/** CPU time (user + system) of a process so far, in microseconds, from /proc (Linux). */
export function processCpuMicros(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime in clock ticks
  return (ticks * 1_000_000) / clockTicksPerSecond();
}

let ticks;
function clockTicksPerSecond() {
  // USER_HZ is 100 on the Linux machines Node runs on; ask getconf once anyway.
  if (ticks === undefined) {
    try {
      ticks = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
    } catch {
      ticks = 100;
    }
  }
  return ticks;
}

/** The child side: parses the config, wires "go" and "stop", reports errors. */
export function childMain(setup) {
  const config = JSON.parse(process.argv[2] ?? "{}");
  const send = (m) => process.send?.(m);
  let stop = async () => {};
  process.on("message", async (message) => {
    try {
      if (message.type === "go") {
        const handle = await setup(config, send);
        stop = handle?.stop ?? stop;
      } else if (message.type === "stop") {
        await stop();
        process.exit(0);
      }
    } catch (error) {
      send({ type: "error", message: String(error?.stack ?? error) });
      process.exit(1);
    }
  });
  process.on("disconnect", () => process.exit(0));
  send({ type: "loaded" });
}
