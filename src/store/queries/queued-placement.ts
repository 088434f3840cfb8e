import { sql } from "drizzle-orm";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";

/** Why a connected worker that carries an action's labels takes no grant now, or that it could. */
export type FitKind = "draining" | "stopped" | "busy" | "free";

/** What the workers hosted by the calling process are doing that the database does not hold. */
export interface HostedGrantState {
  /** The id this process writes on the sessions it hosts (`sessions.server_id`). */
  readonly serverId: string;
  /** The hosted sessions whose worker takes no more grants (StopGrants, Hello.stop_grants). */
  readonly grantsStopped: readonly string[];
}

/**
 * Where a queued action could go now: its cluster's live sessions, judged by
 * the claim's own rule (`label_selector <@ labels`, see claim-actions.ts).
 * Counts, and a few workers by name, whatever the size of the cluster.
 */
export interface Placement {
  /** Workers of the cluster with an open stream: only they are granted actions. */
  readonly connected: number;
  /** Workers of the cluster whose stream is lost and whose session lives on (in grace): no grants. */
  readonly inGrace: number;
  /**
   * Connected workers whose labels carry the action's selector, by what keeps
   * each from taking it: draining (DrainWorker), stopped (took no more grants:
   * known only of sessions hosted by the calling process), busy (every slot
   * holds a lease), or free. `first` is the least worker id of each.
   */
  readonly fit: Readonly<Partial<Record<FitKind, { readonly n: number; readonly first: string }>>>;
  /** Up to three free fitting workers, those hosted by the calling process first, then by id. */
  readonly free: readonly {
    readonly workerId: string;
    readonly freeSlots: number;
    readonly hostedHere: boolean;
  }[];
  /**
   * When none fits: each selector label (by key) with the number of connected
   * workers that carry it; empty otherwise.
   */
  readonly carried: readonly { readonly key: string; readonly value: string; readonly workers: number }[];
  /**
   * When none fits: up to three connected workers that carry the most
   * selector labels (then by id), each with its values of the selector's keys.
   */
  readonly closest: readonly {
    readonly workerId: string;
    readonly labels: Readonly<Record<string, string>>;
  }[];
}

/**
 * Reads where a queued action of `cluster` with `selector` could go, in one
 * statement (ExplainAction's read path, not the claim's). It reads the
 * cluster's workers (workers_cluster_idx) with their live session
 * (sessions_one_live_per_worker), and the leases of the fitting connected
 * ones (actions_session_idx): as many rows as the cluster has workers, and an
 * answer of a few dozen values.
 */
export async function readPlacement(
  db: Db,
  cluster: string,
  selector: Readonly<Record<string, string>>,
  hosted: HostedGrantState | undefined,
): Promise<Placement> {
  const sel = JSON.stringify(selector);
  const stopped = JSON.stringify(hosted?.grantsStopped ?? []);
  // Without a hosting process (tests of the service alone), every session counts as hosted here.
  const serverId = hosted?.serverId ?? null;
  const [row] = await queryRows<{
    connected: number;
    in_grace: number;
    fit: Record<string, { n: number; first: string }> | null;
    free: { worker_id: string; free_slots: number; here: boolean }[] | null;
    carried: { key: string; value: string; workers: number }[] | null;
    closest: { worker_id: string; labels: Record<string, string> }[] | null;
  }>(
    db,
    sql`
      with live as (
        select w.worker_id, w.labels, w.capacity, w.draining, s.id as session_id,
               coalesce(s.server_id = ${serverId}::text, true) as here, s.stream_lost_at is null as connected
        from workers w join sessions s on s.worker_id = w.worker_id and s.ended_at is null
        where w.cluster = ${cluster}
      ),
      -- The claim's rule (claim-actions.ts, settle-and-grant.ts): an empty selector fits any worker.
      fitting as (
        select l.worker_id, l.here,
          l.capacity - (select count(*) from actions a where a.session_id = l.session_id and a.state = 'LEASED')
            as free_slots,
          case
            when l.draining then 'draining'
            when l.session_id in (select jsonb_array_elements_text(${stopped}::jsonb)) then 'stopped'
            else null end as held_back
        from live l
        where l.connected and (${sel}::jsonb = '{}'::jsonb or ${sel}::jsonb <@ l.labels)
      ),
      judged as (
        select worker_id, here, free_slots,
          coalesce(held_back, case when free_slots > 0 then 'free' else 'busy' end) as kind
        from fitting
      ),
      none_fits as (select not exists (select 1 from fitting) as yes),
      near as (
        select l.worker_id,
          (select count(*) from jsonb_each_text(${sel}::jsonb) e where l.labels ->> e.key = e.value) as hits,
          (select coalesce(jsonb_object_agg(e.key, l.labels ->> e.key), '{}'::jsonb)
             from jsonb_each_text(${sel}::jsonb) e where l.labels ->> e.key is not null) as labels
        from live l
        where l.connected and (select yes from none_fits)
        order by hits desc, l.worker_id
        limit 3
      )
      select
        (select count(*) from live where connected)::int as connected,
        (select count(*) from live where not connected)::int as in_grace,
        (select jsonb_object_agg(kind, jsonb_build_object('n', n, 'first', first))
           from (select kind, count(*)::int as n, min(worker_id) as first from judged group by kind) k) as fit,
        (select jsonb_agg(jsonb_build_object('worker_id', worker_id, 'free_slots', free_slots, 'here', here)
                          order by here desc, worker_id)
           from (select * from judged where kind = 'free' order by here desc, worker_id limit 3) f) as free,
        (select jsonb_agg(jsonb_build_object('key', e.key, 'value', e.value, 'workers',
                  (select count(*) from live l where l.connected and l.labels ->> e.key = e.value))
                  order by e.key)
           from jsonb_each_text(${sel}::jsonb) e where (select yes from none_fits)) as carried,
        (select jsonb_agg(jsonb_build_object('worker_id', worker_id, 'labels', labels) order by hits desc, worker_id)
           from near) as closest`,
  );
  return {
    connected: row?.connected ?? 0,
    inGrace: row?.in_grace ?? 0,
    fit: (row?.fit ?? {}) as Placement["fit"],
    free: (row?.free ?? []).map((f) => ({
      workerId: f.worker_id,
      freeSlots: Number(f.free_slots),
      hostedHere: f.here,
    })),
    carried: (row?.carried ?? []).map((c) => ({ key: c.key, value: c.value, workers: Number(c.workers) })),
    closest: (row?.closest ?? []).map((c) => ({ workerId: c.worker_id, labels: c.labels })),
  };
}
