import { type SQL, sql } from "drizzle-orm";
import type { Clock } from "../clock.js";
import type { Db } from "../database.js";
import { queryRows } from "../rows.js";
import { type GrantRecord, type GrantRow, grantCtes, grantFromRow } from "./claim-actions.js";
import {
  type Finished,
  type FinishedRow,
  type FinishReport,
  finishActions,
  finishCtes,
  finishedFromRow,
} from "./finish-actions.js";

/**
 * Workers of one cluster with the same labels, and how many actions they
 * can take now in all. Every action the group claims fits every one of its
 * sessions, so claimed actions are dealt out to its slots in order.
 */
export interface SlotGroup {
  /** Index of the group in this request. */
  readonly g: number;
  readonly cluster: string;
  readonly labels: Readonly<Record<string, string>>;
  /** Free slots of the group: its number of {@link Slot}s. */
  readonly room: number;
}

/** One free slot: the `n`th action (1-based, by priority then age) its group claims goes to it. */
export interface Slot {
  readonly g: number;
  readonly n: number;
  readonly sessionId: string;
  readonly streamToken: string;
  readonly workerId: string;
}

/** What the claim half of {@link settleAndGrant} fills. */
export interface ClaimRequest {
  readonly groups: readonly SlotGroup[];
  readonly slots: readonly Slot[];
}

export interface Settled {
  /** The reports applied (or already applied: see `finishActions`); a missing key was fenced. */
  readonly finished: Finished[];
  readonly grants: GrantRecord[];
  /**
   * Queued actions each group claimed, by `SlotGroup.g` (absent: none).
   * Fewer than its room means its queue had no more that were free to take.
   */
  readonly claimed: ReadonlyMap<number, number>;
}

/**
 * The hot path in ONE statement and one commit: applies finishing reports
 * exactly as `finishActions` does, and claims and grants queued actions to
 * free slots (typically the slots those very reports free) as
 * `claimActions` + `grantActions` do. Either half may be absent. One
 * statement instead of a transaction of several: the per-statement cost,
 * not the commit, is what limits throughput (research/pg-limits.md).
 *
 * Locking: the reports lock their LEASED actions (`for update`); each group
 * locks up to `room` QUEUED actions of its cluster that its labels satisfy
 * (`for update skip locked`, so processes sharing the database claim disjoint
 * sets); the target sessions are locked `for share` before the grant, so no
 * grant lands on a session that is ending or was taken over. One snapshot
 * serves the whole statement: an action a report here re-queues is not
 * claimed by the same statement (the caller claims again).
 *
 * An action claimed by two groups (it fits both) is granted once; the other
 * group's slot stays free until the next claim.
 */
export async function settleAndGrant(
  db: Db,
  clock: Clock,
  reports: readonly FinishReport[],
  claim: ClaimRequest | undefined,
): Promise<Settled> {
  const settling = reports.length > 0;
  const claiming = claim !== undefined && claim.slots.length > 0;
  if (!settling && !claiming) return { finished: [], grants: [], claimed: new Map() };
  const now = clock.now();
  const ctes: SQL[] = [];
  const selects: SQL[] = [];
  if (settling) {
    ctes.push(finishCtes(reports, now));
    selects.push(
      sql`select 'f' as t, k, id, state, ${NO_GRANT} from f_updated`,
      sql`select 'f', k, id, state, ${NO_GRANT} from f_repeated`,
    );
  }
  if (claiming) {
    ctes.push(claimCtes(claim, now), grantCtes(now));
    selects.push(
      // k: the grant's rank in its group's claim (priority, then age), the order to send grants in.
      sql`select 'g' as t, (select min(c.n) from c_claimed c where c.id = gg.id)::int as k, id,
                 null::text as state, session_id, worker_id, cluster, epoch, attempt_count,
                 payload, run_id, checkpoint, trace_parent
          from g_granted gg`,
      // The number claimed per group, carried in the state column.
      sql`select 'c', g, null::text, count(*)::text, ${NO_GRANT} from c_claimed group by g`,
    );
  }
  const rows = await queryRows<{ t: "f" | "g" | "c" } & FinishedRow & GrantRow>(
    db,
    sql`with ${sql.join(ctes, sql`,`)} ${sql.join(selects, sql` union all `)}`,
    { prepared: true },
  );
  const finished: Finished[] = [];
  const grants: GrantRecord[] = [];
  const ranked: { rank: number; grant: GrantRecord }[] = [];
  const claimed = new Map<number, number>();
  for (const r of rows) {
    if (r.t === "f") finished.push(finishedFromRow(r));
    else if (r.t === "g") ranked.push({ rank: r.k, grant: grantFromRow(r) });
    else claimed.set(r.k, Number(r.state));
  }
  ranked.sort((a, b) => a.rank - b.rank);
  for (const r of ranked) grants.push(r.grant);
  if (settling && finished.length < reports.length)
    finished.push(...(await lookAgain(db, clock, reports, finished)));
  return { finished, grants, claimed };
}

/**
 * The reports the statement did not apply, looked at again in a statement of
 * their own. Each may be stale (fenced), or a copy sent again while its first
 * copy was still committing: the statement's snapshot, taken before that
 * commit, saw the attempt still running, so it could tell neither that the
 * attempt ended the same way nor wait for it (a row that does not match is
 * never locked). A new snapshot sees the first copy's commit, and accepts the
 * copy as a repeat. Costs a statement only in a round with a report refused.
 */
async function lookAgain(
  db: Db,
  clock: Clock,
  reports: readonly FinishReport[],
  finished: readonly Finished[],
): Promise<Finished[]> {
  const applied = new Set(finished.map((f) => f.key));
  const keys: number[] = [];
  for (let k = 0; k < reports.length; k++) if (!applied.has(k)) keys.push(k);
  // The main statement committed: its failing would make the whole round's outcome unknown.
  // These reports are then answered as before this second look (fenced); an agent's copy
  // sent again is accepted as a repeat.
  const again = await finishActions(
    db,
    clock,
    keys.map((k) => reports[k] as FinishReport),
  ).catch(() => []);
  return again.map((f) => ({ key: keys[f.key] as number, actionId: f.actionId, state: f.state }));
}

/** The grant columns of a row that is a finished report. */
const NO_GRANT = sql.raw(
  "null::text as session_id, null::text as worker_id, null::text as cluster, null::bigint as epoch, " +
    "null::int as attempt_count, null::jsonb as payload, null::text as run_id, null::jsonb as checkpoint, " +
    "null::text as trace_parent",
);

/** Claims for each group and deals the claimed actions to its slots: defines `g_input` for `grantCtes`. */
function claimCtes(claim: ClaimRequest, now: SQL): SQL {
  const groups = JSON.stringify(
    claim.groups.map((g) => ({ g: g.g, cluster: g.cluster, labels: g.labels, room: g.room })),
  );
  const slots = JSON.stringify(
    claim.slots.map((s) => ({
      g: s.g,
      n: s.n,
      session_id: s.sessionId,
      token: s.streamToken,
      worker_id: s.workerId,
    })),
  );
  return sql`
      c_groups as (
        select * from jsonb_to_recordset(${groups}::jsonb) as x(g int, cluster text, labels jsonb, room int)
      ),
      c_claimed as (
        select c.g, c.id, row_number() over (partition by c.g order by c.priority desc, c.created_at) as n
        from c_groups grp cross join lateral (
          select grp.g, q.id, q.priority, q.created_at from actions q
          where q.state = 'QUEUED' and q.cluster = grp.cluster and q.not_before <= ${now}
            and (q.label_selector = '{}'::jsonb or q.label_selector <@ grp.labels)
          -- nulls last, as actions_claim_idx is ordered (see claim-actions.ts): read in order, no sort.
          order by q.priority desc nulls last, q.created_at
          limit grp.room
          for update of q skip locked
        ) c
      ),
      c_slots as (
        select * from jsonb_to_recordset(${slots}::jsonb) as x(
          g int, n int, session_id text, token text, worker_id text)
      ),
      g_input as (
        select distinct on (c.id) c.id, s.session_id, s.token, s.worker_id
        from c_claimed c join c_slots s on s.g = c.g and s.n = c.n
        order by c.id, c.g
      )`;
}
