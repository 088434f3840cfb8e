import { sql } from "drizzle-orm";
import { Code, LeaseholdError, quote } from "../../errors.js";
import type { JsonObject } from "../../work/action.js";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { uuidv7 } from "../ids.js";
import { driverError, queryRows, toDate, toNumber } from "../rows.js";
import type { GrantRecord } from "./claim-actions.js";
import { insertWorkerEvents, type WorkerEvent } from "./insert-worker-events.js";
import { type KeepHosted, type ReapCause, type ReapResult, reapSessions } from "./reap-sessions.js";

/** A hello, validated. */
export interface HelloInput {
  readonly workerId: string;
  readonly cluster: string;
  readonly capacity: number;
  readonly labels: Readonly<Record<string, string>>;
  readonly agentVersion: string;
  /** Hello.instance_id: the sending process's own random id, or ''. */
  readonly instanceId: string;
  readonly heldLeases: readonly { actionId: string; epoch: number }[];
  /** Hello.stop_grants: the stream takes no grants (not stored: it lasts as long as the stream). */
  readonly stopGrants?: boolean;
}

/** The ErrorInfo reason of a hello refused because another principal's session holds the worker id. */
export const SESSION_OWNED_BY_OTHER = "SESSION_OWNED_BY_OTHER";
/** The ErrorInfo reason of a hello refused because another process's stream holds the worker's session. */
export const WORKER_ID_IN_USE = "WORKER_ID_IN_USE";
/** The ErrorInfo reason of a hello refused because the worker's live session is in another cluster. */
export const WORKER_IN_OTHER_CLUSTER = "WORKER_IN_OTHER_CLUSTER";

/** A lease the session holds that the worker did not list: sent to it again. */
export interface HeldGrant extends Omit<GrantRecord, "sessionId" | "workerId" | "cluster"> {
  readonly cancelRequested: boolean;
  /** A graceful stop asked of the holder (COLLECT_OUTPUTS), sent again on reconnect. */
  readonly stopReason: string | null;
}

/** What a hello opened. */
export interface OpenedSession {
  readonly sessionId: string;
  /** New for this stream: fences every later write made on its behalf. */
  readonly streamToken: string;
  /** An existing session continued (within its deadline). */
  readonly resumed: boolean;
  /** The continued session's stream was still believed open: this stream takes it over. */
  readonly tookOver: boolean;
  /** The server that hosted the session's previous stream, if any. */
  readonly previousServerId: string | null;
  readonly deadline: Date;
  readonly dbNow: Date;
  readonly draining: boolean;
  /** The operator's reason for the drain ('' when none was given, or not draining). */
  readonly drainReason: string;
  /** Listed leases that continue with the same epoch. */
  readonly resumedLeases: readonly HeldGrant[];
  /** Listed leases that are no longer the worker's. */
  readonly revokedLeases: readonly { actionId: string; epoch: number }[];
  /** Leases of the session the worker did not list (it never received their grant). */
  readonly unlistedLeases: readonly HeldGrant[];
  /**
   * The reap of the worker's previous session, found past its deadline, if
   * one ran: committed with the hello, and reported (log line, metric,
   * wake-ups) by the caller exactly as the reaper reports its own.
   */
  readonly reaped: ReapResult | undefined;
  /** Why `reaped` ended the previous session: its deadline had passed, or a new process of its worker said hello. */
  readonly reapCause?: ReapCause;
}

/**
 * Registers the cluster and worker and opens or resumes the worker's session,
 * in one transaction holding the worker's live-session row lock:
 * - a live session within its deadline is resumed (SPEC rule 2), or taken
 *   over if its stream was still open (rule 8);
 * - a live session already past its deadline is reaped first (its leases
 *   expire as at any deadline), then a new session starts;
 * - listed leases are resumed if (action, epoch) is still this session's
 *   lease, and revoked otherwise.
 *
 * `keep` is passed to that reap: a session this process hosts whose renewal
 * it failed to write is resumed, not reaped (SPEC rule 7).
 *
 * `principal` is who sent the hello. A session belongs to the principal whose
 * hello opened it: only that principal resumes it or takes it over. A hello
 * from another principal for a session this call would resume or take over
 * is refused with PERMISSION_DENIED (reason SESSION_OWNED_BY_OTHER) inside
 * the same transaction, under the session's row lock, so the check cannot
 * race a takeover; nothing is written, and the session, its leases and its
 * stream stay as they were. A session past its deadline that the reap above
 * ends is not resumed, so the worker id is free for a new session by anyone
 * allowed to use it.
 *
 * `mayRunIn` says whether `principal` may run this worker id in a cluster. A
 * hello that would move a known worker to another cluster is refused with
 * PERMISSION_DENIED ({@link notInWorkersCluster}) unless it may run it in
 * the worker's current cluster too, before anything of that cluster is read
 * or reaped: the agent right in one cluster gives no say over another's
 * workers, their sessions, or their partition pause (SPEC rule 10).
 */
export async function openSession(
  db: Db,
  clock: Clock,
  serverId: string,
  limits: { graceMs: number; partitionShare: number; maxSilenceMs: number },
  hello: HelloInput,
  principal: string,
  mayRunIn: (cluster: string) => boolean,
  keep?: KeepHosted,
): Promise<OpenedSession> {
  const now = clock.now();
  const grace = sql`make_interval(secs => ${limits.graceMs} / 1000.0)`;
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    // One round trip for two statements (a hello's cost is mostly round trips while thousands of
    // workers connect): the cluster is registered (a data-modifying WITH always runs to
    // completion), and the worker's row is locked.
    const [worker] = await queryRows<{ cluster: string; draining: boolean; drain_reason: string }>(
      tx,
      sql`with cluster as (insert into clusters (name) values (${hello.cluster}) on conflict (name) do nothing)
          select cluster, draining, drain_reason from workers where worker_id = ${hello.workerId} for update`,
    );
    if (worker !== undefined && worker.cluster !== hello.cluster && !mayRunIn(worker.cluster)) {
      throw notInWorkersCluster(principal, worker.cluster, hello);
    }
    let [live] = await queryRows<LiveSessionRow>(
      tx,
      sql`select id, worker_id, stream_lost_at, server_id, principal, instance_id, deadline < ${now} as expired
          from sessions where worker_id = ${hello.workerId} and ended_at is null for update`,
    );
    const movingCluster = worker !== undefined && worker.cluster !== hello.cluster;
    let reaped: ReapResult | undefined;
    let reapCause: ReapCause | undefined;
    /** Reaps the live session (unless its cluster's expiries are paused and `obeyValve`); true if it ended. */
    const reapLive = async (id: string, restarted: boolean, obeyValve: boolean) => {
      reaped = await reapSessions(tx, clock, {
        limit: 1,
        partitionShare: limits.partitionShare,
        maxSilenceMs: limits.maxSilenceMs,
        sessionIds: [id],
        obeyValve,
        keep,
        restarted,
      });
      reapCause = restarted ? "restarted" : "deadline";
      return reaped.sessions.length > 0;
    };
    // Past its deadline: reaped now, unless its cluster's expiries are paused (SPEC rule 10), in
    // which case the worker is back in time after all and resumes. A worker that moved to another
    // cluster cannot resume, so its old session ends even then, but only at the hello of the
    // principal that opened it: another principal's hello must not end a paused session (only an
    // operator's resume or the workers' return ends a pause); it is refused below instead.
    const ownMove = movingCluster && live?.principal === principal;
    if (live?.expired && (await reapLive(live.id, false, !ownMove))) live = undefined;
    if (live && live.principal !== principal) throw notTheOwner(principal, hello);
    if (live && inUseByAnother(live, hello)) throw workerIdInUse(hello);
    // A new process of the worker, its predecessor's stream gone: the predecessor's leases are not
    // grants this process missed but work that died with it. They expire now (each charged to its
    // action's system retries, so an action that kills its worker every time fails in the end) and
    // come back with new epochs, rather than being re-sent with the same ones.
    // A new process's hello says its predecessor is gone: no partition to wait out.
    if (live && restartedProcess(live, hello) && (await reapLive(live.id, true, false))) live = undefined;
    if (live && movingCluster) throw inOtherCluster(worker.cluster, hello);
    const resumed = live !== undefined;
    const draining = resumed ? (worker?.draining ?? false) : false;
    const drainReason = draining ? (worker?.drain_reason ?? "") : "";
    await tx.execute(sql`
      insert into workers (worker_id, cluster, capacity, labels, agent_version, draining, last_seen_at)
      values (${hello.workerId}, ${hello.cluster}, ${hello.capacity}, ${JSON.stringify(hello.labels)}::jsonb,
              ${hello.agentVersion}, false, ${now})
      on conflict (worker_id) do update set
        cluster = excluded.cluster, capacity = excluded.capacity, labels = excluded.labels,
        agent_version = excluded.agent_version, last_seen_at = excluded.last_seen_at,
        draining = ${draining}, drain_reason = ${drainReason}`);

    let sessionId: string;
    const streamToken = uuidv7();
    let row: { deadline: unknown; db_now: unknown } | undefined;
    if (live) {
      sessionId = live.id;
      [row] = await queryRows(
        tx,
        sql`update sessions set deadline = greatest(deadline, ${now} + ${grace}), last_heard_at = ${now},
              stream_lost_at = null, stream_handed_over = false, server_id = ${serverId}, stream_token = ${streamToken},
              instance_id = ${hello.instanceId}
            where id = ${sessionId} returning deadline, ${now} as db_now`,
      );
    } else {
      sessionId = uuidv7();
      [row] = await queryRows(
        tx,
        sql`insert into sessions (id, worker_id, server_id, stream_token, started_at, deadline, last_heard_at, principal,
                                  instance_id)
            values (${sessionId}, ${hello.workerId}, ${serverId}, ${streamToken}, ${now}, ${now} + ${grace}, ${now},
                    ${principal}, ${hello.instanceId})
            returning deadline, ${now} as db_now`,
      );
    }
    const tookOver = live !== undefined && live.stream_lost_at === null;

    // A session started just now holds nothing yet: its id is new.
    const held = !resumed
      ? []
      : await queryRows<HeldRow>(
          tx,
          sql`select id, epoch, attempt_count, payload, run_id, checkpoint, cancel_requested, stop_reason,
                 trace_parent
              from actions where session_id = ${sessionId} and state = 'LEASED'`,
        );
    const { resumedLeases, revokedLeases, unlistedLeases } = sortHeld(hello, held);
    // Live past its deadline, and not reaped by this hello: its cluster's partition (or its server's
    // failed renewals) kept it, and the worker is back later than the grace period.
    const late = resumed && live?.expired === true;
    const events = helloEvents(hello, resumed, tookOver, resumedLeases, revokedLeases, late);
    await insertWorkerEvents(
      tx,
      events.map((e) => ({
        ...e,
        worker_id: hello.workerId,
        cluster: hello.cluster,
        session_id: sessionId,
        actor: principal,
      })),
    );

    return {
      sessionId,
      streamToken,
      resumed,
      tookOver,
      previousServerId: live?.server_id ?? null,
      deadline: toDate(row?.deadline),
      dbNow: toDate(row?.db_now),
      draining,
      drainReason,
      resumedLeases,
      revokedLeases,
      unlistedLeases,
      reaped,
      ...(reapCause ? { reapCause } : {}),
    };
  });
}

/** A hello refused because another principal's session holds the worker id. */
export function notTheOwner(principal: string, hello: HelloInput): LeaseholdError {
  return new LeaseholdError(
    Code.PermissionDenied,
    `${quote(principal)} may not take over worker ${quote(hello.workerId)}: its session (live or in grace) ` +
      "was opened by another principal; use another worker_id, or wait until that session ends",
    {
      reason: SESSION_OWNED_BY_OTHER,
      metadata: { principal, right: "worker.connect", cluster: hello.cluster, worker_id: hello.workerId },
    },
  );
}

/**
 * A hello refused because it would move a worker out of a cluster in which
 * its sender may not run that worker id: the worker's record, sessions and
 * leases there are that cluster's, and so is ending them.
 */
export function notInWorkersCluster(
  principal: string,
  workerCluster: string,
  hello: HelloInput,
): LeaseholdError {
  return new LeaseholdError(
    Code.PermissionDenied,
    `${quote(principal)} lacks the right worker.connect for worker ${quote(hello.workerId)} in cluster ` +
      `${quote(workerCluster)}, where that worker is registered: moving a worker to cluster ${quote(hello.cluster)} ` +
      "takes the right to run it in both; use another worker_id, or connect as a principal allowed to run it in " +
      `${quote(workerCluster)} too; once its session has ended, an operator of ${quote(workerCluster)} frees the id ` +
      "at once with ForgetWorker (leasehold workers forget), as --worker-retention does after the worker was last seen",
    {
      reason: "PERMISSION_DENIED",
      metadata: { principal, right: "worker.connect", cluster: workerCluster, worker_id: hello.workerId },
    },
  );
}

/**
 * Whether the live session's stream may belong to another process still at
 * work: its stream is open (not recorded lost) and the session is within its
 * deadline, and both that stream's hello and this one named an instance, not
 * the same. Even a silent open stream counts until the deadline: its process
 * may still run its leases until its own deadline, which falls before the
 * session's (a crashed server's streams are recorded lost when another
 * process starts, or reaped at the deadline).
 */
export function inUseByAnother(live: LiveSessionRow, hello: HelloInput): boolean {
  return (
    !live.expired &&
    live.stream_lost_at === null &&
    live.instance_id !== "" &&
    hello.instanceId !== "" &&
    live.instance_id !== hello.instanceId
  );
}

/**
 * Whether the hello comes from a new process of the worker, whose session's
 * stream (another instance's) was recorded lost: not the same process
 * reconnecting. Both must have named an instance.
 */
export function restartedProcess(live: LiveSessionRow, hello: HelloInput): boolean {
  return (
    live.stream_lost_at !== null &&
    live.instance_id !== "" &&
    hello.instanceId !== "" &&
    live.instance_id !== hello.instanceId
  );
}

/** A hello refused because another process's open stream holds the worker's session. */
export function workerIdInUse(hello: HelloInput): LeaseholdError {
  return new LeaseholdError(
    Code.AlreadyExists,
    `worker ${quote(hello.workerId)} is connected from another process (another instance_id); ` +
      "a worker id belongs to one process: stop this one's work, use another worker_id, " +
      "or try again later, backing off from 1–2 s up to 15–30 s (the other may be a predecessor whose lost stream the server has not noticed yet)",
    { reason: WORKER_ID_IN_USE, metadata: { worker_id: hello.workerId } },
  );
}

/** The unique index that keeps one live session per worker (schema.ts). */
const ONE_LIVE_SESSION_PER_WORKER = "sessions_one_live_per_worker";

/**
 * Whether a hello's transaction failed because another transaction (another
 * hello for the same worker, on this server or another) started the worker's
 * live session first: both found no session, and the unique index let the
 * first to commit win (SQLSTATE 23505 on {@link ONE_LIVE_SESSION_PER_WORKER}).
 * Nothing of the loser was written; tried again, it finds the winner's session
 * and is answered as any hello that comes second (refused, resumed or taking
 * over). postgres.js names the index in `constraint_name`, PGlite in
 * `constraint`; drizzle wraps either in its own error (`cause`).
 */
export function lostFirstSessionRace(error: unknown): boolean {
  const e = driverError(error);
  return e?.code === "23505" && (e.constraint_name ?? e.constraint) === ONE_LIVE_SESSION_PER_WORKER;
}

/** A hello refused because the worker's live session is in another cluster. */
export function inOtherCluster(liveCluster: string, hello: HelloInput): LeaseholdError {
  return new LeaseholdError(
    Code.FailedPrecondition,
    `worker ${hello.workerId} has a live session in cluster ${liveCluster}; ` +
      `say goodbye there first, or use another worker_id for cluster ${hello.cluster}`,
    { reason: WORKER_IN_OTHER_CLUSTER },
  );
}

/** A worker's live session, as its hello reads (and locks) it. */
export interface LiveSessionRow {
  id: string;
  worker_id: string;
  stream_lost_at: unknown;
  server_id: string | null;
  principal: string;
  instance_id: string;
  /** Past its deadline. */
  expired: boolean;
}

/** A LEASED action of a resumed session, as read for its hello. */
export interface HeldRow {
  id: string;
  epoch: unknown;
  attempt_count: number;
  payload: JsonObject | null;
  run_id: string;
  checkpoint: JsonObject | null;
  cancel_requested: boolean;
  stop_reason: string | null;
  trace_parent: string | null;
}

/** Sorts a resumed session's leases by what the hello listed: resumed, revoked, or sent again. */
export function sortHeld(
  hello: HelloInput,
  held: readonly HeldRow[],
): Pick<OpenedSession, "resumedLeases" | "revokedLeases" | "unlistedLeases"> {
  const heldById = new Map<string, HeldGrant>(
    held.map((h) => [
      h.id,
      {
        actionId: h.id,
        epoch: toNumber(h.epoch),
        attempt: h.attempt_count,
        payload: h.payload,
        runId: h.run_id,
        checkpoint: h.checkpoint,
        traceParent: h.trace_parent,
        cancelRequested: h.cancel_requested,
        stopReason: h.stop_reason,
      },
    ]),
  );
  const resumedLeases: HeldGrant[] = [];
  const revokedLeases: { actionId: string; epoch: number }[] = [];
  const resumedIds = new Set<string>();
  for (const lease of hello.heldLeases) {
    const current = heldById.get(lease.actionId);
    if (current && current.epoch === lease.epoch) {
      resumedLeases.push(current);
      resumedIds.add(lease.actionId);
    } else revokedLeases.push(lease);
  }
  // Held and not resumed: never listed, or listed at an older epoch (the worker missed the
  // newer grant and the answer to its report on the old one): the grant is sent again.
  const unlistedLeases = [...heldById.values()].filter((h) => !resumedIds.has(h.actionId));
  return { resumedLeases, revokedLeases, unlistedLeases };
}

/** An event a hello writes (worker, cluster, session and actor are the hello's). */
export type HelloEvent = Omit<WorkerEvent, "worker_id" | "cluster" | "session_id" | "actor">;

/**
 * Most leases a hello listed and does not hold that get an event each: a hello may list up to
 * 20,000 (twice the largest capacity), and an event each made one hello a transaction of 20,000
 * inserts that held the process for a second. All are revoked; the session's event counts them.
 */
export const MAX_REVOKE_EVENTS_PER_HELLO = 64;

/**
 * The events of one hello: the session's start, resume or takeover, then each listed lease's fate.
 * `late`: the session was resumed past its deadline, kept by its cluster's partition (SPEC rule
 * 10) or by its server's failed renewals (rule 7); its events say so (`details.late`).
 */
export function helloEvents(
  hello: HelloInput,
  resumed: boolean,
  tookOver: boolean,
  resumedLeases: readonly HeldGrant[],
  revokedLeases: readonly { actionId: string; epoch: number }[],
  late = false,
): HelloEvent[] {
  const kind = !resumed ? "session_started" : tookOver ? "session_taken_over" : "session_resumed";
  const message = !resumed
    ? `worker ${hello.workerId} started a session (capacity ${hello.capacity})`
    : tookOver
      ? `a new stream of worker ${hello.workerId} took the session over; the older stream is closed`
      : late
        ? `worker ${hello.workerId} reconnected after its deadline and resumed its session, kept while its cluster was partitioned (or while its server could not renew it)`
        : `worker ${hello.workerId} reconnected within grace and resumed its session`;
  const details = late ? { late: true } : null;
  const unrecorded = revokedLeases.length - MAX_REVOKE_EVENTS_PER_HELLO;
  const counted =
    unrecorded > 0
      ? `${message}; it listed ${revokedLeases.length} leases it does not hold, all revoked, ` +
        `the first ${MAX_REVOKE_EVENTS_PER_HELLO} recorded as events`
      : message;
  return [
    { kind, action_id: null, epoch: null, message: counted, details },
    ...resumedLeases.map((l) => ({
      kind: "lease_resumed",
      action_id: l.actionId,
      epoch: l.epoch,
      message: `lease resumed by worker ${hello.workerId} (epoch ${l.epoch})`,
      details,
    })),
    // The worker chose these (action, epoch) pairs: an event names only an action of its cluster
    // (insertWorkerEvents), and says whether the worker ever held that lease.
    ...revokedLeases.slice(0, MAX_REVOKE_EVENTS_PER_HELLO).map((l) => ({
      kind: "lease_revoked",
      action_id: l.actionId,
      epoch: l.epoch,
      message: `worker ${hello.workerId} listed a lease it no longer holds (epoch ${l.epoch}); revoked`,
      named: {
        action_id: l.actionId,
        epoch: l.epoch,
        // Not "it never held": after a restore of the database it did, and the database forgot.
        never_message: `worker ${hello.workerId} listed a lease (epoch ${l.epoch}) this database has no record of granting it; revoked`,
        lost_message:
          `worker ${hello.workerId} listed a lease (epoch ${l.epoch}) this database has no record of granting it: ` +
          "the database lost grants it had made (restored from an older backup, or a standby promoted after " +
          "losing commits); revoked",
        foreign_message: `worker ${hello.workerId} listed a lease it never held (not an action of cluster ${hello.cluster}); revoked`,
      },
    })),
  ];
}
