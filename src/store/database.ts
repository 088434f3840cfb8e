import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import { PGlite } from "@electric-sql/pglite";
import { getTableName, is, sql } from "drizzle-orm";
import { type PgDatabase, PgDialect, type PgQueryResultHKT, PgTable } from "drizzle-orm/pg-core";
import { drizzle as drizzlePglite } from "drizzle-orm/pglite";
import { migrate as migratePglite } from "drizzle-orm/pglite/migrator";
import { drizzle as drizzlePostgres } from "drizzle-orm/postgres-js";
import { migrate as migratePostgres } from "drizzle-orm/postgres-js/migrator";
import postgres from "postgres";
import { lockDataDir } from "./data-dir-lock.js";
import { migrateExplained } from "./migration-failed.js";
import {
  appliedMigrations,
  type JournalEntry,
  pendingMigrations,
  readJournal,
  refuseNewerDatabase,
} from "./newer-database.js";
import { simpleQueryText } from "./query-text.js";
import { driverError, queryRows, registerPreparedRunner } from "./rows.js";
import * as schema from "./schema.js";

/** The drizzle database type both drivers share; repositories take only this. */
export type Db = PgDatabase<PgQueryResultHKT, typeof schema>;

/** An open database, its schema migrated (unless opened with `migrate: false`). */
export interface Database extends AsyncDisposable {
  readonly db: Db;
  /** Which driver is behind `db`. */
  readonly driver: "pglite" | "postgres";
  /**
   * PostgreSQL only: LISTEN on a dedicated connection that reconnects by
   * itself; `onListen` runs after the first LISTEN and after every reconnect.
   */
  readonly listen?: (
    channel: string,
    onNotify: (payload: string) => void,
    onListen: () => void,
  ) => Promise<{ unlisten(): Promise<void> }>;
  /**
   * PostgreSQL only: one round trip on a connection of its own, so that a pool
   * busy with long statements (thousands of sessions renewed at once) is not
   * mistaken for an unreachable database. It fails with {@link ReadOnlyDatabase}
   * when the database answers but cannot take writes.
   */
  readonly ping?: () => Promise<void>;
  /**
   * PostgreSQL only: a connection of its own for the renewal of sessions'
   * deadlines. A pool filled by client calls (dozens of large submits or
   * listings at once) kept renewals waiting longer than the grace period, and
   * the agents of healthy streams self-fenced and their work ran again.
   */
  readonly renewalDb?: Db;
  /**
   * PostgreSQL only: drops the connection under {@link renewalDb} at once,
   * without waiting for what runs on it (its statements fail with
   * CONNECTION_DESTROYED), and puts a fresh one in its place: the next
   * renewal runs on a new connection, not queued behind a hung backend or a
   * connection a middlebox forgot, which may never answer.
   */
  abandonRenewalConnection?(): void;
  /** Closes the pool (postgres) or the embedded database (PGlite). Idempotent. */
  close(): Promise<void>;
}

/** Options of {@link openDatabase}. */
export interface DatabaseOptions {
  /** PostgreSQL URL; when absent, PGlite in `dataDir` is used. */
  readonly url?: string | undefined;
  /** PGlite data directory, or `memory://` for a throw-away in-memory database. */
  readonly dataDir: string;
  /** Pool size for postgres.js. Default 10. */
  readonly poolSize?: number;
  /**
   * PostgreSQL only: the id in this process's `application_name`
   * (`leasehold/<id>`), unique per process; the server passes its server id,
   * so that `pg_stat_activity` names the process `workers list` shows. A
   * random UUID by default.
   */
  readonly processId?: string;
  /** Called with every SQL statement run through drizzle (tests count statements). */
  readonly onQuery?: (query: string) => void;
  /**
   * False: opens the database with the schema it has, applying no migration
   * and checking none (`leasehold db restored` checks what it needs itself,
   * and must leave the schema of a restored backup as it is). Default true.
   */
  readonly migrate?: boolean;
  /**
   * Called before migrations are applied, with the pending ones (their tags,
   * oldest first); not called when none is pending. A long one (an index
   * built over millions of rows) is otherwise silent until it ends.
   */
  readonly onMigrating?: (pending: readonly string[]) => void;
  /** Called once the pending migrations are applied: their tags and how long it took, lock waits included. */
  readonly onMigrated?: (applied: readonly string[], ms: number) => void;
  /**
   * PostgreSQL only: called each time pending migrations gave up waiting for
   * a table's lock ({@link MIGRATION_LOCK_TIMEOUT_MS}) and will be tried
   * again, with the sessions that held the lock they waited for (to log).
   */
  readonly onMigrationLockWait?: (wait: MigrationLockWait) => void;
  /** Stops the wait between two tries of migrations that gave way to a lock (a shutdown). */
  readonly signal?: AbortSignal;
}

/** One wait of the migrations for a lock, for {@link DatabaseOptions.onMigrationLockWait}. */
export interface MigrationLockWait {
  /** How many tries gave up so far. */
  readonly tries: number;
  /** Since the first try. */
  readonly waitedMs: number;
  /** The delay before the next try. */
  readonly retryInMs: number;
  /**
   * The sessions that held the lock the migration waited for
   * (`pg_blocking_pids` of its backend while it waited), longest transaction
   * first (at most 5); not those queued behind the migration, which waited
   * for it. Empty if nobody was seen holding it.
   */
  readonly holders: readonly LockHolder[];
}

/** A session that holds a lock a migration waits for. */
export interface LockHolder {
  readonly pid: number;
  readonly applicationName: string;
  readonly state: string;
  /** Its transaction's age. */
  readonly transactionMs: number;
  /** The start of its current or last statement. */
  readonly query: string;
}

/**
 * How long one statement of the migrations waits for a table's lock before
 * they roll back and try again later. A DDL statement waiting for its lock
 * (behind a pg_dump, a long report, a forgotten `psql` transaction) makes
 * every later statement on that table wait behind it: the serving processes'
 * renewals and grants would stop, and their agents self-fence. Giving up
 * after this long bounds that stall; a migration that cannot get its locks
 * is tried again until it does, and logged each time.
 */
export const MIGRATION_LOCK_TIMEOUT_MS = 2000;

/**
 * drizzle-kit's migrations. One that any commit shipped is never edited, only new ones added:
 * drizzle runs every migration whose journal `when` is newer than the newest applied one, from
 * its current text (migrations/README.md says what an edit did).
 */
const MIGRATIONS_FOLDER = fileURLToPath(new URL("./migrations", import.meta.url));

/**
 * Key of the advisory lock held while migrating, so that several servers
 * starting at once on one empty database apply the migrations exactly once.
 * ASCII "lsehold" packed into a bigint: an arbitrary but fixed number.
 */
export const MIGRATION_LOCK_KEY = 0x6c7365686f6c64n;

/**
 * Driver and SQLSTATE codes of a database that is not reachable *yet*: down,
 * restarting, recovering from a crash, out of connection slots, read-only (a
 * standby before its promotion), or a name that does not resolve yet (a
 * database container still starting). Anything
 * else at connect time (28P01 wrong password, 28000 no pg_hba entry, 3D000
 * no such database, a malformed URL) is configuration: waiting would not fix it.
 */
const TRANSIENT_CONNECT_CODES: ReadonlyArray<(code: string) => boolean> = [
  (c) =>
    [
      "ECONNREFUSED",
      "ECONNRESET",
      "ETIMEDOUT",
      "EPIPE",
      "EHOSTUNREACH",
      "ENETUNREACH",
      "EHOSTDOWN",
      "ENOTFOUND",
      "EAI_AGAIN",
      // A Unix socket path that the server has not created yet.
      "ENOENT",
      "CONNECT_TIMEOUT",
      "CONNECTION_CLOSED",
      "CONNECTION_ENDED",
      "CONNECTION_DESTROYED",
    ].includes(c),
  // connection_exception
  (c) => c.startsWith("08"),
  // admin_shutdown, crash_shutdown, cannot_connect_now ("the database system is starting up")
  (c) => c === "57P01" || c === "57P02" || c === "57P03",
  // insufficient_resources, e.g. 53300 too_many_connections
  (c) => c.startsWith("53"),
  // read_only_sql_transaction: a standby not promoted yet, a demoted primary (the migrations write)
  (c) => c === "25006",
];

/** True when opening the database failed only because it cannot be reached yet. */
export function isTransientConnectError(error: unknown): boolean {
  for (let e = error, depth = 0; e !== null && typeof e === "object" && depth < 8; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && TRANSIENT_CONNECT_CODES.some((test) => test(code))) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

/**
 * A database check found the database answering but refusing writes (in
 * recovery, or `transaction_read_only` on); `code` is the SQLSTATE its writes
 * fail with.
 */
export class ReadOnlyDatabase extends Error {
  readonly code = "25006";
  constructor() {
    super("the database refuses writes: it is read-only (a standby, or a primary demoted or set read-only)");
    this.name = "ReadOnlyDatabase";
  }
}

/** The URL without its password, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    return parsed.toString();
  } catch {
    return "(unparsable URL)";
  }
}

/** Options of {@link openDatabaseWhenReachable}. */
export interface RetryOptions {
  /** Aborting stops the waiting: the promise rejects with the signal's reason. */
  readonly signal?: AbortSignal;
  /** First delay between attempts, doubling (with jitter) up to `maxDelayMs`. Default 100 ms. */
  readonly initialDelayMs?: number;
  /** Largest delay between attempts. Default 5000 ms. */
  readonly maxDelayMs?: number;
  /** Called once when an attempt failed transiently and the waiting starts. */
  onWaiting?(error: unknown): void;
  /** Called after every further failed attempt (debug logs; the cause calls are refused with). */
  onRetry?(error: unknown, attempt: number): void;
  /** Called once when the database answered after `onWaiting`. */
  onReachable?(attempts: number, waitedMs: number): void;
}

/**
 * {@link openDatabase}, tried again with backoff while the database cannot be
 * reached yet (see {@link isTransientConnectError}); a permanent error
 * rejects at once. PGlite is never retried: it runs in this process.
 */
export async function openDatabaseWhenReachable(
  options: DatabaseOptions,
  retry: RetryOptions = {},
): Promise<Database> {
  const initial = retry.initialDelayMs ?? 100;
  const max = retry.maxDelayMs ?? 5000;
  const started = Date.now();
  for (let attempt = 1; ; attempt++) {
    retry.signal?.throwIfAborted();
    try {
      const database = await untilAborted(openDatabase(options), retry.signal, (late) => late.close());
      if (attempt > 1) retry.onReachable?.(attempt, Date.now() - started);
      return database;
    } catch (error) {
      if (retry.signal?.aborted) throw retry.signal.reason;
      if (!options.url || !isTransientConnectError(error)) throw error;
      if (attempt === 1) retry.onWaiting?.(error);
      else retry.onRetry?.(error, attempt);
      await retryDelay(attempt, retry.signal, initial, max);
    }
  }
}

/**
 * The wait before try `attempt + 1` at reaching the database: doubling from
 * `initialMs`, capped at `maxMs`, with "equal jitter" (never less than half
 * the step, so that servers restarted together do not hammer the database in
 * step). Rejects with the signal's reason when it aborts.
 */
export function retryDelay(
  attempt: number,
  signal: AbortSignal | undefined,
  initialMs = 100,
  maxMs = 5000,
): Promise<void> {
  const step = Math.min(maxMs, initialMs * 2 ** Math.min(attempt - 1, 30));
  return abortableDelay(step / 2 + Math.random() * (step / 2), signal);
}

/**
 * `promise`, or the signal's reason as soon as it aborts (a connect attempt
 * can hang for the driver's whole connect timeout). What the abandoned
 * promise still yields is handed to `discard`.
 */
function untilAborted<T>(
  promise: Promise<T>,
  signal: AbortSignal | undefined,
  discard: (late: T) => Promise<void>,
): Promise<T> {
  if (!signal) return promise;
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      reject(signal.reason);
      promise.then(discard).catch(() => {});
    };
    if (signal.aborted) {
      onAbort();
      return;
    }
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        // After an abort this is a no-op: `onAbort` rejected and discards the value.
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (error: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(error);
      },
    );
  });
}

function abortableDelay(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Opens the database, applying pending migrations first (unless `migrate` is
 * false). A database a newer build migrated is refused
 * (DatabaseNewerThanBuild, newer-database.ts).
 */
export async function openDatabase(options: DatabaseOptions): Promise<Database> {
  const logger = options.onQuery ? { logQuery: options.onQuery } : undefined;
  return options.url ? openPostgres(options.url, options, logger) : openPglite(options, logger);
}

type QueryLogger = { logQuery(query: string): void } | undefined;

/** The migrations this build ships, oldest first. */
export function shippedMigrations(): readonly JournalEntry[] {
  return readJournal(MIGRATIONS_FOLDER);
}

/**
 * Tells `options` that `pending` are about to be applied (nothing when none
 * is); the function returned tells it they were.
 */
function migrationProgress(options: DatabaseOptions, pending: readonly JournalEntry[]): () => void {
  if (pending.length === 0) return () => {};
  const tags = pending.map((entry) => entry.tag);
  const started = performance.now();
  options.onMigrating?.(tags);
  return () => options.onMigrated?.(tags, performance.now() - started);
}

async function openPglite(options: DatabaseOptions, logger: QueryLogger): Promise<Database> {
  const { dataDir } = options;
  let unlock = () => {};
  if (!dataDir.startsWith("memory://")) unlock = lockDataDir(dataDir);
  try {
    const client = await PGlite.create(dataDir);
    try {
      const db = drizzlePglite(client, { schema, ...(logger ? { logger } : {}) });
      if (options.migrate !== false) {
        // PGlite is a single session in a single process: no concurrent migrator.
        const applied = await appliedMigrations(
          async (text) => (await client.query<Record<string, unknown>>(text)).rows,
        );
        const journal = readJournal(MIGRATIONS_FOLDER);
        refuseNewerDatabase(applied, journal);
        const migrated = migrationProgress(options, pendingMigrations(applied, journal));
        await migrateExplained(() => migratePglite(db, { migrationsFolder: MIGRATIONS_FOLDER }), {
          where: `the database in ${dataDir}`,
          migrationsFolder: MIGRATIONS_FOLDER,
          applied,
          journal,
          isTransient: () => false,
        });
        migrated();
      }
      return handle(db as unknown as Db, "pglite", async () => {
        await client.close();
        unlock();
      });
    } catch (error) {
      await client.close();
      throw error;
    }
  } catch (error) {
    unlock();
    throw error;
  }
}

/** SQLSTATE lock_not_available: a statement gave up waiting for a lock (lock_timeout). */
const LOCK_NOT_AVAILABLE = "55P03";

/** A row of pg_stat_activity as {@link LockHolder} takes it. */
type ActivityRow = { pid: number; application_name: string; state: string; ms: string; query: string };

/** What a holder's row of pg_stat_activity says, for {@link MigrationLockWait.holders}. */
const ACTIVITY_COLUMNS = `a.pid, coalesce(a.application_name, '') as application_name, coalesce(a.state, '') as state,
  coalesce(extract(epoch from now() - a.xact_start) * 1000, 0)::bigint::text as ms,
  left(coalesce(a.query, ''), 120) as query`;

function lockHolder(r: ActivityRow): LockHolder {
  return {
    pid: r.pid,
    applicationName: r.application_name,
    state: r.state,
    transactionMs: Number(r.ms),
    query: r.query,
  };
}

/**
 * How often, while migrations run, another connection asks who blocks the
 * migrating backend: a few times within {@link MIGRATION_LOCK_TIMEOUT_MS}, so
 * that a wait long enough to give up is seen while it lasts.
 */
const BLOCKER_SAMPLE_MS = MIGRATION_LOCK_TIMEOUT_MS / 4;

/**
 * Watches the backend `pid` (the migrating one) while it runs migrations:
 * every {@link BLOCKER_SAMPLE_MS}, on a connection of its own (opened at the
 * first sample only, so a quick migration opens none), the sessions that
 * `pg_blocking_pids` says it waits for. Those hold the lock it waits for (or
 * wait for it ahead of it in the queue); the statements queued behind the
 * migration, Leasehold's own among them, are not among them: after the
 * migration gave up they hold locks as they run, but they were not its cause.
 * `stop` ends the watch and gives the last sessions seen blocking it.
 */
function watchBlockers(open: () => postgres.Sql, pid: number): { stop(): Promise<LockHolder[]> } {
  let last: LockHolder[] = [];
  let stopped = false;
  let session: postgres.Sql | undefined;
  let wake = () => {};
  const watching = (async () => {
    while (!stopped) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, BLOCKER_SAMPLE_MS);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      if (stopped) return;
      session ??= open();
      try {
        const rows = await session<ActivityRow[]>`
          select ${session.unsafe(ACTIVITY_COLUMNS)} from pg_stat_activity a
          where a.pid = any(pg_blocking_pids(${pid}::int))
          order by a.xact_start nulls last limit 5`;
        if (rows.length > 0) last = rows.map(lockHolder);
      } catch {
        // A sample lost (the watch's connection ended by stop, the database gone): the last one stands.
      }
    }
  })();
  return {
    async stop() {
      stopped = true;
      wake();
      await session?.end({ timeout: 1 });
      await watching;
      return last;
    },
  };
}

/**
 * The sessions other than `session`'s own that hold a lock on one of
 * Leasehold's tables and wait for none themselves, longest transaction
 * first: what a migration that gave up on a lock waited behind, when
 * {@link watchBlockers} saw nobody block it (the holder let go before a
 * sample). Empty if they let go meanwhile, or if the query fails.
 */
async function lockHolders(session: postgres.Sql): Promise<LockHolder[]> {
  const tables = Object.values(schema)
    .filter((table) => is(table, PgTable))
    .map((table) => getTableName(table as PgTable));
  try {
    const rows = await session<ActivityRow[]>`
      select ${session.unsafe(ACTIVITY_COLUMNS)}
      from pg_stat_activity a
      where a.pid <> pg_backend_pid()
        and a.pid in (select l.pid from pg_locks l join pg_class c on c.oid = l.relation
                      where l.granted and c.relname in ${session(tables)} and c.relnamespace = current_schema()::regnamespace)
        and not exists (select 1 from pg_locks w where w.pid = a.pid and not w.granted)
      order by a.xact_start nulls last limit 5`;
    return rows.map(lockHolder);
  } catch {
    return [];
  }
}

/**
 * How long a pooled connection that closed with an error waits before it
 * connects again, in seconds (postgres.js's `backoff`). postgres.js's default,
 * `(0.5..1) × min(3^retries / 100, 20)`, counts retries across the whole pool
 * and fixes a connection's delay when it closes: a few seconds of outage with
 * ten connections failing over and over push it to its 20 s cap, so after the
 * database is back, a query handed to such a connection waited up to 20 s
 * while other queries ran (CI saw session renewal fail for 18 s after a
 * restart and a connected worker's leases expire). Capped at half a second,
 * broken connections are replaced within ~0.5 s of the database answering
 * again; the jitter still spreads reconnects, and a refused connection costs
 * the database nothing.
 */
export function reconnectBackoffSeconds(retries: number): number {
  return (0.5 + Math.random() / 2) * Math.min(0.05 * 2 ** retries, 0.5);
}

/** The most of an `application_name` PostgreSQL shows (NAMEDATALEN - 1 bytes); the rest is cut. */
const MAX_APPLICATION_NAME = 63;

/**
 * The `application_name` of one process's connections, `leasehold/<uuid>`:
 * unique, so a process can tell its own LISTEN connection from the other
 * processes' (the cluster bus skips NOTIFY while nobody else listens). One
 * the URL sets (or PGAPPNAME) is kept in front, `<configured> leasehold/<uuid>`,
 * cut so that the whole fits in what PostgreSQL shows and the process's own
 * part stays whole; bytes PostgreSQL would not show as they are (not
 * printable ASCII) become `?`.
 */
export function processApplicationName(configured: string | undefined, id: string = randomUUID()): string {
  const own = `leasehold/${id}`;
  if (!configured) return own;
  const prefix = configured.replace(/[^\x20-\x7e]/g, "?").slice(0, MAX_APPLICATION_NAME - own.length - 1);
  return `${prefix} ${own}`;
}

/**
 * `url` without its `application_name` parameter (postgres.js lets the URL's
 * win over the one this process gives its connections), and that name.
 */
export function withoutApplicationName(url: string): { url: string; configured: string | undefined } {
  const at = url.indexOf("?");
  if (at < 0) return { url, configured: undefined };
  const params = new URLSearchParams(url.slice(at + 1));
  const configured = params.get("application_name") ?? undefined;
  if (configured === undefined) return { url, configured };
  params.delete("application_name");
  const rest = params.toString();
  return { url: url.slice(0, at) + (rest ? `?${rest}` : ""), configured: configured || undefined };
}

/**
 * How long PostgreSQL lets one of our transactions sit idle between two
 * statements before it ends it: well within the default grace period (10 s)
 * minus a heartbeat interval, so that rows a lost process locked are free
 * again before a renewal waiting on them lets deadlines pass.
 */
export const IDLE_TRANSACTION_TIMEOUT_MS = 5000;

async function openPostgres(
  configuredUrl: string,
  options: DatabaseOptions,
  logger: QueryLogger,
): Promise<Database> {
  const poolSize = options.poolSize ?? 10;
  const { url, configured } = withoutApplicationName(configuredUrl);
  const quiet = {
    onnotice: () => {},
    backoff: reconnectBackoffSeconds,
    // No JIT compilation: every statement here reads or writes a few rows by key, but the
    // planner's cost of a big one (the reap, the audit) passes jit_above_cost once tables hold
    // tens of thousands of rows, and compiling it took 2.4 s of CPU for 8 ms of work (10,000
    // live sessions, measured with auto_explain).
    connection: {
      application_name: processApplicationName(configured ?? process.env.PGAPPNAME, options.processId),
      jit: "off",
      // A process lost in the middle of a transaction (its host gone, its network cut) would hold
      // the transaction's row locks until TCP gives up, two hours by default: a session row
      // locked that long stalls the renewal of every stream of another process, whose workers
      // are then reaped though they heartbeat. None of our transactions waits between its
      // statements: PostgreSQL ends one idle this long and frees what it holds.
      idle_in_transaction_session_timeout: IDLE_TRANSACTION_TIMEOUT_MS,
      // And notices a vanished client's connection within about a minute, not two hours.
      tcp_keepalives_idle: 30,
      tcp_keepalives_interval: 10,
      tcp_keepalives_count: 3,
    },
  };
  if (options.migrate !== false)
    await migrateUnderLock(url, quiet, options, `the database at ${redactUrl(configuredUrl)}`);
  const client = postgres(url, { ...quiet, max: poolSize });
  // The renewal's own connection (see Database.renewalDb), replaced when it hangs
  // (abandonRenewalConnection): `renewalDb` runs on whichever is current.
  const openRenewer = () => postgres(url, { ...quiet, max: 1 });
  let renewer = openRenewer();
  // The database watch's own connection (see ping below).
  let pinger = postgres(url, { ...quiet, max: 1 });
  /** The check in flight, until it is answered. */
  let pinging: Promise<unknown> | undefined;
  let closed = false;
  const db = drizzlePostgres(client, { schema, ...(logger ? { logger } : {}) }) as unknown as Db;
  const renewalDb = drizzlePostgres(
    forwarding(renewer, () => renewer),
    {
      schema,
      ...(logger ? { logger } : {}),
    },
  ) as unknown as Db;
  const dialect = new PgDialect();
  for (const [handle, sql] of [
    [db, () => client],
    [renewalDb, () => renewer],
  ] as const) {
    registerPreparedRunner(handle, (query) => {
      const { sql: text, params } = simpleQueryText(query) ?? dialect.sqlToQuery(query);
      logger?.logQuery(text);
      return sql().unsafe(text, params as postgres.ParameterOrJSON<never>[], { prepare: true });
    });
  }
  return {
    ...handle(db, "postgres", async () => {
      closed = true;
      await Promise.all([
        client.end({ timeout: 5 }),
        renewer.end({ timeout: 5 }),
        pinger.end({ timeout: 5 }),
      ]);
    }),
    renewalDb,
    abandonRenewalConnection() {
      if (closed) return;
      const hung = renewer;
      renewer = openRenewer();
      // drizzle sets its type parsers on the client it is given; the fresh one needs them too.
      drizzlePostgres(renewer);
      hung.end({ timeout: 0 }).catch(() => {});
    },
    ping: async () => {
      if (pinging) {
        // The last check never got its answer: its connection went silent (a hung backend, a
        // middlebox that forgot it). A check queued behind it would wait forever, and the
        // process would report NOT_SERVING forever though a new connection works: drop that
        // one, without waiting, and check on a fresh one.
        const silent = pinger;
        pinger = postgres(url, { ...quiet, max: 1 });
        silent.end({ timeout: 0 }).catch(() => {});
      }
      // In the same round trip: whether it takes writes. A standby, or a primary demoted or set
      // read-only, answers every check but refuses every write (SQLSTATE 25006): for the
      // agents and the clients that is a database lost as much as one that is down.
      const check = pinger<{ read_only: boolean }[]>`
        select pg_is_in_recovery() or current_setting('transaction_read_only') = 'on' as read_only`;
      pinging = check;
      try {
        const [row] = await check;
        if (row?.read_only) throw new ReadOnlyDatabase();
      } finally {
        if (pinging === check) pinging = undefined;
      }
    },
    listen: async (channel, onNotify, onListen) => {
      const { unlisten } = await client.listen(channel, onNotify, onListen);
      return { unlisten };
    },
  };
}

/**
 * Applies the pending migrations on PostgreSQL: under the migration lock, so
 * that processes starting at once apply each exactly once, and each DDL
 * statement under {@link MIGRATION_LOCK_TIMEOUT_MS}: a migration that cannot
 * get a lock that long rolls back, reports who held it, and is tried again.
 */
async function migrateUnderLock(
  url: string,
  quiet: postgres.Options<Record<string, postgres.PostgresType>> & {
    connection: Record<string, string | number | boolean>;
  },
  options: DatabaseOptions,
  where: string,
): Promise<void> {
  // One dedicated session holds the advisory lock and runs the DDL; ending it
  // releases the lock even if migration fails half-way.
  // lock_timeout as a connection setting, not a SET: it holds on a connection made again too.
  const migrator = postgres(url, {
    ...quiet,
    max: 1,
    connection: { ...quiet.connection, lock_timeout: MIGRATION_LOCK_TIMEOUT_MS },
  });
  try {
    await migrator`select pg_advisory_lock(${MIGRATION_LOCK_KEY.toString()}::bigint)`;
    // Under the lock: a newer build migrating at the same moment has finished, or not begun.
    const applied = await appliedMigrations((text) => migrator.unsafe(text));
    const journal = readJournal(MIGRATIONS_FOLDER);
    refuseNewerDatabase(applied, journal);
    const migrated = migrationProgress(options, pendingMigrations(applied, journal));
    const started = Date.now();
    for (let tries = 1; ; tries++) {
      options.signal?.throwIfAborted();
      const [backend] = await migrator<{ pid: number }[]>`select pg_backend_pid() as pid`;
      const blockers = watchBlockers(() => postgres(url, { ...quiet, max: 1 }), backend?.pid ?? 0);
      let failure: unknown;
      try {
        await migrateExplained(
          () => migratePostgres(drizzlePostgres(migrator), { migrationsFolder: MIGRATIONS_FOLDER }),
          {
            where,
            migrationsFolder: MIGRATIONS_FOLDER,
            applied,
            journal,
            isTransient: (error) =>
              isTransientConnectError(error) || driverError(error)?.code === LOCK_NOT_AVAILABLE,
          },
        );
      } catch (error) {
        failure = error;
      }
      const seen = await blockers.stop();
      if (failure === undefined) break;
      if (driverError(failure)?.code !== LOCK_NOT_AVAILABLE) throw failure;
      // Rolled back: the migration holds and waits for nothing now. Another try once the holder may be done.
      const retryInMs = Math.min(10_000, 500 * 2 ** Math.min(tries - 1, 5));
      options.onMigrationLockWait?.({
        tries,
        waitedMs: Date.now() - started,
        retryInMs,
        holders: seen.length > 0 ? seen : await lockHolders(migrator),
      });
      await abortableDelay(retryInMs, options.signal);
    }
    migrated();
  } finally {
    await migrator.end({ timeout: 5 });
  }
}

/**
 * A postgres.js client that forwards every use to `current()`, so that the
 * connection under a drizzle handle can be replaced while the handle stays
 * (drizzle keeps the client it was given). `first` is current at the start.
 */
function forwarding(first: postgres.Sql, current: () => postgres.Sql): postgres.Sql {
  return new Proxy(first, {
    apply: (_target, thisArg, args) =>
      Reflect.apply(current() as unknown as (...a: unknown[]) => unknown, thisArg, args),
    get: (_target, key) => {
      const client = current();
      const value: unknown = Reflect.get(client, key, client);
      return typeof value === "function" ? value.bind(client) : value;
    },
  });
}

function handle(db: Db, driver: Database["driver"], end: () => Promise<void>): Database {
  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= end();
    return closing;
  };
  return { db, driver, close, [Symbol.asyncDispose]: close };
}

/**
 * What keeps PostgreSQL from vacuuming Leasehold's busiest tables: autovacuum
 * off for the server (or its collector, track_counts, that drives it), or
 * for one of those tables. Every action, attempt and event is deleted at
 * --history-retention, and every update leaves a dead row version: without
 * vacuum, rows stay bounded but the tables' files grow without bound (a soak
 * run at 33 actions/s grew its database by 313 MB an hour). PostgreSQL only.
 */
export async function vacuumShortfalls(db: Db): Promise<string[]> {
  const rows = await queryRows<{ what: string }>(
    db,
    sql`select 'autovacuum is off' as what where not current_setting('autovacuum')::bool
        union all
        select 'track_counts is off (autovacuum needs it)' where not current_setting('track_counts')::bool
        union all
        select 'autovacuum_enabled = false on table ' || c.relname
        from pg_class c
        where c.relnamespace = 'public'::regnamespace
          and c.relname in ('actions', 'attempts', 'events', 'sessions', 'scope_leases')
          and c.reloptions @> array['autovacuum_enabled=false']`,
  );
  return rows.map((r) => r.what);
}

/**
 * The database's limits on connections that leave fewer than one process
 * may open: its pool of `poolSize` and its three own connections (LISTEN,
 * the health check, the renewal). Calls would then fail now and then under
 * load with "the database accepts no connection now", with nothing to say
 * why beforehand. PostgreSQL only.
 */
export async function connectionShortfalls(
  db: Db,
  poolSize: number,
): Promise<{ limit: number; needed: number; what: string }[]> {
  const needed = poolSize + 3;
  const [limits] = await queryRows<{ role: number; database: number; server: number }>(
    db,
    sql`select (select rolconnlimit from pg_roles where rolname = current_user) as role,
          (select datconnlimit from pg_database where datname = current_database()) as database,
          current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int as server`,
  );
  if (!limits) return [];
  return (
    [
      ["the role's CONNECTION LIMIT", limits.role],
      ["the database's CONNECTION LIMIT", limits.database],
      ["max_connections less superuser_reserved_connections", limits.server],
    ] as const
  )
    .filter(([, limit]) => limit >= 0 && limit < needed)
    .map(([what, limit]) => ({ limit, needed, what }));
}
