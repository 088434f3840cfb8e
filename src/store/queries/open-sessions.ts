import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { uuidv7 } from "../ids.js";
import { queryRows, toDate } from "../rows.js";
import { insertWorkerEvents, type WorkerEvent } from "./insert-worker-events.js";
import {
  type HeldRow,
  type HelloInput,
  helloEvents,
  inOtherCluster,
  inUseByAnother,
  type LiveSessionRow,
  notInWorkersCluster,
  notTheOwner,
  type OpenedSession,
  restartedProcess,
  sortHeld,
  workerIdInUse,
} from "./open-session.js";

/** One hello of a batch, with who sent it. */
export interface HelloOfBatch {
  readonly hello: HelloInput;
  readonly principal: string;
  /** Whether `principal` may run the hello's worker id in a cluster (see `openSession`). */
  readonly mayRunIn: (cluster: string) => boolean;
}

/**
 * What the batch did with one hello: opened its session, refused it (nothing
 * written for it), or left it to {@link openSession} because it needs more
 * than the common case (a live session past its deadline to reap first, a
 * live session another statement holds locked, or a second hello for the
 * same worker in one batch).
 */
export type BatchOutcome =
  | { readonly opened: OpenedSession }
  | { readonly refused: Error }
  | { readonly alone: true };

/**
 * Opens or resumes the sessions of many hellos in one transaction of six
 * statements, whatever their number: while thousands of workers reconnect
 * (after a restart of the control plane), a transaction per hello would be
 * served at a few dozen a second, too slow for every worker to be back before
 * its leases expire.
 *
 * Each hello gets what `openSession` would give it alone: a live session
 * within its deadline is resumed (taken over if its stream was still open),
 * a worker without one starts a new session, listed leases are resumed or
 * revoked, and a hello for a session another principal opened, for a
 * worker live in another cluster, or for a worker of a cluster its sender may
 * not run it in, is refused without writing anything.
 * Hellos whose worker's live session is past its deadline are left alone:
 * their reap (SPEC rule 10 may pause it) goes through `openSession`.
 *
 * Rows are locked as `openSession` locks them, the worker's row before its
 * session's, in `worker_id` order, and a session some other statement holds
 * is skipped (its hello goes alone), so that a batch waits only for workers'
 * rows, which everyone locks one at a time or in that order.
 */
export async function openSessions(
  db: Db,
  clock: Clock,
  serverId: string,
  graceMs: number,
  batch: readonly HelloOfBatch[],
): Promise<BatchOutcome[]> {
  const now = sql`${clock.now()}::timestamptz`;
  const grace = sql`make_interval(secs => ${graceMs} / 1000.0)`;
  const outcomes: BatchOutcome[] = batch.map(() => ({ alone: true }));
  // A second hello for one worker waits for the first to commit: it may take that session over.
  const firstOf = new Map<string, number>();
  batch.forEach((b, i) => {
    if (!firstOf.has(b.hello.workerId)) firstOf.set(b.hello.workerId, i);
  });
  const ids = JSON.stringify([...firstOf.keys()].sort());

  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const workers = await queryRows<{
      worker_id: string;
      cluster: string;
      draining: boolean;
      drain_reason: string;
    }>(
      tx,
      sql`select worker_id, cluster, draining, drain_reason from workers
          where worker_id in (select jsonb_array_elements_text(${ids}::jsonb)) order by worker_id for update`,
    );
    // A live session another statement has locked (a renewal or a grant of the stream it
    // leaves, which lock many sessions in an order of their own) is skipped rather than waited
    // for, so a batch never closes a cycle with them; its hello goes alone.
    const lives = await queryRows<LiveSessionRow>(
      tx,
      sql`select id, worker_id, stream_lost_at, server_id, principal, instance_id, deadline < ${now} as expired
          from sessions where worker_id in (select jsonb_array_elements_text(${ids}::jsonb)) and ended_at is null
          order by worker_id for update skip locked`,
    );
    const liveOf = new Map(lives.map((l) => [l.worker_id, l]));
    // Their workers' rows are locked here, so no live session can appear or go for them meanwhile
    // but by the reaper's hand (which also skips what is locked).
    const skipped = new Set(
      (
        await queryRows<{ worker_id: string }>(
          tx,
          sql`select worker_id from sessions
              where worker_id in (select jsonb_array_elements_text(${ids}::jsonb)) and ended_at is null`,
        )
      )
        .map((l) => l.worker_id)
        .filter((w) => !liveOf.has(w)),
    );
    const workerOf = new Map(workers.map((w) => [w.worker_id, w]));

    /** The hellos this batch opens, by their index in `batch`. */
    const opening: {
      i: number;
      hello: HelloInput;
      principal: string;
      live: (typeof lives)[number] | undefined;
      sessionId: string;
      streamToken: string;
      draining: boolean;
      drainReason: string;
    }[] = [];
    for (const [workerId, i] of firstOf) {
      const { hello, principal, mayRunIn } = batch[i] as HelloOfBatch;
      const worker = workerOf.get(workerId);
      const live = liveOf.get(workerId);
      if (worker && worker.cluster !== hello.cluster && !mayRunIn(worker.cluster)) {
        outcomes[i] = { refused: notInWorkersCluster(principal, worker.cluster, hello) };
      } else if (live?.expired || skipped.has(workerId)) {
        // Left alone: its reap, or the statement holding its session, is openSession's to handle.
      } else if (live && live.principal !== principal) {
        outcomes[i] = { refused: notTheOwner(principal, hello) };
      } else if (live && inUseByAnother(live, hello)) {
        outcomes[i] = { refused: workerIdInUse(hello) };
      } else if (live && restartedProcess(live, hello)) {
        // Left alone: its predecessor's session is reaped first.
      } else if (live && worker && worker.cluster !== hello.cluster) {
        outcomes[i] = { refused: inOtherCluster(worker.cluster, hello) };
      } else {
        opening.push({
          i,
          hello,
          principal,
          live,
          sessionId: live?.id ?? uuidv7(),
          streamToken: uuidv7(),
          draining: live ? (worker?.draining ?? false) : false,
          drainReason: live && worker?.draining ? worker.drain_reason : "",
        });
      }
    }
    if (opening.length === 0) return outcomes;

    const rows = opening.map((o) => ({
      worker_id: o.hello.workerId,
      cluster: o.hello.cluster,
      capacity: o.hello.capacity,
      labels: o.hello.labels,
      agent_version: o.hello.agentVersion,
      draining: o.draining,
      drain_reason: o.drainReason,
      session_id: o.sessionId,
      stream_token: o.streamToken,
      resume: o.live !== undefined,
      principal: o.principal,
      instance_id: o.hello.instanceId,
    }));
    // Workers registered or updated, resumed sessions renewed and re-homed, new ones started: the
    // workers' rows are written first (a new session's foreign key is checked at the statement's end).
    const written = await queryRows<{ id: string; deadline: unknown; db_now: unknown }>(
      tx,
      sql`with input as (
            select * from jsonb_to_recordset(${JSON.stringify(rows)}::jsonb) as x(
              worker_id text, cluster text, capacity int, labels jsonb, agent_version text, draining boolean,
              drain_reason text,
              session_id text, stream_token text, resume boolean, principal text, instance_id text)),
          clusters_registered as (
            insert into clusters (name) select distinct cluster from input order by 1 on conflict (name) do nothing),
          registered as (
            insert into workers (worker_id, cluster, capacity, labels, agent_version, draining, drain_reason,
                                 last_seen_at)
            select worker_id, cluster, capacity, labels, agent_version, draining, drain_reason, ${now} from input
            order by worker_id
            on conflict (worker_id) do update set
              cluster = excluded.cluster, capacity = excluded.capacity, labels = excluded.labels,
              agent_version = excluded.agent_version, last_seen_at = excluded.last_seen_at,
              draining = excluded.draining, drain_reason = excluded.drain_reason),
          resumed as (
            update sessions s set deadline = greatest(s.deadline, ${now} + ${grace}), last_heard_at = ${now},
              stream_lost_at = null, stream_handed_over = false, server_id = ${serverId}, stream_token = i.stream_token,
              instance_id = i.instance_id
            from input i where i.resume and s.id = i.session_id
            returning s.id, s.deadline),
          started as (
            insert into sessions (id, worker_id, server_id, stream_token, started_at, deadline, last_heard_at, principal,
                                  instance_id)
            select session_id, worker_id, ${serverId}, stream_token, ${now}, ${now} + ${grace}, ${now}, principal,
              instance_id
            from input where not resume order by worker_id
            returning id, deadline)
          select id, deadline, ${now} as db_now from resumed
          union all select id, deadline, ${now} from started`,
    );
    const deadlineOf = new Map(written.map((w) => [w.id, w]));

    const resumedIds = opening.filter((o) => o.live).map((o) => o.sessionId);
    const held =
      resumedIds.length === 0
        ? []
        : await queryRows<HeldRow & { session_id: string }>(
            tx,
            sql`select session_id, id, epoch, attempt_count, payload, run_id, checkpoint, cancel_requested, stop_reason,
                   trace_parent
                from actions where session_id in (select jsonb_array_elements_text(${JSON.stringify(resumedIds)}::jsonb)) and state = 'LEASED'`,
          );
    const heldOf = new Map<string, HeldRow[]>();
    for (const h of held) {
      const list = heldOf.get(h.session_id);
      if (list) list.push(h);
      else heldOf.set(h.session_id, [h]);
    }

    const events: WorkerEvent[] = [];
    for (const o of opening) {
      const resumed = o.live !== undefined;
      const tookOver = resumed && o.live?.stream_lost_at === null;
      const sorted = sortHeld(o.hello, heldOf.get(o.sessionId) ?? []);
      for (const e of helloEvents(o.hello, resumed, tookOver, sorted.resumedLeases, sorted.revokedLeases)) {
        events.push({
          ...e,
          worker_id: o.hello.workerId,
          cluster: o.hello.cluster,
          session_id: o.sessionId,
          actor: o.principal,
        });
      }
      const row = deadlineOf.get(o.sessionId);
      outcomes[o.i] = {
        opened: {
          sessionId: o.sessionId,
          streamToken: o.streamToken,
          resumed,
          tookOver,
          previousServerId: o.live?.server_id ?? null,
          deadline: toDate(row?.deadline),
          dbNow: toDate(row?.db_now),
          draining: o.draining,
          drainReason: o.drainReason,
          ...sorted,
          reaped: undefined,
        },
      };
    }
    await insertWorkerEvents(tx, events);
    return outcomes;
  });
}
