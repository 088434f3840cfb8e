import { type SQL, sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toDate, toNumber } from "../rows.js";

/** A lease that expired with its session. */
export interface ExpiredLease {
  readonly actionId: string;
  readonly epoch: number;
  readonly workerId: string;
  readonly sessionId: string;
  readonly cluster: string;
  /** QUEUED (re-queued), FAILED (system-retry budget exhausted) or CANCELLED (cancel was requested). */
  readonly state: "QUEUED" | "FAILED" | "CANCELLED";
  /** Set when its session's server process went silent (cause `server_silent`, see {@link SilentServer}). */
  readonly silentServer: SilentServer | undefined;
}

/**
 * The server process a reaped session's stream was on (as last recorded)
 * when that process had stopped marking itself alive (server-liveness.ts):
 * its deadline passed because its server stopped renewing it (it lost its
 * database, hung or died), not because the worker fell silent.
 */
export interface SilentServer {
  readonly serverId: string;
  /** When the process's last liveness mark ran out (the mark plus a few heartbeat intervals). */
  readonly aliveUntil: Date;
}

/** A cluster that entered or left the partitioned state (SPEC rule 10), with the counts that decided. */
export interface PartitionChange {
  readonly cluster: string;
  readonly partitioned: boolean;
  /** Live sessions of the cluster holding leases, without a stream. */
  readonly lost: number;
  /** Live sessions of the cluster holding leases. */
  readonly live: number;
}

/**
 * Why a reap ended a session, as its session_reaped and lease_expired events
 * say in `details.cause`: `deadline`, it passed its deadline unheard (or past
 * the maximum silence); `server_silent`, it passed its deadline while its
 * stream was on a server process (as last recorded) that had stopped marking
 * itself alive, so that process stopped renewing it (details `server_id` and
 * `server_alive_until`, when its last mark ran out); `restarted`, a new
 * process of its worker said hello while its stream was gone. Events written
 * before this field have none.
 */
export type ReapCause = "deadline" | "server_silent" | "restarted";

/** What one reap did. */
export interface ReapResult {
  readonly sessions: readonly {
    sessionId: string;
    workerId: string;
    silentServer: SilentServer | undefined;
  }[];
  readonly expired: readonly ExpiredLease[];
  readonly partitions: readonly PartitionChange[];
  /**
   * The earliest deadline of a live session not yet passed (database clock),
   * from any process: when the reaper has something to do next. Null when no
   * session is live. Deadlines only ever move later (renewals, reconnects,
   * restarts), so nothing can become due before it except sessions created
   * later, whose deadline is a whole grace period away.
   */
  readonly nextDeadline: Date | null;
  /** The database time the statement ran at, to convert `nextDeadline` to a local time. */
  readonly dbNow: Date;
}

/**
 * Sessions this process hosts whose renewal it could not write (SPEC rule 7):
 * their deadlines in the database are stale, not the workers' silence, so
 * this process's reaper leaves them alone. Other processes still reap them at
 * the stored deadline: a process that cannot renew may be dead.
 */
export interface KeepHosted {
  readonly serverId: string;
  /** The stream tokens of the streams still open on this process. */
  readonly streamTokens: readonly string[];
}

/** Fewer lost sessions holding leases than this never partition a cluster: one lost worker is just a lost worker. */
export const PARTITION_MIN_LOST = 2;

/**
 * Reaps sessions past their deadline (SPEC rule 3), in one statement: the
 * sessions end, each lease they hold expires (attempt LEASE_EXPIRED, event
 * `lease_expired` with the documented text), and each action goes back to
 * QUEUED, or FAILED once its system-retry budget is spent, or CANCELLED if a
 * cancel was pending.
 *
 * Locking: `for update skip locked` on the due sessions, so several processes
 * may reap at once without reaping a session twice; a session another process
 * is renewing at this instant is either renewed first (then not due) or
 * reaped first (then its renewal finds it ended and closes the stream).
 *
 * The mass-disconnect valve (SPEC rule 10) is decided in the same statement.
 * It weighs the sessions holding leases, whose work a reap would run again:
 * a session without one loses nothing when reaped, and counting those let any
 * client that may open sessions (all of them on a server without
 * authentication) pause a cluster's expiries by opening and dropping a few
 * dozen. A session counts as lost when its stream is known lost or its
 * deadline has passed (a stream that went silent without closing, or a
 * database outage, looks like that); a stream a server ended on purpose (its
 * handover at a close, or a rebalancing move: `stream_handed_over`) is not
 * lost until its worker had a quarter of the grace period to reconnect
 * (`graceMs`; at once without it), or its deadline passes. Nor is a session silent longer than
 * `maxSilenceMs`: such a session is neither counted nor kept, as rule 6
 * bounds restarts. For
 * each cluster with a session due (or already partitioned), when more than
 * `partitionShare` of its live sessions, and at least
 * {@link PARTITION_MIN_LOST}, are lost, the cluster is marked partitioned
 * and none of its sessions is reaped; once the share drops, the mark clears
 * and reaping goes on. An operator's resume (expiries_resumed_at) lets
 * reaping go on while the mark stays.
 *
 * `sessionIds` limits the reap to named sessions: a hello that finds its own
 * session past its deadline. That reap obeys the valve (the worker is back in
 * time after all) unless `obeyValve` is false (the worker moved to another
 * cluster, so its old session must end), and it never marks or clears a
 * partition: the periodic reap does that, and logs it.
 *
 * `keep` names the sessions this process hosts whose renewal it failed to
 * write; they are never reaped here (see {@link KeepHosted}).
 *
 * A session due while its stream was on a server process whose liveness
 * mark had run out is reaped all the same (that process may be dead), but
 * its events say why (cause `server_silent`, see {@link SilentServer}): the
 * same statement joins the due sessions to server_processes, no round trip
 * per session.
 *
 * `restarted` (with `sessionIds` only) reaps the named sessions before their
 * deadline: a new process of their worker said hello while their stream was
 * gone, so the process that held their leases is gone too (or fenced by the
 * epochs the leases get next). Their leases expire as at a deadline, each
 * charged to its action's system retries.
 */
export async function reapSessions(
  db: Db,
  clock: Clock,
  options: {
    limit: number;
    partitionShare: number;
    maxSilenceMs: number;
    sessionIds?: readonly string[];
    obeyValve?: boolean;
    keep?: KeepHosted | undefined;
    restarted?: boolean;
    /**
     * The grace period: at a partition's end, the sessions it kept past their
     * deadline get this long from now to come back (periodic reaps only).
     */
    graceMs?: number;
  },
): Promise<ReapResult> {
  const now = clock.now();
  const restarted = options.sessionIds !== undefined && options.restarted === true;
  // How long an agent told to reconnect elsewhere has to do so before its session counts as lost
  // for the valve: its backoff is at most grace/8 (SPEC rule 11), so grace/4 leaves it room. Not
  // its whole deadline: handed-over deadlines are spread over an interval, and judged one by one
  // they would never add up to a partition.
  const reconnectWindowMs = Math.round((options.graceMs ?? 0) / 4);
  /** Due: past the deadline, or any named session of a restarted worker. */
  const due: SQL = restarted ? sql`true` : sql`s.deadline < ${now}`;
  /** Why the sessions end, in their session_reaped and lease_expired events' details (see ReapCause). */
  const cause: ReapCause = restarted ? "restarted" : "deadline";
  /** The cause of a session with its `silent_host` row `h` (left-joined). */
  const causeOf = (h: string) =>
    sql.raw(`case when ${h}.id is null then `).append(sql`${cause}::text else 'server_silent' end`);
  /** The details a silent server adds (nothing without one). */
  const hostDetails = (h: string) =>
    sql.raw(
      `case when ${h}.id is null then '{}'::jsonb else jsonb_build_object('server_id', ${h}.server_id, 'server_alive_until', ${h}.alive_until) end`,
    );
  const which: SQL = options.sessionIds
    ? sql`and s.id in (select jsonb_array_elements_text(${JSON.stringify(options.sessionIds)}::jsonb))`
    : sql``;
  const periodic = options.sessionIds === undefined;
  const obeyValve = options.obeyValve ?? true;
  const kept: SQL = options.keep
    ? sql`and not (s.server_id = ${options.keep.serverId} and s.stream_token in
          (select jsonb_array_elements_text(${JSON.stringify(options.keep.streamTokens)}::jsonb)))`
    : sql``;
  const silentSince = sql`${now} - make_interval(secs => ${options.maxSilenceMs} / 1000.0)`;
  const rows = await queryRows<{
    kind: "session" | "lease" | "partitioned" | "recovered" | "next";
    session_id: string;
    worker_id: string;
    action_id: string | null;
    epoch: unknown;
    cluster: string | null;
    state: ExpiredLease["state"] | null;
    lost: unknown;
    live: unknown;
    next_deadline: unknown;
    db_now: unknown;
    server_id: string | null;
    server_alive_until: unknown;
  }>(
    db,
    sql`
      with watched as (
        select w.cluster as name from sessions s join workers w on w.worker_id = s.worker_id
        where s.ended_at is null and ${due} ${which}
        ${periodic ? sql`union select name from clusters where partitioned_at is not null` : sql``}
      ),
      verdict as (
        select c.name, c.partitioned_at, c.expiries_resumed_at, n.lost, n.live,
          ${obeyValve}::boolean and (n.lost >= ${PARTITION_MIN_LOST}
            and n.lost > n.live * ${options.partitionShare}::float8
            -- A hello of a session the mark kept past its deadline: back in time after all, though
            -- its own return (and those before it) may already have brought the share down.
            or ${!periodic}::boolean and c.partitioned_at is not null and c.expiries_resumed_at is null) as over
        from watched
        join clusters c on c.name = watched.name
        cross join lateral (
          select count(*) filter (where s.deadline < ${now} or s.stream_lost_at is not null
                                   and (not s.stream_handed_over or s.stream_lost_at < ${now} - ${reconnectWindowMs}::bigint * interval '1 millisecond')) as lost,
                 count(*) as live
          from sessions s join workers w on w.worker_id = s.worker_id
          where w.cluster = c.name and s.ended_at is null and s.last_heard_at >= ${silentSince}
            and exists (select 1 from actions a where a.session_id = s.id and a.state = 'LEASED')
        ) n
      ),
      entered as (
        update clusters c set partitioned_at = ${now}, expiries_resumed_at = null
        from verdict v where c.name = v.name and v.over and c.partitioned_at is null and ${periodic}::boolean
        returning c.name, v.lost, v.live
      ),
      recovered as (
        update clusters c set partitioned_at = null, expiries_resumed_at = null
        from verdict v where c.name = v.name and not v.over and c.partitioned_at is not null and ${periodic}::boolean
        returning c.name, v.lost, v.live
      ),
      -- At a partition's end, the sessions it kept past their deadline are not reaped in the same
      -- statement: the workers came back together, and those a moment behind the first ones
      -- (reconnecting in the same second) would lose their leases for it. Each gets a grace period
      -- from now, as at a restart (rule 6), bounded by the maximum silence as the pause was.
      -- Locked skipping what is locked, as the start extension does: a session locked now is being
      -- renewed, resumed or reaped, and waiting for it could deadlock against a batch of them.
      reprieve as (
        select s.id from sessions s
        join workers w on w.worker_id = s.worker_id
        join verdict v on v.name = w.cluster
        where ${periodic}::boolean and not v.over and v.partitioned_at is not null
          and v.expiries_resumed_at is null
          and s.ended_at is null and s.deadline < ${now} and s.last_heard_at >= ${silentSince}
        for update of s skip locked
      ),
      reprieved as (
        update sessions s set deadline = ${now} + make_interval(secs => ${options.graceMs ?? 0} / 1000.0)
        from reprieve r where s.id = r.id
        returning s.id, s.deadline
      ),
      partition_events as (
        insert into events (kind, cluster, message, details)
        select 'cluster_partitioned', name,
          'cluster ' || name || ' is partitioned: ' || lost || ' of ' || live
          || ' sessions holding leases lost (stream closed or silent past the deadline); lease expiries are paused until they reconnect or an operator resumes them',
          jsonb_build_object('lost', lost, 'live', live)
        from entered
        union all
        select 'cluster_recovered', name,
          'cluster ' || name || ' is no longer partitioned (' || lost || ' of ' || live
          || ' sessions holding leases lost); lease expiries go on',
          jsonb_build_object('lost', lost, 'live', live)
        from recovered
      ),
      due as (
        select s.id, s.server_id, s.stream_lost_at from sessions s
        where s.ended_at is null and ${due} ${which} ${kept}
          and s.id not in (select id from reprieved)
          and (s.last_heard_at < ${silentSince} or not exists (
            select 1 from workers w join verdict v on v.name = w.cluster
            where w.worker_id = s.worker_id and v.over and v.expiries_resumed_at is null
          ))
        order by s.deadline
        limit ${options.limit}
        for update of s skip locked
      ),
      ended as (
        update sessions s set ended_at = ${now}, end_reason = 'reaped', server_id = null, stream_token = null
        from due where s.id = due.id
        returning s.id, s.worker_id, s.last_heard_at
      ),
      -- Due sessions whose stream was on a server process (as last recorded: no loss of it
      -- recorded) whose liveness mark had run out (server-liveness.ts): that process stopped
      -- renewing them (it lost its database, hung or died) while the worker was connected to it,
      -- so the worker's silence is not what passed the deadline. A process closed cleanly has no
      -- row (its streams ended first); with PGlite there are none at all.
      silent_host as (
        select due.id, p.id as server_id, p.alive_until from due
        join server_processes p on p.id = due.server_id
        where ${!restarted}::boolean and due.stream_lost_at is null and p.alive_until < ${now}
      ),
      -- What ListWorkers shows of an offline worker: when its last session last heard from it.
      seen as (
        update workers w set last_seen_at = greatest(w.last_seen_at, ended.last_heard_at)
        from ended where w.worker_id = ended.worker_id
      ),
      -- The leases of the ended sessions, locked in id order (see the actions table, schema.ts).
      expiring as (
        select a.id, ended.id as session_id, ended.worker_id from actions a join ended on a.session_id = ended.id
        where a.state = 'LEASED'
        order by a.id
        for update of a
      ),
      expired as (
        update actions a set
          state = case
            when a.cancel_requested then 'CANCELLED'
            when a.system_retry_count + 1 > a.max_system_retries then 'FAILED'
            else 'QUEUED' end,
          system_retry_count = a.system_retry_count + case when a.cancel_requested then 0 else 1 end,
          failure_reason = case
            when a.cancel_requested then a.failure_reason
            when a.system_retry_count + 1 > a.max_system_retries then
              'lease expired ' || (a.system_retry_count + 1) || ' times (last: worker ' || x.worker_id
              || ', cluster ' || a.cluster || ', epoch ' || a.epoch || '); the system-retry budget of '
              || a.max_system_retries || ' is exhausted'
            else a.failure_reason end,
          finished_at = case
            when a.cancel_requested or a.system_retry_count + 1 > a.max_system_retries then ${now}
            else null end,
          session_id = null, worker_id = null, granted_at = null, not_before = ${now}, updated_at = ${now}
        from expiring x
        where a.id = x.id
        returning a.id, a.epoch, a.cluster, a.state, x.session_id, x.worker_id
      ),

      attempts_ended as (
        update attempts t set outcome = 'LEASE_EXPIRED', ended_at = ${now}
        from expired e where t.action_id = e.id and t.epoch = e.epoch
      ),
      expiry_events as (
        insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, details)
        select 'lease_expired', e.id, e.worker_id, e.cluster, e.session_id, e.epoch,
          'lease expired for action ' || e.id || ' (worker ' || e.worker_id || ', cluster ' || e.cluster
          || ', epoch ' || e.epoch || ')',
          jsonb_build_object('cause', ${causeOf("h")}, 'state', e.state) || ${hostDetails("h")}
        from expired e left join silent_host h on h.id = e.session_id
        union all
        select 'action_failed', e.id, e.worker_id, e.cluster, e.session_id, e.epoch,
          'action failed: system-retry budget exhausted', null
        from expired e where e.state = 'FAILED'
        union all
        select 'action_cancelled', e.id, e.worker_id, e.cluster, e.session_id, e.epoch,
          'action cancelled (its lease expired while the cancel was pending)', null
        from expired e where e.state = 'CANCELLED'
      ),
      session_events as (
        insert into events (kind, worker_id, cluster, session_id, message, details)
        select 'session_reaped', ended.worker_id, w.cluster, ended.id,
          'session of worker ' || ended.worker_id || ${
            restarted
              ? " reaped: a new process of the worker connected while the stream of this one was gone"
              : " reaped at its deadline"
          } || case when h.id is null then '' else
            ': its server process ' || h.server_id || ' stopped renewing it (its liveness mark ran out at '
            || to_char(h.alive_until at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
            || ': it lost its database, hung or died) while the worker was connected to it' end,
          jsonb_build_object('cause', ${causeOf("h")}) || ${hostDetails("h")}
        from ended join workers w on w.worker_id = ended.worker_id
        left join silent_host h on h.id = ended.id
      )
      select 'session' as kind, ended.id as session_id, worker_id, null as action_id, null as epoch,
             null as cluster, null as state, null::bigint as lost, null::bigint as live,
             null::timestamptz as next_deadline, null::timestamptz as db_now,
             h.server_id, h.alive_until as server_alive_until
      from ended left join silent_host h on h.id = ended.id
      union all
      select 'lease', session_id, worker_id, e.id, epoch, cluster, state, null, null, null, null,
             h.server_id, h.alive_until
      from expired e left join silent_host h on h.id = e.session_id
      union all
      select 'partitioned', null, null, null, null, name, null, lost, live, null, null, null, null from entered
      union all
      select 'recovered', null, null, null, null, name, null, lost, live, null, null, null, null from recovered
      union all
      -- The partial index sessions_live_deadline_idx answers this with its first entry past now. The
      -- statement's snapshot does not show the deadlines it gave the reprieved: they count too.
      select 'next', null, null, null, null, null, null, null, null,
        least((select min(deadline) from sessions where ended_at is null and deadline >= ${now}),
              (select min(deadline) from reprieved)), ${now}, null, null`,
  );
  const next = rows.find((r) => r.kind === "next");
  return {
    nextDeadline: next?.next_deadline == null ? null : toDate(next.next_deadline),
    dbNow: toDate(next?.db_now),
    sessions: rows
      .filter((r) => r.kind === "session")
      .map((r) => ({ sessionId: r.session_id, workerId: r.worker_id, silentServer: silentServer(r) })),
    expired: rows
      .filter((r) => r.kind === "lease")
      .map((r) => ({
        actionId: r.action_id as string,
        epoch: toNumber(r.epoch),
        workerId: r.worker_id,
        sessionId: r.session_id,
        cluster: r.cluster as string,
        state: r.state as ExpiredLease["state"],
        silentServer: silentServer(r),
      })),
    partitions: rows
      .filter((r) => r.kind === "partitioned" || r.kind === "recovered")
      .map((r) => ({
        cluster: r.cluster as string,
        partitioned: r.kind === "partitioned",
        lost: toNumber(r.lost),
        live: toNumber(r.live),
      })),
  };
}

function silentServer(r: {
  server_id: string | null;
  server_alive_until: unknown;
}): SilentServer | undefined {
  return r.server_id == null
    ? undefined
    : { serverId: r.server_id, aliveUntil: toDate(r.server_alive_until) };
}
