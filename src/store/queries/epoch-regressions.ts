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
   * The lease the database holds at an epoch at or below the listed one (to
   * another session, or to the listing session at an older epoch): it may
   * run the action under the listed lease's fencing token. It is left to its
   * holder: a worker's word alone ends no other worker's lease.
   */
  readonly collided?: {
    readonly sessionId: string;
    readonly workerId: string;
    readonly epoch: number;
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
        -- Only a queued action changes: its next grant goes above the listed epoch. A leased one is
        -- left to its holder: a worker's word alone ends no other worker's lease (an agent listing a
        -- made-up epoch would otherwise revoke any lease of its cluster); the operator's
        -- \`leasehold db restored\`, which the error names, ends them all.
        changed as (
          update actions a set epoch = greatest(a.epoch, f.listed), updated_at = ${now}
          from found f
          where a.id = f.id and f.state = 'QUEUED' and f.listed > a.epoch
          returning a.id, a.state
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
                    || ' may run the same action under the same fencing token: it is left to its holder until '
                    || 'leasehold db restored ends it' else '' end,
            jsonb_build_object('listed_epoch', f.listed, 'stored_epoch', f.stored, 'state', f.state),
            ${listing.actor}
          from found f left join changed c on c.id = f.id
        )
        select f.id, f.listed, f.stored, f.state,
          case when f.state = 'LEASED' then f.session_id end as collided_session,
          case when f.state = 'LEASED' then f.worker_id end as collided_worker
        from found f
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
          },
        }
      : {}),
  }));
}
