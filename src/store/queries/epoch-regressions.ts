import { sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows, toNumber } from "../rows.js";
import { RESTORE_EPOCH_MARGIN } from "./mark-database-restored.js";

/** A listed lease that proves the database lost grants it had made. */
export interface EpochRegression {
  readonly actionId: string;
  /** The epoch the worker listed. */
  readonly listedEpoch: number;
  /** The action's epoch as the database had it. */
  readonly storedEpoch: number;
  /** The action's state as the database had it. */
  readonly state: string;
  /**
   * The lease the database had given at an epoch at or below the listed one
   * (to another session, or to the listing session at an older epoch): it
   * collides with the listed one, and was ended. The action's state after it:
   * QUEUED, or CANCELLED (a cancel was pending), or FAILED (its system-retry
   * budget is spent).
   */
  readonly collided?: {
    readonly sessionId: string;
    readonly workerId: string;
    readonly epoch: number;
    readonly state: string;
  };
}

/**
 * Looks at leases a worker listed (in a hello or a heartbeat) that are not
 * its session's, for proof that the database went back in time: an action
 * of the worker's cluster listed at an epoch above the one stored, or at the
 * stored epoch which the database granted to another worker (or never
 * granted). A database that never lost a commit holds every epoch it gave
 * out, each in an attempt naming the worker; a database restored from a
 * backup, or a standby promoted after losing commits, does not, and would
 * grant the same (action, epoch) a second time: two workers running one
 * action under one fencing token. For each such lease, in one statement:
 * - the action's epoch is raised to the listed one (a queued or leased
 *   action), so that its next grant is above it;
 * - a lease the database holds at an epoch at or below the listed one
 *   collides with it: the action is queued again, charged no retry (the
 *   database lost the lease; CANCELLED when a cancel was pending), so that
 *   the overlap ends as soon as the evidence arrives; the caller revokes it
 *   from its holder;
 * - an `epoch_regression` event records it (and a `lease_revoked` event the
 *   collided lease).
 * Listed epochs more than {@link RESTORE_EPOCH_MARGIN} above the stored one
 * are not taken as evidence: no restore loses that many grants of one action,
 * and a made-up epoch must not move an action's epochs towards 2^53 at will.
 * Run only for listed leases that are not the session's (the stray-lease
 * branch), never on the hot path.
 */
export async function settleEpochRegressions(
  db: Db,
  clock: Clock,
  listing: {
    readonly workerId: string;
    readonly sessionId: string;
    readonly cluster: string;
    readonly actor: string;
    readonly leases: readonly { readonly actionId: string; readonly epoch: number }[];
  },
): Promise<EpochRegression[]> {
  if (listing.leases.length === 0) return [];
  const now = clock.now();
  const input = JSON.stringify(listing.leases.map((l) => ({ action_id: l.actionId, epoch: l.epoch })));
  const rows = await queryRows<{
    id: string;
    listed: unknown;
    stored: unknown;
    state: string;
    collided_session: string | null;
    collided_worker: string | null;
    after: string | null;
  }>(
    db,
    sql`with listed as (
          select action_id, max(epoch) as epoch
          from jsonb_to_recordset(${input}::jsonb) as x(action_id text, epoch bigint)
          group by action_id
        ),
        found as (
          select a.id, x.epoch as listed, a.epoch as stored, a.state, a.session_id, a.worker_id
          from listed x join actions a on a.id = x.action_id and a.cluster = ${listing.cluster}
          where x.epoch <= a.epoch + ${RESTORE_EPOCH_MARGIN}
            and (x.epoch > a.epoch
                 or (x.epoch = a.epoch and not exists (
                       select 1 from attempts t
                       where t.action_id = a.id and t.epoch = x.epoch and t.worker_id = ${listing.workerId})))
          order by a.id
          for update of a
        ),
        changed as (
          update actions a set
            epoch = greatest(a.epoch, f.listed),
            -- No retry is charged: the database lost the lease, the action did nothing wrong; and an
            -- agent listing a lease it once held could otherwise spend another's budget until it failed.
            state = case
              when f.state <> 'LEASED' then a.state
              when a.cancel_requested then 'CANCELLED'
              else 'QUEUED' end,
            finished_at = case
              when f.state = 'LEASED' and a.cancel_requested then ${now}
              else a.finished_at end,
            session_id = case when f.state = 'LEASED' then null else a.session_id end,
            worker_id = case when f.state = 'LEASED' then null else a.worker_id end,
            granted_at = case when f.state = 'LEASED' then null else a.granted_at end,
            not_before = case when f.state = 'LEASED' then ${now} else a.not_before end,
            updated_at = ${now}
          from found f
          where a.id = f.id and f.state in ('QUEUED', 'LEASED')
          returning a.id, a.state
        ),
        attempts_ended as (
          update attempts t set outcome = 'LEASE_EXPIRED', ended_at = ${now}
          from found f
          where f.state = 'LEASED' and t.action_id = f.id and t.epoch = f.stored and t.outcome = 'RUNNING'
        ),
        regression_events as (
          insert into events (kind, action_id, worker_id, cluster, session_id, epoch, message, details, actor)
          select 'epoch_regression', f.id, ${listing.workerId}, ${listing.cluster}, ${listing.sessionId}, f.listed,
            'worker ' || ${listing.workerId} || ' listed a lease at epoch ' || f.listed || ', '
            || case when f.listed > f.stored then 'above the stored epoch ' || f.stored
                    else 'which this database granted to another worker or never granted' end
            || ': the database lost grants it had made (restored from an older backup, or a standby promoted after '
            || 'losing commits) and was not marked restored (leasehold db restored)'
            || case when c.id is not null and f.listed > f.stored then '; the epoch is raised to ' || f.listed
                    || ', so that the next grant is above it' else '' end
            || case when f.state = 'LEASED' then '; the lease of worker ' || f.worker_id || ' at epoch ' || f.stored
                    || ' collides with it and is revoked' else '' end,
            jsonb_build_object('listed_epoch', f.listed, 'stored_epoch', f.stored, 'state', f.state),
            ${listing.actor}
          from found f left join changed c on c.id = f.id
          union all
          select 'lease_revoked', f.id, f.worker_id, ${listing.cluster}, f.session_id, f.stored,
            'lease revoked: worker ' || ${listing.workerId} || ' listed epoch ' || f.listed
            || ' of this action, a grant the database lost (restored from an older backup, or failed over with loss); '
            || case c.state when 'QUEUED' then 'the action is queued again (no retry charged), its next epoch above '
                              || f.listed
                            else 'the action is cancelled, as asked' end,
            jsonb_build_object('cause', 'epoch_regression', 'state', c.state), ''
          from found f join changed c on c.id = f.id
          where f.state = 'LEASED'
          union all
          select case c.state when 'FAILED' then 'action_failed' else 'action_cancelled' end, f.id, f.worker_id,
            ${listing.cluster}, f.session_id, f.stored,
            case c.state when 'FAILED' then 'action failed: system-retry budget exhausted'
                         else 'action cancelled (its lease was revoked while the cancel was pending)' end,
            null, ''
          from found f join changed c on c.id = f.id
          where f.state = 'LEASED' and c.state in ('FAILED', 'CANCELLED')
        )
        select f.id, f.listed, f.stored, f.state,
          case when f.state = 'LEASED' then f.session_id end as collided_session,
          case when f.state = 'LEASED' then f.worker_id end as collided_worker,
          c.state as after
        from found f left join changed c on c.id = f.id
        order by f.id`,
  );
  return rows.map((r) => ({
    actionId: r.id,
    listedEpoch: toNumber(r.listed),
    storedEpoch: toNumber(r.stored),
    state: r.state,
    ...(r.collided_session !== null
      ? {
          collided: {
            sessionId: r.collided_session,
            workerId: r.collided_worker ?? "",
            epoch: toNumber(r.stored),
            state: r.after ?? "",
          },
        }
      : {}),
  }));
}
