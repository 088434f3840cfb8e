/**
 * Leasehold beside graphile-worker, pg-boss and BullMQ: the same workloads,
 * every worker in a process of its own, fresh databases, one table.
 *
 *   cd bench/peers && npm ci && npm run bench -- [flags]
 *   (npm run bench is `node --import tsx run.mjs`: tsx, from the repository's
 *   own node_modules, lets the Leasehold adapter use the generated client.)
 *
 * See README.md for what each workload does and the peers' settings.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Redis } from "ioredis";
import pg from "pg";
import { isLocalHost, killAll, nowMs, processCommand, processCpuMicros, sleep } from "./lib/child.mjs";
import { bullmq } from "./systems/bullmq.mjs";
import { graphileWorker } from "./systems/graphile-worker.mjs";
import { leasehold } from "./systems/leasehold.mjs";
import { pgBoss } from "./systems/pg-boss.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");

const { values: flags } = parseArgs({
  options: {
    n: { type: "string", default: "20000" },
    "n-single": { type: "string", default: "1000" },
    batch: { type: "string", default: "1000" },
    "failover-runs": { type: "string", default: "20" },
    "peer-failover-runs": { type: "string", default: "3" },
    "failover-cap": { type: "string", default: "65" },
    grace: { type: "string", default: "2s" },
    only: { type: "string" },
    skip: { type: "string" },
    "database-url": {
      type: "string",
      default: process.env.PEERS_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres",
    },
    "redis-url": { type: "string", default: process.env.PEERS_REDIS_URL ?? "redis://127.0.0.1:6379" },
    out: { type: "string", default: join(here, "results", "latest.json") },
    help: { type: "boolean", short: "h" },
  },
});
if (flags.help) {
  console.log(`node --import tsx run.mjs [flags]   (or: npm run bench -- [flags])

  --n N                    jobs for enqueue and the 16-slot burn-down (default 20000)
  --n-single N             jobs for the 1-slot burn-down (default 1000)
  --batch N                jobs per bulk enqueue call (default 1000)
  --failover-runs N        kill -9 runs for Leasehold (default 20)
  --peer-failover-runs N   kill -9 runs for each peer (default 3; stops after the first run past the cap)
  --failover-cap S         seconds to wait for the second worker to start the job (default 65)
  --grace D                Leasehold's --grace-period for the kill -9 runs (default 2s)
  --only LIST / --skip LIST  systems, comma-separated: leasehold,graphile-worker,pg-boss,bullmq
                           (--skip also takes: enqueue,burn16,burn1,prefetch,failover,two-servers;
                           prefetch: Leasehold's burn-downs again with its agent's prefetch = slots)
  --database-url URL       PostgreSQL to create and drop databases on (env PEERS_DATABASE_URL;
                           default postgres://postgres@127.0.0.1:5432/postgres)
  --redis-url URL          Redis for BullMQ (env PEERS_REDIS_URL; default redis://127.0.0.1:6379)
  --out FILE               JSON result (default bench/peers/results/latest.json)`);
  process.exit(0);
}

const N = Number(flags.n);
const N1 = Number(flags["n-single"]);
const BATCH = Number(flags.batch);
const CAP_MS = Number(flags["failover-cap"]) * 1000;
const ALL = [leasehold, graphileWorker, pgBoss, bullmq];
const listed = (s) => (s ? s.split(",").map((x) => x.trim().toLowerCase()) : []);
const only = listed(flags.only);
const skip = listed(flags.skip);
for (const name of [...only, ...skip]) {
  const known = [
    ...ALL.map((s) => s.key),
    ...["enqueue", "burn16", "burn1", "prefetch", "failover", "two-servers"],
  ];
  if (!known.includes(name)) throw new Error(`unknown name "${name}": use one of ${known.join(", ")}`);
}
const systems = ALL.filter((s) => (only.length === 0 || only.includes(s.key)) && !skip.includes(s.key));
const runs = (phase) => !skip.includes(phase);

// ---------------------------------------------------------------- infrastructure

const adminUrl = new URL(flags["database-url"]);
const admin = new pg.Client({ connectionString: adminUrl.href });
await admin.connect();
let dbCounter = 0;

/** Runs `fn` with a fresh database, dropped afterwards. */
/**
 * CPU so far of the processes serving a database: the PostgreSQL backends
 * connected to `name`, or with `name` undefined the Redis server. Undefined
 * when they are not processes of this machine (a remote or containerized
 * server), whose CPU /proc cannot see, or not processes of that server. `since(later)` is the CPU used
 * between two samples; a backend that connected in between counts whole.
 */
async function databaseCpu(name) {
  const pids =
    name === undefined
      ? isLocalHost(redisUrl.hostname)
        ? [Number(/process_id:(\d+)/.exec(redis ? await redis.info("server") : "")?.[1])]
        : []
      : isLocalHost(adminUrl.hostname)
        ? (await admin.query("select pid from pg_stat_activity where datname = $1", [name])).rows.map(
            (r) => r.pid,
          )
        : [];
  // A pid from a server in a container may name an unrelated process here: check what runs.
  const expected = name === undefined ? "redis" : "postgres";
  const byPid = new Map();
  for (const pid of pids) {
    try {
      if (processCommand(pid).includes(expected)) byPid.set(pid, processCpuMicros(pid));
    } catch {
      // Gone, or not a process of this machine.
    }
  }
  if (byPid.size === 0) return undefined;
  return {
    byPid,
    since: (later) => [...later.byPid].reduce((sum, [pid, cpu]) => sum + cpu - (byPid.get(pid) ?? 0), 0),
  };
}

async function withDatabase(tag, fn) {
  const name = `peers_${tag.replace(/[^a-z0-9]/g, "_")}_${process.pid}_${dbCounter++}`;
  await admin.query(`create database ${name}`);
  const url = new URL(adminUrl.href);
  url.pathname = `/${name}`;
  try {
    return await fn(url.href);
  } finally {
    // Let every client close on its own first: a forced drop ends idle connections that a library
    // may still be closing, and some libraries have no error listener left on them by then.
    for (let i = 0; i < 100; i++) {
      const { rows } = await admin.query(
        "select count(*)::int as n from pg_stat_activity where datname = $1",
        [name],
      );
      if (rows[0].n === 0) break;
      await sleep(100);
    }
    await admin.query(`drop database if exists ${name} with (force)`);
  }
}

const redisUrl = new URL(flags["redis-url"]);
const redisOptions = { host: redisUrl.hostname, port: Number(redisUrl.port || 6379) };
if (redisUrl.password) redisOptions.password = decodeURIComponent(redisUrl.password);
const prefix = `leasehold-peers-${process.pid}`;
let redis;
let redisRestore;

/** AOF on with fsync every second (BullMQ's production advice) for the run; the old values are restored. */
async function redisDurable() {
  redis = new Redis({ ...redisOptions, lazyConnect: true, maxRetriesPerRequest: 1 });
  try {
    await redis.connect();
  } catch (error) {
    throw new Error(
      `Redis at ${redisUrl.host} is not reachable (${error.message}): start one (README: Redis) or pass --skip bullmq`,
    );
  }
  const [, appendonly] = await redis.config("GET", "appendonly");
  const [, appendfsync] = await redis.config("GET", "appendfsync");
  redisRestore = { appendonly, appendfsync };
  await redis.config("SET", "appendfsync", "everysec");
  await redis.config("SET", "appendonly", "yes");
  // Turning AOF on rewrites the file in the background; measure once that is done.
  for (let i = 0; i < 600; i++) {
    const info = await redis.info("persistence");
    if (
      /aof_enabled:1/.test(info) &&
      /aof_rewrite_in_progress:0/.test(info) &&
      !/aof_rewrite_scheduled:1/.test(info)
    )
      break;
    await sleep(100);
  }
  return { appendonly: "yes", appendfsync: "everysec", before: redisRestore };
}

async function redisCleanup() {
  if (!redis) return;
  try {
    let cursor = "0";
    do {
      const [next, keys] = await redis.scan(cursor, "MATCH", `${prefix}:*`, "COUNT", 1000);
      cursor = next;
      if (keys.length > 0) await redis.del(...keys);
    } while (cursor !== "0");
    if (redisRestore) {
      await redis.config("SET", "appendonly", redisRestore.appendonly);
      await redis.config("SET", "appendfsync", redisRestore.appendfsync);
      redisRestore = undefined;
    }
  } finally {
    redis.disconnect();
    redis = undefined;
  }
}

/** On Ctrl-C or a crash: no process left behind, Redis's settings restored. */
async function abandon(code) {
  killAll();
  await redisCleanup().catch(() => {});
  process.exit(code);
}
process.on("SIGINT", () => {
  console.error("interrupted: stopping the workers and servers, restoring Redis settings");
  void abandon(130);
});
for (const event of ["uncaughtException", "unhandledRejection"]) {
  process.on(event, (error) => {
    console.error(`${event}: ${error?.stack ?? error}`);
    void abandon(1);
  });
}

// ---------------------------------------------------------------- workloads

/** Polls the store until nothing of `queue` is left to do; null after `timeoutMs`. */
async function waitDone(store, queue, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const left = await store.remaining(queue);
    if (left === 0) return nowMs();
    if (Date.now() > deadline) return null;
    // Coarse while far from the end, fine near it: the end time is within 10 ms.
    await sleep(left > 200 ? 100 : 10);
  }
}

/**
 * Burn-down: `total` jobs already queued; workers (one process each) start
 * together on "go"; ends when the store says every job is completed.
 */
async function burnDown(store, queue, total, workers) {
  const handles = workers.map((w) => store.worker(queue, "burn", w.concurrency, w.server, w.prefetch));
  try {
    await Promise.all(handles.map((h) => h.waitFor("loaded")));
    const workerCpu = () => handles.reduce((sum, h) => sum + processCpuMicros(h.pid), 0);
    const cpu0 = store.serverCpuMicros?.();
    const worker0 = workerCpu();
    const database0 = await store.databaseCpu?.();
    const t0 = nowMs();
    for (const h of handles) h.send({ type: "go" });
    const t1 = await waitDone(store, queue, Math.max(600_000, total * 20));
    if (t1 === null) throw new Error(`burn-down of ${total} did not finish`);
    const cpu1 = store.serverCpuMicros?.();
    const worker1 = workerCpu();
    const database1 = await store.databaseCpu?.();
    const seconds = (t1 - t0) / 1000;
    const perJob = (micros) => Math.round(micros / total);
    return {
      jobs: total,
      seconds: round(seconds, 3),
      perSecond: Math.round(total / seconds),
      msPerJob: round((seconds * 1000) / total, 3),
      ...(cpu0 !== undefined ? { serverCpuMicrosPerJob: perJob(cpu1 - cpu0) } : {}),
      workerCpuMicrosPerJob: perJob(worker1 - worker0),
      ...(database0 && database1 ? { databaseCpuMicrosPerJob: perJob(database0.since(database1)) } : {}),
    };
  } finally {
    await Promise.all(handles.map((h) => h.stop()));
  }
}

/**
 * kill -9: worker A holds the only job (its handler blocks); worker B is
 * consuming and idle; A is killed; the time until B's handler starts the job.
 */
async function killRecovery(store, runCount, capMs, stopAfterTimeout) {
  const latencies = [];
  for (let i = 0; i < runCount; i++) {
    const queue = `hold-${i}`;
    await store.prepare?.(queue);
    const a = store.worker(queue, "hold", 1);
    const b = store.worker(queue, "hold", 1);
    try {
      await Promise.all([a.waitFor("loaded"), b.waitFor("loaded")]);
      a.send({ type: "go" });
      if (!(await a.waitFor("ready", 60_000))) throw new Error("worker A did not become ready");
      await store.enqueue(queue, 1, 1);
      if (!(await a.waitFor("started", 60_000))) throw new Error("worker A did not start the job");
      b.send({ type: "go" });
      if (!(await b.waitFor("ready", 60_000))) throw new Error("worker B did not become ready");
      await sleep(500); // B settles into its idle state (listening, polling or streaming)
      const killedAt = nowMs();
      a.child.kill("SIGKILL");
      const started = await b.waitFor("started", capMs);
      const ms = started ? Math.round(started.at - killedAt) : null;
      latencies.push(ms);
      process.stderr.write(
        `  run ${i + 1}/${runCount}: ${ms === null ? `not within ${capMs / 1000} s` : `${ms} ms`}\n`,
      );
      if (ms === null && stopAfterTimeout) break;
    } finally {
      await Promise.all([a.kill(), b.kill()]);
    }
  }
  return summarize(latencies, capMs);
}

function summarize(latencies, capMs) {
  const within = latencies.filter((x) => x !== null).sort((x, y) => x - y);
  const missed = latencies.length - within.length;
  // Runs past the cap sort last, as +∞: a percentile that lands on them is "not within the cap".
  const at = (q) => {
    const index = Math.min(latencies.length - 1, Math.ceil(q * latencies.length) - 1);
    return index < within.length ? within[index] : null;
  };
  return {
    runs: latencies.length,
    capMs,
    missed,
    p50Ms: at(0.5),
    p99Ms: at(0.99),
    maxMs: missed > 0 ? null : (within.at(-1) ?? null),
    latenciesMs: latencies,
  };
}

function round(x, digits) {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}

// ---------------------------------------------------------------- run

const result = {
  startedAt: new Date().toISOString(),
  parameters: {
    n: N,
    nSingle: N1,
    batch: BATCH,
    failoverRuns: Number(flags["failover-runs"]),
    peerFailoverRuns: Number(flags["peer-failover-runs"]),
    failoverCapSeconds: CAP_MS / 1000,
    leaseholdGrace: flags.grace,
  },
  environment: {},
  systems: {},
};

try {
  result.environment = await environment();
  if (systems.some((s) => s.key === "bullmq")) result.environment.redisPersistence = await redisDurable();

  for (const system of systems) {
    console.error(`\n== ${system.label}`);
    const r = { settings: settingsOf(system) };
    result.systems[system.key] = r;
    try {
      await measure(system, r);
    } catch (error) {
      // One system's failure leaves the others' figures standing.
      r.error = String(error?.message ?? error);
      console.error(`  ${system.label} failed: ${error?.stack ?? error}`);
    }
  }
} finally {
  await redisCleanup().catch((error) => console.error(`Redis cleanup: ${error.message}`));
  await admin.end();
}
result.finishedAt = new Date().toISOString();

mkdirSync(dirname(flags.out), { recursive: true });
writeFileSync(flags.out, `${JSON.stringify(result, null, 2)}\n`);
console.log(renderTable(result));
console.log(`\nJSON: ${flags.out}`);
process.exit(0);

/** Runs every selected workload of `system`, filling `r`. */
async function measure(system, r) {
  const open = (databaseUrl, extra = {}) =>
    system.open({ databaseUrl, root, redis: redisOptions, prefix, ...extra });
  const withStore = async (tag, extra, fn) => {
    if (!system.usesPostgres) {
      const store = await open(undefined, extra);
      store.databaseCpu = () => databaseCpu(undefined);
      try {
        return await fn(store);
      } finally {
        await store.close();
      }
    }
    return withDatabase(`${system.key}_${tag}`, async (url) => {
      const store = await open(url, extra);
      store.databaseCpu = () => databaseCpu(new URL(url).pathname.slice(1));
      try {
        return await fn(store);
      } finally {
        await store.close();
      }
    });
  };

  if (runs("enqueue") || runs("burn16")) {
    await withStore("burn16", {}, async (store) => {
      const queue = `burn16-${process.pid}`;
      const t0 = nowMs();
      const method = await store.enqueue(queue, N, BATCH);
      const seconds = (nowMs() - t0) / 1000;
      r.enqueue = { jobs: N, method, seconds: round(seconds, 3), perSecond: Math.round(N / seconds) };
      console.error(`  enqueue ${N} with ${method}: ${r.enqueue.perSecond}/s`);
      if (runs("burn16")) {
        r.burn16 = await burnDown(store, queue, N, [{ concurrency: 16 }]);
        console.error(`  burn-down, 16 slots: ${r.burn16.perSecond}/s`);
      }
    });
  }
  if (runs("burn1")) {
    await withStore("burn1", {}, async (store) => {
      const queue = `burn1-${process.pid}`;
      await store.enqueue(queue, N1, BATCH);
      r.burn1 = await burnDown(store, queue, N1, [{ concurrency: 1 }]);
      console.error(`  burn-down, 1 slot: ${r.burn1.perSecond}/s, ${r.burn1.msPerJob} ms per job`);
    });
  }
  if (system.key === "leasehold" && runs("prefetch")) {
    // The same burn-downs with the agent holding as many grants again as it has slots, each
    // started as a slot frees (the SDK's `prefetch`): the server commits one round of reports
    // while the agent runs the next, instead of the two taking turns.
    if (runs("burn16")) {
      r.burn16Prefetch = await withStore("burn16p", {}, async (store) => {
        const queue = `burn16p-${process.pid}`;
        await store.enqueue(queue, N, BATCH);
        return burnDown(store, queue, N, [{ concurrency: 16, prefetch: 16 }]);
      });
      console.error(`  burn-down, 16 slots, prefetch 16: ${r.burn16Prefetch.perSecond}/s`);
    }
    if (runs("burn1")) {
      r.burn1Prefetch = await withStore("burn1p", {}, async (store) => {
        const queue = `burn1p-${process.pid}`;
        await store.enqueue(queue, N1, BATCH);
        return burnDown(store, queue, N1, [{ concurrency: 1, prefetch: 1 }]);
      });
      console.error(
        `  burn-down, 1 slot, prefetch 1: ${r.burn1Prefetch.perSecond}/s, ${r.burn1Prefetch.msPerJob} ms per job`,
      );
    }
  }
  if (runs("failover")) {
    const isLeasehold = system.key === "leasehold";
    const count = Number(isLeasehold ? flags["failover-runs"] : flags["peer-failover-runs"]);
    const serveArgs = isLeasehold
      ? ["--grace-period", flags.grace, "--heartbeat-interval", heartbeatFor(flags.grace)]
      : [];
    console.error(
      `  kill -9 runs (${count}${isLeasehold ? `, grace ${flags.grace}` : `, cap ${CAP_MS / 1000} s`}):`,
    );
    r.failover = await withStore("failover", { serveArgs, logLevel: "error" }, (store) =>
      killRecovery(store, count, CAP_MS, !isLeasehold),
    );
  }
  if (system.key === "leasehold" && runs("two-servers")) {
    const twoBy8 = (servers) =>
      withStore(`two_${servers}`, { servers }, async (store) => {
        const queue = `two-${process.pid}`;
        await store.enqueue(queue, N, BATCH);
        return burnDown(store, queue, N, [
          { concurrency: 8, server: 0 },
          { concurrency: 8, server: servers - 1 },
        ]);
      });
    r.oneServer2x8 = await twoBy8(1);
    console.error(`  one server, 2 agents × 8 slots: ${r.oneServer2x8.perSecond}/s`);
    r.twoServers2x8 = await twoBy8(2);
    console.error(`  two servers, 2 agents × 8 slots (one per server): ${r.twoServers2x8.perSecond}/s`);
  }
}

// ---------------------------------------------------------------- helpers

/** A heartbeat interval within Leasehold's rule (at most a third of the grace period). */
function heartbeatFor(grace) {
  const ms = parseDurationMs(grace);
  return `${Math.max(100, Math.floor(ms / 4))}ms`;
}

function parseDurationMs(text) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)$/.exec(text);
  if (!m) throw new Error(`--grace: a duration like 2s or 1500ms, not "${text}"`);
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000 }[m[2]];
}

function settingsOf(system) {
  if (system.key === "leasehold")
    return (
      `leasehold serve defaults (PostgreSQL, log level warn); kill -9 runs with --grace-period ${flags.grace} ` +
      `--heartbeat-interval ${heartbeatFor(flags.grace)}; agents on the SDK, one process each, no prefetch ` +
      "except in the two prefetch rows (prefetch = slots)"
    );
  if (system.key === "pg-boss")
    return (
      "pg-boss defaults (queue: expireInSeconds 900, no heartbeat; pool max 10); burn-downs loop on " +
      "fetch() + complete(), one job per fetch, one completion per job (README: why not work()); " +
      "kill -9 runs use work() with its defaults"
    );
  return system.settings;
}

function packageVersion(name) {
  try {
    return JSON.parse(readFileSync(join(here, "node_modules", name, "package.json"), "utf8")).version;
  } catch {
    return null;
  }
}

function text(command, args) {
  try {
    return execFileSync(command, args, {
      cwd: root,
      encoding: "utf8",
      stdio: ["ignore", "pipe", "ignore"],
    }).trim();
  } catch {
    return null;
  }
}

async function environment() {
  const cpus = os.cpus();
  const { rows } = await admin.query("show server_version");
  let redisVersion = null;
  if (systems.some((s) => s.key === "bullmq")) {
    const probe = new Redis({ ...redisOptions, lazyConnect: true, maxRetriesPerRequest: 1 });
    try {
      await probe.connect();
      redisVersion = /redis_version:(\S+)/.exec(await probe.info("server"))?.[1] ?? null;
    } catch {
      // reported by redisDurable()
    } finally {
      probe.disconnect();
    }
  }
  const commit = text("git", ["rev-parse", "--short", "HEAD"]);
  const dirty = text("git", ["status", "--porcelain", "--untracked-files=no"]);
  return {
    cpu: cpus[0]?.model ?? "unknown",
    cores: cpus.length,
    memoryGiB: round(os.totalmem() / 1024 ** 3, 1),
    os: `${os.type()} ${os.release()}`,
    node: process.version,
    postgres: rows[0].server_version,
    redis: redisVersion,
    packages: Object.fromEntries(["graphile-worker", "pg-boss", "bullmq"].map((p) => [p, packageVersion(p)])),
    leaseholdCommit: commit ? `${commit}${dirty ? " (with uncommitted changes)" : ""}` : null,
  };
}

function renderTable(res) {
  const cols = ALL.filter((s) => res.systems[s.key]);
  const peers = cols.filter((s) => s.key !== "leasehold");
  const lh = res.systems.leasehold;
  const fmt = (x) => (x === null || x === undefined ? "–" : x.toLocaleString("en-US"));
  const latency = (f, key) => {
    if (!f) return "–";
    const v = f[key];
    return v === null ? `> ${f.capMs / 1000} s` : `${v.toLocaleString("en-US")} ms`;
  };
  /** Leasehold ÷ peer for throughputs (higher is better); peer ÷ Leasehold for times (× faster). */
  const ratio = (get, lowerIsBetter, peer) => {
    const a = lh ? get(lh) : undefined;
    const b = get(res.systems[peer.key]);
    if (a === null || a === undefined || b === undefined) return "–";
    if (b === null)
      return lowerIsBetter ? `> ${(res.systems[peer.key].failover.capMs / a).toFixed(1)}×` : "–";
    const x = lowerIsBetter ? b / a : a / b;
    return `${x >= 10 ? x.toFixed(0) : x.toFixed(2)}×`;
  };
  const rows = [
    ["enqueue (bulk), jobs/s", (s) => s.enqueue?.perSecond, fmt, false],
    ["burn-down, 16 slots, jobs/s", (s) => s.burn16?.perSecond, fmt, false],
    ["burn-down, 1 slot, jobs/s", (s) => s.burn1?.perSecond, fmt, false],
    ["burn-down, 1 slot, ms per job", (s) => s.burn1?.msPerJob, fmt, true],
    // Leasehold with prefetch, against the peers' figures of the rows above (they have no such setting).
    [
      "16 slots, Leasehold prefetch 16, jobs/s",
      (s) => (s === lh ? s.burn16Prefetch?.perSecond : s.burn16?.perSecond),
      (v, s) => (s === lh ? fmt(v) : "–"),
      false,
    ],
    [
      "1 slot, Leasehold prefetch 1, ms per job",
      (s) => (s === lh ? s.burn1Prefetch?.msPerJob : s.burn1?.msPerJob),
      (v, s) => (s === lh ? fmt(v) : "–"),
      true,
    ],
    [
      "kill -9 → 2nd worker starts, p50",
      (s) => s.failover?.p50Ms,
      (_v, s) => latency(s.failover, "p50Ms"),
      true,
    ],
    [
      "kill -9 → 2nd worker starts, p99",
      (s) => s.failover?.p99Ms,
      (_v, s) => latency(s.failover, "p99Ms"),
      true,
    ],
    [
      "kill -9 → 2nd worker starts, max",
      (s) => s.failover?.maxMs,
      (_v, s) => latency(s.failover, "maxMs"),
      true,
    ],
    ["kill -9 runs", (s) => s.failover?.runs, fmt, null],
    ["server CPU per job, 16 slots, µs", (s) => s.burn16?.serverCpuMicrosPerJob, fmt, null],
    ["worker CPU per job, 16 slots, µs", (s) => s.burn16?.workerCpuMicrosPerJob, fmt, null],
    ["database CPU per job, 16 slots, µs", (s) => s.burn16?.databaseCpuMicrosPerJob, fmt, null],
    ["one server, 2 agents × 8, jobs/s", (s) => s.oneServer2x8?.perSecond, fmt, null],
    ["two servers, 2 agents × 8, jobs/s", (s) => s.twoServers2x8?.perSecond, fmt, null],
  ];
  const header = [
    "",
    ...cols.map((s) => s.label),
    ...(lh ? peers.map((p) => `Leasehold vs ${p.label}`) : []),
  ];
  const body = rows.map(([label, get, show, lowerIsBetter]) => [
    label,
    ...cols.map((s) => show(get(res.systems[s.key]), res.systems[s.key])),
    ...(lh ? peers.map((p) => (lowerIsBetter === null ? "" : ratio(get, lowerIsBetter, p))) : []),
  ]);
  const widths = header.map((_, i) => Math.max(...[header, ...body].map((r) => String(r[i]).length)));
  const line = (r) =>
    `| ${r.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join(" | ")} |`;
  const env = res.environment;
  const lhEnqueue = lh?.enqueue?.method;
  return [
    "",
    line(header),
    `| ${widths.map((w, i) => (i === 0 ? "-".repeat(w) : `${"-".repeat(w - 1)}:`)).join(" | ")} |`,
    ...body.map(line),
    "",
    "Ratios: throughput is Leasehold ÷ peer; times (ms per job, kill -9) are peer ÷ Leasehold, so above 1× Leasehold is ahead.",
    `Jobs: ${N.toLocaleString("en-US")} (enqueue, 16 slots, two servers), ${N1.toLocaleString("en-US")} (1 slot); bulk calls of ${BATCH}.`,
    ...(lhEnqueue ? [`Leasehold enqueue used: ${lhEnqueue}.`] : []),
    `Machine: ${env.cpu}, ${env.cores} cores, ${env.memoryGiB} GiB; ${env.os}`,
    `Node ${env.node}; PostgreSQL ${env.postgres}${env.redis ? `; Redis ${env.redis} (appendonly yes, appendfsync everysec for the run)` : ""}`,
    `Peers: ${Object.entries(env.packages)
      .map(([k, v]) => `${k} ${v ?? "(not installed)"}`)
      .join(", ")}; Leasehold ${env.leaseholdCommit ?? "(commit unknown)"}`,
    ...cols.map((s) => `${s.label}: ${res.systems[s.key].settings}`),
    ...cols
      .filter((s) => res.systems[s.key].error)
      .map((s) => `${s.label} FAILED: ${res.systems[s.key].error}`),
  ].join("\n");
}
