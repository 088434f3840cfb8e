/**
 * The chaos run: three `leasehold serve` processes on one PostgreSQL of its
 * own, SDK agents (chaos-agent.ts) reaching them through fault-injecting TCP
 * proxies, a client submitting actions all along, and a seeded schedule of
 * faults: connection cuts, stalls and refusals, kill -9 of agents and
 * servers (restarted: agents with the same worker id), a PostgreSQL outage
 * shorter than the grace period and a full PostgreSQL stop/start. Then the
 * faults stop, the run waits until every action is final, stops everything,
 * and hands the database rows, the agents' execution logs and the measured
 * fault log to the checker (checker.ts).
 *
 *   npx tsx test/chaos/run.ts --seed 7 --duration 20m --actions 6000
 *   npm run chaos -- --seed 7 --duration 20m --actions 6000
 *   npm run chaos -- --check <run dir>/record.json
 *
 * --seed N       the schedule's seed, 0 to 4294967295 (default: random, printed)
 * --duration D   how long faults are made, e.g. 2m or 20m (default 2m)
 * --actions N    actions submitted over the run (default one per 150 ms)
 * --agents N     agents (default 5)
 * --keep         keep the run's directory (logs, record.json) when it passes too
 * --check FILE   check a kept run's record.json again, running nothing
 *
 * Exits 0 when the checker finds nothing, 1 with the violations otherwise,
 * 2 for a flag it does not know or a value it cannot use (before it starts
 * anything). See test/chaos/README.md.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  closeSync,
  createWriteStream,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import postgres from "postgres";
import { parseDuration } from "../../src/config.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { type Client, createClient } from "../../src/rpc/client.js";
import { loadEmbeddedPostgres, type OwnPostgres } from "../embedded-postgres.js";
import { freePort } from "../helpers/ports.js";
import {
  type AgentLine,
  type ChaosRecord,
  type CheckResult,
  checkChaos,
  type FaultKind,
  type FaultRecord,
  type Incarnation,
} from "./checker.js";
import { type AgentProxy, createAgentProxy } from "./proxy.js";
import { createRandom, type PlannedFault, planFaults } from "./schedule.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const BIN = join(ROOT, "bin", "leasehold.js");
const AGENT = fileURLToPath(new URL("./chaos-agent.ts", import.meta.url));
const CLUSTER = "chaos";

export interface ChaosOptions {
  readonly seed: number;
  /** How long faults are injected and actions submitted. */
  readonly durationMs: number;
  /** Actions submitted, spread evenly over the duration. */
  readonly actions: number;
  /** Agents (default 5), each with `slots` slots (default 3). */
  readonly agents?: number;
  readonly slots?: number;
  /**
   * Grants that every second agent (chaos-1, chaos-3, …) holds beyond its
   * slots, waiting for one to free (the SDK's `prefetch`; default 1).
   */
  readonly prefetch?: number;
  /** Server grace period and heartbeat interval (defaults 4 s and 500 ms). */
  readonly graceMs?: number;
  readonly heartbeatMs?: number;
  /** The agents' self-fence margin (default 500 ms, the SDK's). */
  readonly marginMs?: number;
  /** Longest time without progress while waiting for every action to be final (default 60 s). */
  readonly settleStuckMs?: number;
  /** Keep the run directory (logs) afterwards; by default it is deleted. */
  readonly keep?: boolean;
  /** Keep it when a rule was broken or the run failed (the CLI does; CI has the summary). */
  readonly keepOnFailure?: boolean;
  /** Progress lines (default: none). */
  readonly say?: (line: string) => void;
}

export interface ChaosResult extends CheckResult {
  readonly seed: number;
  /** The printable summary, violations included. */
  readonly summary: string;
  /** The run directory, if kept. */
  readonly dir: string | undefined;
}

/** A child process in its own process group, with waits on its stdout's JSON lines. */
interface Child {
  readonly process: ChildProcess;
  readonly pid: number;
  readonly exited: Promise<void>;
  /** Resolves with the first line matching `test` from now on; rejects on exit or after `limitMs`. */
  next(test: (line: Record<string, unknown>) => boolean, limitMs: number, what: string): Promise<void>;
  /** SIGKILLs its process group. */
  kill(): void;
  /** Whether kill() was called. */
  readonly killed: boolean;
}

function spawnChild(
  command: string,
  args: readonly string[],
  options: { env?: NodeJS.ProcessEnv; stdin: "pipe" | "ignore"; stdoutFile?: string; stderrFile: string },
): Child {
  const stderr = openSync(options.stderrFile, "a");
  const child = spawn(command, [...args], {
    env: options.env ?? process.env,
    // Its own process group, so that kill -9 takes whatever it started with it.
    detached: true,
    stdio: [options.stdin, "pipe", stderr],
  });
  closeSync(stderr);
  const pid = child.pid ?? -1;
  const copy = options.stdoutFile ? createWriteStream(options.stdoutFile, { flags: "a" }) : undefined;
  const waiters = new Set<(line: Record<string, unknown>) => void>();
  let gone = false;
  let killed = false;
  const exited = new Promise<void>((resolve) =>
    child.once("exit", () => {
      gone = true;
      copy?.end();
      resolve();
    }),
  );
  createInterface({ input: child.stdout as NodeJS.ReadableStream }).on("line", (text) => {
    copy?.write(`${text}\n`);
    let line: Record<string, unknown>;
    try {
      line = JSON.parse(text);
    } catch {
      return;
    }
    for (const w of [...waiters]) w(line);
  });
  return {
    process: child,
    pid,
    exited,
    next(test, limitMs, what) {
      return new Promise((resolve, reject) => {
        if (gone) return reject(new Error(`${what}: the process (pid ${pid}) is gone`));
        const done = (error?: Error) => {
          waiters.delete(look);
          clearTimeout(timer);
          if (error) reject(error);
          else resolve();
        };
        const look = (line: Record<string, unknown>) => {
          if (test(line)) done();
        };
        const timer = setTimeout(() => done(new Error(`${what}: nothing after ${limitMs} ms`)), limitMs);
        waiters.add(look);
        void exited.then(() => done(new Error(`${what}: the process (pid ${pid}) exited first`)));
      });
    },
    get killed() {
      return killed;
    },
    kill() {
      killed = true;
      // Its pid may belong to another process by now.
      if (gone) return;
      try {
        process.kill(-pid, "SIGKILL");
      } catch {
        // Already gone.
      }
    },
  };
}

/**
 * A free port below the kernel's range of ephemeral ports. The servers and
 * PostgreSQL restart on their ports; an ephemeral port could meanwhile become
 * the local port of some outgoing connection, and the restart would fail.
 */
async function stablePort(): Promise<number> {
  let low = 32768;
  try {
    low = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
  } catch {
    // Not Linux: the usual default.
  }
  if (!(low > 20_100)) return freePort();
  for (let tries = 0; tries < 200; tries++) {
    const port = 20_000 + Math.floor(Math.random() * (low - 20_000));
    const free = await new Promise<boolean>((resolve) => {
      const probe = createServer();
      probe.once("error", () => resolve(false));
      probe.listen(port, "127.0.0.1", () => probe.close(() => resolve(true)));
    });
    if (free) return port;
  }
  return freePort();
}

/** A PostgreSQL of the run's own on `port` (as test/embedded-postgres.ts starts one, on a stable port). */
async function startPostgres(port: number): Promise<OwnPostgres> {
  const EmbeddedPostgres = await loadEmbeddedPostgres();
  // Created by embedded-postgres, which hands it to its own OS user when running as root.
  const dir = join(tmpdir(), `leasehold-chaos-pg-${randomBytes(6).toString("hex")}`);
  const pg = new EmbeddedPostgres({
    databaseDir: dir,
    user: "postgres",
    password: "postgres",
    port,
    persistent: true,
    createPostgresUser: true,
    onLog: () => {},
    onError: () => {},
  });
  await pg.initialise();
  await pg.start();
  return {
    url: `postgres://postgres:postgres@127.0.0.1:${port}/postgres`,
    port,
    stop: () => pg.stop(),
    start: () => pg.start(),
    async destroy() {
      await pg.stop().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Waits `ms`: pacing of the schedule and of submissions only, never a wait for state. */
const pause = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, ms)));

/** Runs one chaos run; see the file's comment. Cleans up after itself even when it throws. */
export async function runChaos(options: ChaosOptions): Promise<ChaosResult> {
  const say = options.say ?? (() => {});
  const graceMs = options.graceMs ?? 4000;
  const heartbeatMs = options.heartbeatMs ?? 500;
  const marginMs = options.marginMs ?? 500;
  const agentCount = options.agents ?? 5;
  const slots = options.slots ?? 3;
  const prefetch = options.prefetch ?? 1;
  const workers = Array.from({ length: agentCount }, (_, i) => `chaos-${i}`);
  const prefetchOf = (worker: string) => (workers.indexOf(worker) % 2 === 1 ? prefetch : 0);
  const dir = mkdtempSync(join(tmpdir(), "leasehold-chaos-"));
  const cleanups: (() => Promise<void> | void)[] = [];
  const children = new Set<Child>();
  const killAll = () => {
    for (const c of children) c.kill();
  };
  process.once("exit", killAll);
  let passed = false;
  const began = Date.now();
  try {
    // ---- PostgreSQL of its own: this run stops and starts it.
    const pg = await startPostgres(await stablePort());
    cleanups.push(() => pg.destroy());
    const admin = postgres(pg.url, { max: 1, onnotice: () => {} });
    await admin`create database chaos`;
    await admin.end();
    const databaseUrl = pg.url.replace(/\/postgres$/, "/chaos");
    say(`postgres on port ${pg.port}; run directory ${dir}`);

    // ---- three servers
    /** Processes that exited without being killed or stopped: a crash is a finding. */
    const exits: { what: string; at: number }[] = [];
    let stopping = false;
    const serverAddresses: string[] = [];
    for (let i = 0; i < 3; i++) serverAddresses.push(`127.0.0.1:${await stablePort()}`);
    const servers: Child[] = [];
    const startServer = (i: number): Child => {
      const child = spawnChild(
        process.execPath,
        [
          BIN,
          "serve",
          "--listen",
          serverAddresses[i] as string,
          "--metrics-listen",
          "off",
          "--grace-period",
          `${graceMs}ms`,
          "--heartbeat-interval",
          `${heartbeatMs}ms`,
          // Servers killed and restarted leave the fleet uneven: streams move between them
          // throughout the run, under the same faults.
          "--rebalance-interval",
          "2s",
        ],
        {
          env: { ...process.env, DATABASE_URL: databaseUrl, LEASEHOLD_LOG_LEVEL: "info" },
          stdin: "ignore",
          stdoutFile: join(dir, `server-${i}.log`),
          stderrFile: join(dir, `server-${i}.err`),
        },
      );
      children.add(child);
      servers[i] = child;
      void child.exited.then(() => {
        if (child.killed || stopping) return;
        // A finding for the checker; the run goes on with the server started again.
        exits.push({ what: `server ${i} (pid ${child.pid})`, at: Date.now() });
        startServer(i);
      });
      return child;
    };
    /** Resolves once server `i` serves, through the restarts of a server that exits by itself. */
    const serving = async (i: number, what: string): Promise<void> => {
      for (;;) {
        const c = servers[i] as Child;
        try {
          return await c.next((l) => l.msg === "leasehold serving", 60_000, what);
        } catch (error) {
          if (servers[i] === c) throw error;
        }
      }
    };
    await Promise.all(
      [0, 1, 2].map((i) => {
        startServer(i);
        return serving(i, `server ${i} start`);
      }),
    );

    // ---- one proxy per agent, one listener per server
    const proxies = new Map<string, AgentProxy>();
    const proxyServer: Record<string, number> = {};
    for (const worker of workers) {
      const proxy = await createAgentProxy(serverAddresses);
      proxies.set(worker, proxy);
      cleanups.push(() => proxy.close());
      proxy.addresses.forEach((a, i) => {
        proxyServer[a] = i;
      });
    }

    // ---- agents
    const incarnations: Incarnation[] = [];
    const agents = new Map<string, { child: Child; startedAt: number }>();
    const startAgent = (worker: string): Child => {
      const proxy = proxies.get(worker) as AgentProxy;
      const child = spawnChild(
        process.execPath,
        [
          "--import",
          "tsx",
          AGENT,
          join(dir, `${worker}.log`),
          proxy.addresses.join(","),
          CLUSTER,
          worker,
          String(slots),
          String(marginMs),
          String(prefetchOf(worker)),
        ],
        { stdin: "pipe", stderrFile: join(dir, `${worker}.err`) },
      );
      children.add(child);
      agents.set(worker, { child, startedAt: Date.now() });
      void child.exited.then(() => {
        if (child.killed || agents.get(worker)?.child !== child) return;
        exits.push({ what: `agent ${worker} (pid ${child.pid})`, at: Date.now() });
        void endAgent(worker, "killed").then(() => startAgent(worker));
      });
      return child;
    };
    /** Ends an agent's incarnation: SIGKILL, or SIGTERM (goodbye) at the end of the run. */
    const endAgent = async (worker: string, how: Incarnation["how"]) => {
      const agent = agents.get(worker);
      if (!agent) return;
      agents.delete(worker);
      if (how === "killed") agent.child.kill();
      else {
        agent.child.process.kill("SIGTERM");
        const late = setTimeout(() => agent.child.kill(), 10_000);
        await agent.child.exited;
        clearTimeout(late);
      }
      const endedAt = Date.now();
      incarnations.push({ worker, pid: agent.child.pid, startedAt: agent.startedAt, endedAt, how });
      await agent.child.exited;
      children.delete(agent.child);
    };
    await Promise.all(
      workers.map((w) => startAgent(w).next((l) => l.type === "connected", 60_000, `agent ${w} start`)),
    );
    say(`3 servers and ${agentCount} agents (${slots} slots each) up in ${Date.now() - began} ms`);

    // ---- the chaos phase: submissions and faults, both paced by the seed's plan
    const clients = serverAddresses.map((a) => createClient(ActionService, a));
    cleanups.push(() => {
      for (const c of clients) c.close();
    });
    const plan = planFaults(options.seed, {
      durationMs: options.durationMs,
      workers,
      servers: 3,
      graceMs,
    });
    say(`seed ${options.seed}: ${plan.length} faults planned over ${options.durationMs} ms`);
    const t0 = Date.now();
    const submitted: { actionId: string; fail: boolean }[] = [];
    const submitting = submitAll(clients, options, t0, submitted);
    // Awaited after the faults; until then a failure must not count as unhandled.
    submitting.catch(() => {});
    const faults: FaultRecord[] = [];
    const running: Promise<void>[] = [];
    /** The fault in progress on each target, so that the next waits for it. */
    const busy = new Map<string, Promise<void>>();
    for (const planned of plan) {
      await pause(t0 + planned.atMs - Date.now());
      const lock = planned.target.startsWith("server-") ? "servers" : planned.target;
      const before = busy.get(lock) ?? Promise.resolve();
      const task = before.then(() =>
        inject(planned, {
          proxies,
          servers,
          startServer,
          serving,
          pg,
          startAgent,
          endAgent,
        }).then((record) => {
          faults.push(record);
          say(
            `fault ${record.kind}#${record.id} on ${record.target}: ${record.end - record.start} ms (planned ${planned.durationMs})`,
          );
        }),
      );
      busy.set(lock, task);
      // Awaited below; until then a failure must not count as unhandled.
      task.catch(() => {});
      running.push(task);
    }
    await Promise.all(running);
    await submitting;
    await pause(t0 + options.durationMs - Date.now());
    const chaosEnded = Date.now();
    say(`faults over after ${chaosEnded - t0} ms; ${submitted.length} actions submitted`);

    // ---- settle: wait until every action is final (progress-checked, no fixed sleep)
    const sql = postgres(databaseUrl, { max: 1, onnotice: () => {} });
    cleanups.push(() => sql.end());
    const settleStuckMs = options.settleStuckMs ?? 60_000;
    let best = Number.POSITIVE_INFINITY;
    let lastProgress = Date.now();
    for (;;) {
      const [row] = await sql<{ open: number }[]>`
        select count(*)::int as open from actions where state not in ('SUCCEEDED', 'FAILED', 'CANCELLED')`;
      const open = row?.open ?? 0;
      if (open === 0) break;
      if (open < best) {
        best = open;
        lastProgress = Date.now();
      } else if (Date.now() - lastProgress > settleStuckMs) {
        say(`${open} actions still not final after ${settleStuckMs} ms without progress; checking anyway`);
        break;
      }
      await pause(250);
    }
    const settledMs = Date.now() - chaosEnded;
    say(`settled in ${settledMs} ms`);

    // ---- stop the agents (goodbye), read the database, stop the servers
    await Promise.all([...agents.keys()].map((w) => endAgent(w, "stopped")));
    const db = await snapshot(sql);
    stopping = true;
    for (const s of servers) s.process.kill("SIGTERM");
    await Promise.all(
      servers.map(async (s) => {
        const late = setTimeout(() => s.kill(), 10_000);
        await s.exited;
        clearTimeout(late);
      }),
    );

    const agentLines: AgentLine[] = [];
    for (const file of readdirSync(dir).filter((f) => f.startsWith("chaos-") && f.endsWith(".log"))) {
      for (const text of readFileSync(join(dir, file), "utf8").split("\n")) {
        if (text.trim() === "") continue;
        try {
          agentLines.push(JSON.parse(text) as AgentLine);
        } catch {
          // A line cut by SIGKILL mid-write: nothing after it was written by that process.
        }
      }
    }
    const record: ChaosRecord = {
      config: {
        graceMs,
        heartbeatMs,
        stopAllowanceMs: STOP_ALLOWANCE_MS,
        expiryAllowanceMs: 2 * heartbeatMs + EXPIRY_SLACK_MS,
        resumeAllowanceMs: heartbeatMs + EXPIRY_SLACK_MS,
      },
      submitted,
      agentLines,
      incarnations,
      faults: faults.sort((a, b) => a.id - b.id),
      proxyServer,
      db,
      unexpectedExits: exits,
    };
    // Everything the checker read, to check again offline: `run.ts --check <dir>/record.json`.
    writeFileSync(join(dir, "record.json"), JSON.stringify(record));
    const result = checkChaos(record);
    const summary = summarize(options, record, result, {
      plan,
      chaosMs: chaosEnded - t0,
      settledMs,
      wallMs: Date.now() - began,
      agents: agentCount,
      slots,
      prefetch,
      marginMs,
    });
    passed = result.violations.length === 0;
    const keep = options.keep === true || (options.keepOnFailure === true && !passed);
    return { ...result, seed: options.seed, summary, dir: keep ? dir : undefined };
  } finally {
    killAll();
    process.off("exit", killAll);
    for (const cleanup of cleanups.reverse()) {
      try {
        await cleanup();
      } catch {
        // Cleaning up what is already gone.
      }
    }
    const keep = options.keep === true || (options.keepOnFailure === true && !passed);
    if (keep) say(`run directory kept: ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  }
}

/** How long a handler may run on once its agent's self-fence deadline passed. */
const STOP_ALLOWANCE_MS = 250;
/** Timer and scheduling slack on top of two heartbeat intervals when judging expiries. */
const EXPIRY_SLACK_MS = 300;

interface FaultDeps {
  readonly proxies: Map<string, AgentProxy>;
  readonly servers: Child[];
  startServer(i: number): Child;
  serving(i: number, what: string): Promise<void>;
  readonly pg: OwnPostgres;
  startAgent(worker: string): Child;
  endAgent(worker: string, how: Incarnation["how"]): Promise<void>;
}

/** Applies one fault, lifts it after its planned duration, and says what was measured. */
async function inject(planned: PlannedFault, deps: FaultDeps): Promise<FaultRecord> {
  const base = {
    id: planned.id,
    kind: planned.kind,
    target: planned.target,
    plannedAtMs: planned.atMs,
    plannedMs: planned.durationMs,
  };
  const proxy = deps.proxies.get(planned.target);
  switch (planned.kind) {
    case "cut": {
      proxy?.cut();
      const at = Date.now();
      return { ...base, start: at, end: at };
    }
    case "stall":
    case "refuse": {
      if (planned.kind === "stall") proxy?.stall();
      else proxy?.refuse();
      const start = Date.now();
      await pause(planned.durationMs);
      if (planned.kind === "stall") proxy?.unstall();
      else proxy?.unrefuse();
      return { ...base, start, end: Date.now() };
    }
    case "agent-kill": {
      const start = Date.now();
      await deps.endAgent(planned.target, "killed");
      await pause(planned.durationMs);
      deps.startAgent(planned.target);
      return { ...base, start, end: Date.now() };
    }
    case "server-kill": {
      const i = Number(planned.target.replace("server-", ""));
      const old = deps.servers[i] as Child;
      const start = Date.now();
      old.kill();
      await old.exited;
      await pause(planned.durationMs);
      deps.startServer(i);
      const end = Date.now();
      await deps.serving(i, `server ${i} restart`);
      return { ...base, start, end, ready: Date.now() };
    }
    case "pg-outage":
    case "pg-restart": {
      const start = Date.now();
      await deps.pg.stop();
      await pause(planned.durationMs);
      await deps.pg.start();
      return { ...base, start, end: Date.now() };
    }
  }
}

/**
 * Submits `options.actions` actions spread over the duration, each with a
 * request id, retried on another server until one accepts it (a server may
 * be down, or PostgreSQL). The payloads come from the seed: how long the
 * handler sleeps (50–1000 ms, or for 15% of them 2–8 s), and whether it
 * fails (1 in 20).
 */
async function submitAll(
  clients: readonly Client<typeof ActionService.method>[],
  options: ChaosOptions,
  t0: number,
  out: { actionId: string; fail: boolean }[],
): Promise<void> {
  const random = createRandom(options.seed ^ 0x5eed5eed);
  const every = options.durationMs / options.actions;
  for (let i = 0; i < options.actions; i++) {
    await pause(t0 + i * every - Date.now());
    const fail = random() < 0.05;
    // Most are short; some run long enough to be cut off by a fence, a kill or a revoke.
    const sleepMs = random() < 0.15 ? Math.round(2000 + 6000 * random()) : Math.round(50 + 950 * random());
    const request = {
      requestId: `chaos-${options.seed}-${i}`,
      cluster: CLUSTER,
      payload: { sleepMs, fail },
      maxSystemRetries: 100,
      retryPolicy: { maxAttempts: 1 },
    };
    const giveUpAt = Date.now() + 120_000;
    for (let attempt = 0; ; attempt++) {
      const client = clients[(i + attempt) % clients.length] as (typeof clients)[number];
      try {
        const { action } = await client.submitAction(request, { deadline: new Date(Date.now() + 5000) });
        out.push({ actionId: action?.id ?? "", fail });
        break;
      } catch (error) {
        if (Date.now() > giveUpAt)
          throw new Error(`no server took action ${i} for 2 minutes: ${String(error)}`);
        await pause(Math.min(1000, 50 * 2 ** attempt));
      }
    }
  }
}

/** The rows the checker reads. */
async function snapshot(sql: postgres.Sql): Promise<ChaosRecord["db"]> {
  const ms = (d: unknown) =>
    d instanceof Date ? d.getTime() : d === null ? null : new Date(String(d)).getTime();
  const actions = await sql<
    {
      id: string;
      state: string;
      epoch: number;
      output: Record<string, unknown> | null;
      failure_reason: string;
    }[]
  >`select id, state, epoch::int as epoch, output, failure_reason from actions`;
  const attempts = await sql<
    { action_id: string; epoch: number; worker_id: string; session_id: string; outcome: string }[]
  >`select action_id, epoch::int as epoch, worker_id, session_id, outcome from attempts`;
  const sessions = await sql<
    { id: string; worker_id: string; deadline: Date; ended_at: Date | null; end_reason: string | null }[]
  >`select id, worker_id, deadline, ended_at, end_reason from sessions`;
  const events = await sql<
    {
      sequence: number;
      kind: string;
      at: Date;
      action_id: string | null;
      worker_id: string | null;
      session_id: string | null;
      epoch: number | null;
    }[]
  >`select sequence::float8 as sequence, kind, at, action_id, worker_id, session_id, epoch::int as epoch
    from events
    where kind in ('action_succeeded', 'action_failed', 'lease_expired', 'session_reaped', 'report_fenced',
                   'cluster_partitioned')
    order by sequence`;
  return {
    actions: actions.map((a) => ({
      id: a.id,
      state: a.state,
      epoch: a.epoch,
      output: a.output,
      failureReason: a.failure_reason,
    })),
    attempts: attempts.map((a) => ({
      actionId: a.action_id,
      epoch: a.epoch,
      workerId: a.worker_id,
      sessionId: a.session_id,
      outcome: a.outcome,
    })),
    sessions: sessions.map((s) => ({
      id: s.id,
      workerId: s.worker_id,
      deadline: ms(s.deadline) as number,
      endedAt: ms(s.ended_at),
      endReason: s.end_reason,
    })),
    events: events.map((e) => ({
      sequence: e.sequence,
      kind: e.kind,
      at: ms(e.at) as number,
      actionId: e.action_id,
      workerId: e.worker_id,
      sessionId: e.session_id,
      epoch: e.epoch,
    })),
  };
}

const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** The run's summary: settings, faults by kind with measured durations, what happened, violations. */
function summarize(
  options: ChaosOptions,
  record: ChaosRecord,
  result: CheckResult,
  run: {
    plan: readonly PlannedFault[];
    chaosMs: number;
    settledMs: number;
    wallMs: number;
    agents: number;
    slots: number;
    prefetch: number;
    marginMs: number;
  },
): string {
  const { facts, violations } = result;
  const welcomeAfter = (worker: string, after: number) =>
    record.agentLines.find((l) => l.worker === worker && l.type === "connected" && l.ts >= after)?.ts;
  /** What each fault measured: how long it lasted, or (kills) how long until back. */
  const measured = (f: FaultRecord): number => {
    if (f.kind === "agent-kill") return (welcomeAfter(f.target, f.start) ?? f.end) - f.start;
    if (f.kind === "server-kill") return (f.ready ?? f.end) - f.start;
    return f.end - f.start;
  };
  const kinds: FaultKind[] = [
    "cut",
    "stall",
    "refuse",
    "agent-kill",
    "server-kill",
    "pg-outage",
    "pg-restart",
  ];
  const what: Record<FaultKind, string> = {
    cut: "",
    stall: "lasting",
    refuse: "lasting",
    "agent-kill": "kill → welcome",
    "server-kill": "kill → serving",
    "pg-outage": "stop → accepting",
    "pg-restart": "stop → accepting",
  };
  const faultLines = kinds.map((k) => {
    const list = record.faults.filter((f) => f.kind === k).map(measured);
    if (list.length === 0) return `  ${k}: 0`;
    if (k === "cut") return `  ${k}: ${list.length}`;
    return `  ${k}: ${list.length}, ${what[k]} ${seconds(Math.min(...list))} – ${seconds(Math.max(...list))}`;
  });
  const byState = new Map<string, number>();
  for (const a of record.db.actions) byState.set(a.state, (byState.get(a.state) ?? 0) + 1);
  const runs = new Map<string, number>();
  for (const x of facts.executions) runs.set(x.actionId, (runs.get(x.actionId) ?? 0) + 1);
  const rerun = [...runs.values()].filter((n) => n > 1).length;
  const causes = new Map<string, number>();
  for (const e of facts.expiries) {
    const kind = e.causes.length > 0 ? e.causes.map((c) => c.replace(/#\d+$/, "")).join("+") : "UNEXPLAINED";
    causes.set(kind, (causes.get(kind) ?? 0) + 1);
  }
  const lines = [
    `chaos run, seed ${options.seed}: ${seconds(run.chaosMs)} of faults, ${options.actions} actions, 3 servers, ${run.agents} agents × ${run.slots} slots (every second one with prefetch ${run.prefetch}), grace ${record.config.graceMs} ms, heartbeat ${record.config.heartbeatMs} ms, self-fence margin ${run.marginMs} ms`,
    `faults: ${record.faults.length} (planned ${run.plan.length}), measured:`,
    ...faultLines,
    `actions: ${[...byState].map(([s, n]) => `${n} ${s}`).join(", ")}; settled ${seconds(run.settledMs)} after the faults`,
    `executions: ${facts.executions.length}; actions run more than once: ${rerun}; stopped by self-fence: ${facts.selfFenced} (slowest stop ${facts.maxStopMs} ms after the deadline)`,
    `expiries: ${facts.reapedSessions} sessions reaped, ${facts.expiredLeases} leases expired${causes.size > 0 ? ` (explained by: ${[...causes].map(([c, n]) => `${c} ×${n}`).join(", ")})` : ""}; fenced reports: ${facts.fencedReports}; partitions: ${facts.partitions}`,
    `streams moved to spread them over the servers (REBALANCING): ${record.agentLines.filter((l) => l.type === "disconnected" && /REBALANCING|this server hosts \d+ of the/.test(l.error ?? "")).length}`,
    `wall clock: ${seconds(run.wallMs)}`,
    `violations: ${violations.length}`,
    ...violations
      .slice(0, 50)
      .map((v) => `  [${v.rule}] ${v.actionId ? `action ${v.actionId}: ` : ""}${v.message}`),
    ...(violations.length > 50 ? [`  … and ${violations.length - 50} more`] : []),
  ];
  return lines.join("\n");
}

/** A flag the run cannot use: said on stderr with the way to --help, exit 2. */
class UsageError extends Error {}

/** The value of a whole-number `flag` from `min` to `max`; anything else is a {@link UsageError}. */
function wholeNumber(flag: string, text: string, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const n = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(n) || n < min || n > max)
    throw new UsageError(
      `${flag}: expected a whole number from ${min} to ${max}, not ${JSON.stringify(text)}`,
    );
  return n;
}

/**
 * The CLI: `tsx test/chaos/run.ts [--seed N] [--duration 20m] [--actions N] [--agents N] [--keep]`,
 * or `--check <run dir>/record.json` to check a kept run again; `--help` prints the opening comment.
 */
async function main(argv: string[]): Promise<number> {
  if (argv.includes("--help") || argv.includes("-h")) {
    const source = readFileSync(fileURLToPath(import.meta.url), "utf8");
    const comment = /^\/\*\*\n([\s\S]*?)\n \*\//.exec(source)?.[1] ?? "";
    process.stdout.write(`${comment.replace(/^ \* ?/gm, "")}\n`);
    return 0;
  }
  let flags: ReturnType<typeof chaosFlags>;
  try {
    flags = chaosFlags(argv);
  } catch (error) {
    if (!(error instanceof UsageError || (error as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")))
      throw error;
    process.stderr.write(`${(error as Error).message}\n(--help says how to run the chaos run)\n`);
    return 2;
  }
  const recorded = flags.check;
  if (recorded) {
    // Checks a kept run again (e.g. after a change of the checker), without running anything.
    const { violations, facts } = checkChaos(JSON.parse(readFileSync(recorded, "utf8")) as ChaosRecord);
    process.stdout.write(
      `${facts.executions.length} executions, ${facts.reapedSessions} sessions reaped; violations: ${violations.length}\n`,
    );
    for (const v of violations) process.stdout.write(`  [${v.rule}] ${v.actionId ?? ""} ${v.message}\n`);
    return violations.length === 0 ? 0 : 1;
  }
  const stale = staleBuild();
  if (stale) {
    process.stderr.write(
      `${stale} is newer than dist/: run \`npm run build\` first (the servers run dist/)\n`,
    );
    return 2;
  }
  const { seed, durationMs, actions, agents } = flags;
  const say = (line: string) => process.stdout.write(`[${new Date().toISOString()}] ${line}\n`);
  process.once("SIGINT", () => process.exit(130));
  process.once("SIGTERM", () => process.exit(143));
  const result = await runChaos({
    seed,
    durationMs,
    actions,
    agents,
    keep: flags.keep,
    keepOnFailure: true,
    say,
  });
  process.stdout.write(`\n${result.summary}\n`);
  return result.violations.length === 0 ? 0 : 1;
}

/** The run's flags, checked: a flag it does not know, or a value it cannot use, throws. */
function chaosFlags(argv: string[]) {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      seed: { type: "string" },
      duration: { type: "string" },
      actions: { type: "string" },
      agents: { type: "string" },
      keep: { type: "boolean", default: false },
      check: { type: "string" },
    },
  });
  let durationMs: number;
  try {
    durationMs = parseDuration("--duration", values.duration ?? "2m");
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  return {
    check: values.check,
    keep: values.keep,
    seed:
      values.seed === undefined
        ? Math.floor(Math.random() * 2 ** 31)
        : wholeNumber("--seed", values.seed, 0, 2 ** 32 - 1),
    durationMs,
    actions:
      values.actions === undefined
        ? Math.round(durationMs / 150)
        : wholeNumber("--actions", values.actions, 1),
    agents: values.agents === undefined ? 5 : wholeNumber("--agents", values.agents, 1),
  };
}

/** A file of src/ newer than the last build, if any. */
function staleBuild(): string | undefined {
  const built = statSync(join(ROOT, "dist", ".tsbuildinfo"), { throwIfNoEntry: false })?.mtimeMs ?? 0;
  for (const entry of readdirSync(join(ROOT, "src"), { withFileTypes: true, recursive: true })) {
    const path = join(entry.parentPath, entry.name);
    if (entry.isFile() && statSync(path).mtimeMs > built) return path;
  }
  return undefined;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      process.exit(1);
    },
  );
}
