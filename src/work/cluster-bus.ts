import { sql } from "drizzle-orm";
import type { Logger } from "pino";
import type { Db } from "../store/database.js";
import { queryRows } from "../store/rows.js";
import { coalesced } from "./coalesced.js";
import { failureLog } from "./failure-log.js";
import type { RevokeReason } from "./worker-messages.js";

/**
 * What one server process tells the others sharing its database. Every
 * message is a hint that the receiver checks against its own state: losing
 * one costs latency (the loops' polls catch up), never correctness.
 */
export type BusMessage =
  /** Something about these change-feed topics changed: look again. */
  | { readonly kind: "wake"; readonly topics: readonly string[] }
  /** Send a revoke to the stream of this session, if you host it. */
  | {
      readonly kind: "revoke";
      readonly sessionId: string;
      readonly actionId: string;
      readonly epoch: number;
      readonly reason: RevokeReason;
      readonly message: string;
      /** The lease already ended on the server: also free the slot. */
      readonly ended: boolean;
    }
  /** Tell this worker's streams to drain. */
  | { readonly kind: "drain"; readonly workerId: string; readonly reason: string }
  /** Tell this worker's streams their drain ended: they take grants again. */
  | { readonly kind: "undrain"; readonly workerId: string }
  /** This session now belongs to the stream with this token: close any other. */
  | { readonly kind: "takeover"; readonly sessionId: string; readonly streamToken: string };

/** The processes sharing one database, as one broadcast channel. */
export interface ClusterBus {
  /** Broadcasts to every other process (best effort, batched). */
  send(message: BusMessage): void;
  /** Calls `handler` for every message from another process; returns its `off`. */
  subscribe(handler: (message: BusMessage) => void): () => void;
  /** Calls `fn` after the listener reconnected (messages sent meanwhile were lost). */
  onReconnect(fn: () => void): void;
  /**
   * Looks now whether another process listens (and remembers it). While
   * none does, sends cost nothing: they are dropped, not notified.
   */
  peersListening(): Promise<boolean>;
  /** Whether another process may be listening, as last looked at (true until the first look). */
  hasPeers(): boolean;
  close(): Promise<void>;
}

/** LISTEN on a dedicated connection that reconnects by itself; `onListen` runs after every (re)connect. */
export type Listen = (
  channel: string,
  onNotify: (payload: string) => void,
  onListen: () => void,
) => Promise<{ unlisten(): Promise<void> }>;

/** The PostgreSQL channel every Leasehold process listens on. */
export const BUS_CHANNEL = "leasehold";
/** NOTIFY payloads must stay under 8000 bytes. */
const MAX_PAYLOAD = 7000;
/** How often a process looks whether other processes listen. */
const PEER_CHECK_MS = 1000;
/**
 * Least time between two NOTIFY statements that carry only wake-ups. Under
 * load every dispatch round changes actions, and a NOTIFY per round was a
 * statement per round for the database and a message per round for every
 * other process; gathered over this long, many rounds share one. A revoke,
 * drain, undrain or takeover ends the wait: it goes at once, with the wake-ups so far.
 */
const WAKE_GAP_MS = 20;
/**
 * The `application_name` the database layer gives each process's connections
 * (`leasehold/<uuid>`, after the one the URL sets if any: see database.ts).
 */
export const OWN_NAME = /(?:^| )leasehold\/[0-9a-f-]{36}$/;

/**
 * The `pg_stat_activity` rows of other processes' connections listening on
 * the bus: one per process, told apart from this process's own by
 * `application_name`, which is unique per process (see OWN_NAME). With
 * `hidden`, also the rows whose query this role may not see (any may be one).
 */
export const otherListeners = (hidden: boolean) =>
  sql`datname = current_database() and pid <> pg_backend_pid()
    and application_name <> current_setting('application_name')
    and (query ilike ${`listen "${BUS_CHANNEL}"%`}${hidden ? sql` or query = '<insufficient privilege>'` : sql``})`;

/**
 * The bus over PostgreSQL LISTEN/NOTIFY. Sends are batched: everything sent
 * while a NOTIFY statement is in flight goes out in the next one, wake-up
 * topics deduplicated and packed into as few payloads as fit.
 *
 * A process alone on its database notifies nobody: every second (off the
 * hot path) it looks in `pg_stat_activity` for another process's LISTEN
 * connection, told apart from its own by `application_name`, which is unique
 * per process. A process that starts listening announces itself at once
 * with a NOTIFY, and any message from another process means it listens, so
 * only hints sent in the moment before a new process is heard of are lost;
 * the polls catch up on those as on any lost hint.
 */
export async function createPostgresBus(deps: {
  db: Db;
  listen: Listen;
  serverId: string;
  log: Logger;
  /** Least time between NOTIFY statements of wake-ups only (default {@link WAKE_GAP_MS}). */
  wakeGapMs?: number;
}): Promise<ClusterBus> {
  const { db, listen, serverId, log } = deps;
  const wakeGapMs = deps.wakeGapMs ?? WAKE_GAP_MS;
  const handlers = new Set<(message: BusMessage) => void>();
  const reconnects: (() => void)[] = [];
  let listenedOnce = false;
  /** Whether another process may be listening; true until looked at. */
  let peers = true;

  const subscription = await listen(
    BUS_CHANNEL,
    (payload) => {
      let parsed: BusMessage & { from?: string };
      try {
        parsed = JSON.parse(payload);
      } catch {
        return;
      }
      if (parsed.from === serverId) return;
      peers = true;
      for (const handler of handlers) handler(parsed);
    },
    () => {
      if (listenedOnce) {
        log.info("listening for other processes again; catching up on what was missed");
        for (const fn of reconnects) fn();
      }
      listenedOnce = true;
    },
  );

  let topics = new Set<string>();
  let others: BusMessage[] = [];
  // Lost hints cost latency only: the other processes' polls catch up.
  const notifies = failureLog(log, {
    failed: "could not notify other processes; they will catch up by polling",
    still: "still cannot notify other processes",
    again: "notifying other processes again",
  });
  let closed = false;

  function payloads(): string[] {
    const out = others.map((m) => JSON.stringify({ from: serverId, ...m }));
    let batch: string[] = [];
    let size = 0;
    for (const topic of topics) {
      if (size + topic.length + 3 > MAX_PAYLOAD && batch.length > 0) {
        out.push(JSON.stringify({ from: serverId, kind: "wake", topics: batch }));
        batch = [];
        size = 0;
      }
      batch.push(topic);
      size += topic.length + 3;
    }
    if (batch.length > 0) out.push(JSON.stringify({ from: serverId, kind: "wake", topics: batch }));
    topics = new Set();
    others = [];
    return out;
  }

  /** Whether the warning that this process's connections have no name of their own was logged. */
  let warnedName = false;
  /** Another process's LISTEN on the channel (a hidden query may be one: counted). */
  async function lookForPeers(): Promise<boolean> {
    const [row] = await queryRows<{ own: string; others: unknown }>(
      db,
      sql`select current_setting('application_name') as own, count(*) as others
          from pg_stat_activity
          where ${otherListeners(true)}`,
    );
    // Processes that share one configured name cannot tell each other apart: always notify.
    const unique = !!row && OWN_NAME.test(row.own);
    if (row && !unique && !warnedName) {
      warnedName = true;
      log.warn(
        { applicationName: row.own },
        "this process's database connections do not have their own application_name (something overrides it): the process cannot tell whether other processes listen, and notifies them always",
      );
    }
    peers = !unique || Number(row?.others) > 0;
    return peers;
  }

  // Tells the processes already listening that one more does.
  await db
    .execute(
      sql`select pg_notify(${BUS_CHANNEL}, ${JSON.stringify({ from: serverId, kind: "wake", topics: [] })})`,
    )
    .catch((error: unknown) => log.warn({ err: error }, "could not announce this process to the others"));
  // At once: says now if this process's connections are not told apart by their name.
  await lookForPeers().catch(() => {
    peers = true;
  });
  let checking = false;
  const peerTimer = setInterval(() => {
    if (checking) return;
    checking = true;
    lookForPeers()
      .catch(() => {
        peers = true;
      })
      .finally(() => {
        checking = false;
      });
  }, PEER_CHECK_MS);
  peerTimer.unref();

  /** performance.now() of the last NOTIFY statement. */
  let lastNotifyAt = Number.NEGATIVE_INFINITY;
  /** Ends the wait for the gap early: a message that is not a wake-up, or close. */
  let hurry: (() => void) | undefined;
  const flusher = coalesced(
    async () => {
      const wait = lastNotifyAt + wakeGapMs - performance.now();
      if (others.length === 0 && wait > 0 && !closed) {
        // What is sent meanwhile joins this statement.
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, wait);
          hurry = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        hurry = undefined;
      }
      const batch = payloads();
      if (batch.length === 0) return;
      lastNotifyAt = performance.now();
      try {
        await db.execute(
          sql`select pg_notify(${BUS_CHANNEL}, p) from jsonb_array_elements_text(${JSON.stringify(batch)}::jsonb) as p`,
        );
        notifies.worked();
      } catch (error) {
        notifies.failed(error);
      }
    },
    () => closed,
  );

  return {
    send(message) {
      if (closed || !peers) return;
      if (message.kind === "wake") for (const t of message.topics) topics.add(t);
      else {
        others.push(message);
        hurry?.();
      }
      flusher.request();
    },
    subscribe(handler) {
      handlers.add(handler);
      return () => handlers.delete(handler);
    },
    onReconnect(fn) {
      reconnects.push(fn);
    },
    peersListening: lookForPeers,
    hasPeers: () => peers,
    async close() {
      closed = true;
      hurry?.();
      clearInterval(peerTimer);
      await flusher.idle();
      await subscription.unlisten().catch(() => {});
    },
  };
}
