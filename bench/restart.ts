/**
 * A control-plane restart under load (goal, listed in
 * bench/README.md: 100k leases and 10k sessions, serving in < 3 s, no expiry).
 *
 *   node --import tsx bench/restart.ts --database-url postgres://postgres@127.0.0.1:5432/postgres
 *     [--sessions 10000] [--leases-per-session 10] [--clusters 10] [--grace-period 10s]
 *     [--heartbeat-interval 1s] [--reconnect 10000] [--reconnect-at listening|serving]
 *     [--connections 100] [--hold 15s] [--max-wait 300s] [--profile-dir DIR] [--keep]
 *
 * `--database-url` names a PostgreSQL server (and credentials): the benchmark
 * creates a fresh database of its own beside the one in the URL, and drops it
 * at the end unless `--keep`.
 *
 * The state is what a server process leaves behind when it is killed right
 * after a renewal: `--sessions` live sessions, each of a worker in one of
 * `--clusters` clusters holding `--leases-per-session` LEASED actions (epoch 1,
 * attempt RUNNING), hosted by a server id that no longer runs, last heard
 * just now, deadline now + grace. It is written with set-based SQL straight
 * into the tables of src/store/schema.ts, in the shape open-session.ts and
 * claim-actions.ts leave them.
 *
 * Then a real `leasehold serve` child process starts on it, and this process
 * measures, from the spawn: the first log line (loading the compiled
 * code, plus binding the port), `database ready` (connect and migrations
 * check), the restart extension (every live session's deadline pushed to
 * now + grace: README.md, Configuration, Starting), the `leasehold serving` log
 * line, and grpc.health answering SERVING.
 *
 * The agents come back: `--reconnect` of the workers (default all) open raw
 * WorkerService.Connect streams over `--connections` HTTP/2 connections, as
 * soon as the port is bound (`--reconnect-at listening`, what agents retrying
 * with backoff do) or once it serves; each hello lists the worker's leases,
 * then it heartbeats every interval listing them (less those the server
 * revoked, as worker.proto asks). `welcomedMs` says when each tenth of them
 * had its welcome. The streams are held until
 * `--hold` after SERVING (default 1.5 × grace, the whole grace period the
 * restart granted) and until one grace period after the last worker is back
 * (all of them, or what came back by `--max-wait` after the spawn, counted
 * from the spawn). Nothing may be lost: no `lease expired` log
 * line, every action still LEASED to its session with epoch 1, no session
 * ended, no `lease_expired` event. Prints one JSON line.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createHash, randomBytes, randomUUID } from "node:crypto";
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { create } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import postgres from "postgres";
import { type ConnectResponse, WorkerService } from "../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../src/rpc/client.js";
import { openDatabase } from "../src/store/database.js";
import { healthClient } from "../test/helpers/grpc-peers.js";
import { freePort } from "../test/helpers/ports.js";
import { benchArgs, choiceFlag, durationFlag, refuse, wholeNumberFlag } from "./args.js";

const { values } = benchArgs(import.meta.url, {
  options: {
    "database-url": { type: "string" },
    sessions: { type: "string", default: "10000" },
    "leases-per-session": { type: "string", default: "10" },
    clusters: { type: "string", default: "10" },
    "grace-period": { type: "string", default: "10s" },
    "heartbeat-interval": { type: "string", default: "1s" },
    reconnect: { type: "string" },
    "reconnect-at": { type: "string", default: "listening" },
    connections: { type: "string", default: "100" },
    hold: { type: "string" },
    "max-wait": { type: "string", default: "300s" },
    "profile-dir": { type: "string" },
    keep: { type: "boolean", default: false },
  },
});
if (!values["database-url"])
  refuse("--database-url is required: a PostgreSQL server this benchmark may create a database on");
const sessions = wholeNumberFlag("--sessions", values.sessions);
const perSession = wholeNumberFlag("--leases-per-session", values["leases-per-session"]);
const clusterCount = Math.min(wholeNumberFlag("--clusters", values.clusters), sessions);
const graceMs = durationFlag("--grace-period", values["grace-period"]);
const intervalMs = durationFlag("--heartbeat-interval", values["heartbeat-interval"]);
const reconnectCount = Math.min(
  sessions,
  values.reconnect === undefined ? sessions : wholeNumberFlag("--reconnect", values.reconnect, 0),
);
const reconnectAt = choiceFlag("--reconnect-at", values["reconnect-at"], ["listening", "serving"]);
const connections = Math.min(
  wholeNumberFlag("--connections", values.connections),
  Math.max(1, reconnectCount),
);
const holdMs = values.hold ? durationFlag("--hold", values.hold) : Math.round(graceMs * 1.5);
const maxWaitMs = durationFlag("--max-wait", values["max-wait"]);

/** Ids the seed SQL and this process both compute: md5 of a name, shaped as a UUID (like PostgreSQL's `md5(x)::uuid`). */
const idOf = (name: string) => {
  const h = createHash("md5").update(name).digest("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
};
const workerId = (w: number) => `restart-${w}`;
const actionIdOf = (w: number, k: number) => idOf(`a-${w * perSession + k}`);

// A fresh database beside the one in the URL.
const adminUrl = values["database-url"];
const dbName = `leasehold_restart_${randomBytes(4).toString("hex")}`;
const url = new URL(adminUrl);
url.pathname = `/${dbName}`;
const databaseUrl = url.toString();
const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
await admin.unsafe(`create database ${dbName}`);

const seedStarted = performance.now();
// The schema, migrated as a server would.
await (await openDatabase({ url: databaseUrl, dataDir: "" })).close();
const sql = postgres(databaseUrl, { max: 1, onnotice: () => {} });
const deadServer = randomUUID();
await sql.begin(async (tx) => {
  await tx`insert into clusters (name) select 'restart-' || c from generate_series(0, ${clusterCount - 1}) c`;
  await tx`
    insert into workers (worker_id, cluster, capacity, agent_version, created_at, last_seen_at)
    select 'restart-' || w, 'restart-' || (w % ${clusterCount}), ${perSession}, 'bench', now() - interval '1 hour', now()
    from generate_series(0, ${sessions - 1}) w`;
  await tx`
    insert into sessions (id, worker_id, server_id, stream_token, started_at, deadline, last_heard_at, principal)
    select md5('s-' || w)::uuid::text, 'restart-' || w, ${deadServer}, md5('t-' || w)::uuid::text,
           now() - interval '1 hour', now() + make_interval(secs => ${graceMs} / 1000.0), now(), 'anonymous'
    from generate_series(0, ${sessions - 1}) w`;
  await tx`
    insert into actions (id, cluster, payload, max_attempts, initial_backoff_ms, backoff_multiplier,
                         max_backoff_ms, max_system_retries, state, epoch, attempt_count, session_id,
                         worker_id, granted_at, created_at, updated_at, not_before, created_by)
    select md5('a-' || i)::uuid::text, 'restart-' || (i / ${perSession} % ${clusterCount}),
           jsonb_build_object('n', i), 3, 1000, 2, 60000, 3, 'LEASED', 1, 1,
           md5('s-' || (i / ${perSession}))::uuid::text, 'restart-' || (i / ${perSession}),
           now() - interval '10 minutes', now() - interval '20 minutes', now() - interval '10 minutes',
           now() - interval '20 minutes', 'anonymous'
    from generate_series(0, ${sessions * perSession - 1}) i`;
  await tx`
    insert into attempts (action_id, epoch, worker_id, session_id, outcome, started_at)
    select id, 1, worker_id, session_id, 'RUNNING', granted_at from actions`;
});
// A database that held these rows for a while has statistics on them.
await sql`analyze`;
const seedSeconds = (performance.now() - seedStarted) / 1000;

// The old process died right after its last renewal; the new one starts at once.
await sql`update sessions set last_heard_at = now(), deadline = now() + make_interval(secs => ${graceMs} / 1000.0)`;

const port = await freePort();
const address = `127.0.0.1:${port}`;
const marks: Record<string, number> = {};
let expiredLines = 0;
/** Lease expiries logged after this process stopped the streams and the server (should be none either). */
let expiredAfterStop = 0;
let stoppedAt: number | undefined;
/** Rounds of the take-back extension the server logged (src/server.ts, keepExtendingWhileTakingBack). */
let takeBackRounds = 0;
let stopping = false;
const logFile = join(mkdtempSync(join(tmpdir(), "leasehold-restart-")), "server.log");
let logOffset = 0;
let logRest = "";
const spawnedAt = Date.now();
const since = () => Date.now() - spawnedAt;
let onListening: () => void = () => {};
const listening = new Promise<void>((resolve) => (onListening = resolve));
let onServingLog: () => void = () => {};
const serving = new Promise<void>((resolve) => (onServingLog = resolve));
const server = startServer();
const tail = setInterval(readLog, 10);

/**
 * `leasehold serve` on the seeded database. Its log goes to a file, not a
 * pipe: pino writes synchronously, and a pipe this busy process reads late
 * would block the server (a quarter of its time in a first profile). Lines
 * are timed by their own `time` field, read back every 10 ms.
 */
function startServer(): ChildProcess {
  const profile = values["profile-dir"];
  const out = openSync(logFile, "w");
  const child = spawn(
    process.execPath,
    [
      ...(profile ? ["--cpu-prof", `--cpu-prof-dir=${profile}`] : []),
      join(import.meta.dirname, "..", "bin", "leasehold.js"),
      "serve",
      "--listen",
      address,
      "--metrics-listen",
      "off",
      "--database-url",
      databaseUrl,
      "--grace-period",
      `${graceMs}ms`,
      "--heartbeat-interval",
      `${intervalMs}ms`,
      "--log-level",
      "info",
      // Every agent comes from this one address, as from behind a NAT: no per-address bounds.
      "--max-connections-per-address",
      "0",
    ],
    { stdio: ["ignore", out, "inherit"] },
  );
  closeSync(out);
  child.on("exit", (code) => {
    if (!stopping) {
      console.error(`the server exited early (${code}); its log: ${logFile}`);
      process.exit(1);
    }
  });
  return child;
}

/** Reads the log lines written since the last call. */
function readLog(): void {
  const fd = openSync(logFile, "r");
  try {
    const chunk = Buffer.alloc(1 << 20);
    for (;;) {
      const n = readSync(fd, chunk, 0, chunk.length, logOffset);
      if (n === 0) break;
      logOffset += n;
      logRest += chunk.subarray(0, n).toString("utf8");
    }
  } finally {
    closeSync(fd);
  }
  const lines = logRest.split("\n");
  logRest = lines.pop() ?? "";
  for (const line of lines) onLogLine(line);
}

function onLogLine(line: string): void {
  let entry: { msg?: string; level?: number; time?: number };
  try {
    entry = JSON.parse(line);
  } catch {
    return;
  }
  const msg = entry.msg ?? "";
  const at = (entry.time ?? Date.now()) - spawnedAt;
  marks.firstLogMs ??= at;
  if (msg.startsWith("listening;")) {
    marks.listeningMs = at;
    onListening();
  } else if (msg === "database ready") marks.databaseReadyMs = at;
  else if (msg === "extended live sessions for the restart") marks.extendedMs = at;
  else if (msg === "leasehold serving") {
    marks.servingLogMs = at;
    onServingLog();
  } else if (msg.startsWith("agents taken back after the restart")) {
    marks.takenBackMs = at;
    takeBackRounds = Number((entry as { rounds?: number }).rounds ?? 0);
  } else if (msg.startsWith("lease expired")) {
    if (stoppedAt !== undefined && (entry.time ?? 0) > stoppedAt) expiredAfterStop += 1;
    else expiredLines += 1;
  }
  const quiet = msg.startsWith("lease expired") || msg.includes("is partitioned") || stopping;
  if ((entry.level ?? 0) >= 40 && !quiet) {
    const err = (entry as { err?: { stack?: string; message?: string } }).err;
    const cause = err?.stack?.match(/caused by: [^\n]*/)?.[0] ?? err?.message?.slice(-300) ?? "";
    console.error(`server: ${msg} ${cause}`);
  }
}

/** The server's resident memory, from /proc (Linux). */
function serverRssMiB(): number {
  const status = readFileSync(`/proc/${server.pid}/status`, "utf8");
  return Math.round(Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024);
}

type Call = grpc.ClientDuplexStream<unknown, ConnectResponse>;
const calls: Call[] = [];
let streamErrors = 0;
let resumedLeases = 0;
let revokedLeases = 0;
let resumedSessions = 0;
let revokesAfterWelcome = 0;
/** When (ms from the spawn) each tenth of the reconnecting agents had its welcome. */
const welcomedMs: Record<string, number> = {};
let welcomed = 0;

await listening;
// Health from the moment the port is bound, every 10 ms until SERVING.
const health = healthClient(address);
const healthServing = (async () => {
  for (;;) {
    const status = await health.check().catch(() => "UNAVAILABLE");
    if (status === "SERVING") {
      marks.healthServingMs = since();
      return;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
})();

if (reconnectAt === "serving") await healthServing;
const clients = Array.from({ length: connections }, () =>
  createClient(WorkerService, address, grpc.credentials.createInsecure(), {
    "grpc.use_local_subchannel_pool": 1,
  }),
);

/** Worker `w` comes back: hello listing its leases, then heartbeats listing them. */
function reconnect(w: number): Promise<void> {
  const client = clients[w % connections] as (typeof clients)[number];
  const call = client.connect() as unknown as Call;
  calls.push(call);
  let heldLeases = Array.from({ length: perSession }, (_, k) => ({
    actionId: actionIdOf(w, k),
    epoch: 1n,
  }));
  // A revoked lease is stopped at once and listed no more, as worker.proto asks of every worker.
  const drop = (actionIds: readonly string[]) => {
    const gone = new Set(actionIds);
    heldLeases = heldLeases.filter((l) => !gone.has(l.actionId));
  };
  let sequence = 0n;
  return new Promise((back, failed) => {
    call.on("error", (error) => {
      if (!stopping) streamErrors += 1;
      failed(error);
    });
    call.on("data", (response: ConnectResponse) => {
      const m = response.message;
      if (m.case === "welcome") {
        resumedLeases += m.value.resumed.length;
        revokedLeases += m.value.revoked.length;
        if (m.value.sessionResumed) resumedSessions += 1;
        drop(m.value.revoked.map((l) => l.actionId));
        welcomed += 1;
        if (welcomed % Math.max(1, Math.round(reconnectCount / 10)) === 0) welcomedMs[welcomed] = since();
        back();
        const beat = () => {
          sequence += 1n;
          call.write(
            create(WorkerService.method.connect.input, {
              message: { case: "heartbeat", value: { sequence, heldLeases } },
            }),
          );
        };
        setTimeout(() => {
          beat();
          const timer = setInterval(beat, intervalMs);
          call.on("close", () => clearInterval(timer));
        }, Math.random() * intervalMs);
      } else if (m.case === "revoke") {
        revokesAfterWelcome += 1;
        drop([m.value.actionId]);
      }
    });
    call.write(
      create(WorkerService.method.connect.input, {
        message: {
          case: "hello",
          value: {
            workerId: workerId(w),
            cluster: `restart-${w % clusterCount}`,
            capacity: perSession,
            heldLeases,
            agentVersion: "bench",
          },
        },
      }),
    );
  });
}

const reconnectStarted = since();
const OPEN_CONCURRENCY = 200;
let next = 0;
const reconnected = Promise.all(
  Array.from({ length: Math.min(OPEN_CONCURRENCY, reconnectCount) }, async () => {
    while (next < reconnectCount) await reconnect(next++).catch(() => {});
  }),
).then(() => {
  marks.reconnectedMs = since();
});

await Promise.all([serving, healthServing]);
const rssAtServing = serverRssMiB();
// Hold until `hold` after SERVING: every deadline the restart set passes within it.
// Watched until `hold` after SERVING and one grace period after the last agent is back (or gave
// up waiting at `--max-wait`), so every deadline the restart set, or a reconnect renewed, passes.
const sleepUntil = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms - since())));
const holdUntil = (marks.healthServingMs ?? since()) + holdMs;
await Promise.race([reconnected, sleepUntil(maxWaitMs)]);
const backAt = since();
await sleepUntil(Math.max(holdUntil, backAt + graceMs));
const watchedMs = since() - (marks.healthServingMs ?? 0);

const [state] = await sql<
  { leased_same_epoch: string; other_actions: string; sessions_ended: string; expired_events: string }[]
>`
  select
    (select count(*) from actions a join sessions s on s.id = a.session_id
      where a.state = 'LEASED' and a.epoch = 1 and s.ended_at is null) as leased_same_epoch,
    (select count(*) from actions where state <> 'LEASED' or epoch <> 1) as other_actions,
    (select count(*) from sessions where ended_at is not null) as sessions_ended,
    (select count(*) from events where kind = 'lease_expired') as expired_events`;
const rssAtEnd = serverRssMiB();

readLog();
stopping = true;
stoppedAt = Date.now();
for (const call of calls) call.cancel();
for (const c of clients) c.close();
health.close();
server.kill("SIGTERM");
await new Promise((r) => server.once("exit", r));
clearInterval(tail);
readLog();
await sql.end();
if (!values.keep) await admin.unsafe(`drop database if exists ${dbName} with (force)`);
await admin.end();
rmSync(dirname(logFile), { recursive: true, force: true });

const lost =
  expiredLines + Number(state?.other_actions) + Number(state?.sessions_ended) + Number(state?.expired_events);
console.log(
  JSON.stringify({
    sessions,
    leases: sessions * perSession,
    graceMs,
    heartbeatIntervalMs: intervalMs,
    seedSeconds: Number(seedSeconds.toFixed(1)),
    firstLogMs: marks.firstLogMs,
    listeningMs: marks.listeningMs,
    databaseReadyMs: marks.databaseReadyMs,
    extendedMs: marks.extendedMs,
    servingLogMs: marks.servingLogMs,
    healthServingMs: marks.healthServingMs,
    reconnectAt,
    reconnect: reconnectCount,
    reconnectStartedMs: reconnectStarted,
    reconnectedMs: marks.reconnectedMs ?? null,
    welcomedMs,
    takeBackRounds,
    takenBackMs: marks.takenBackMs ?? null,
    resumedSessions,
    resumedLeases,
    revokedLeases,
    revokesAfterWelcome,
    streamErrors,
    holdMs,
    watchedMs,
    leaseExpiredLogLines: expiredLines,
    leaseExpiredLogLinesAfterStop: expiredAfterStop,
    leasedSameEpoch: Number(state?.leased_same_epoch),
    otherActions: Number(state?.other_actions),
    sessionsEnded: Number(state?.sessions_ended),
    expiredEvents: Number(state?.expired_events),
    nothingLost: lost === 0 && Number(state?.leased_same_epoch) === sessions * perSession,
    serverRssMiB: { serving: rssAtServing, end: rssAtEnd },
    database: dbName,
  }),
);
process.exit(0);
