import { sql } from "drizzle-orm";
import type { ActionRecord, AttemptRecord } from "../../work/action.js";
import type { EventRecord } from "../../work/event.js";
import { type ActionRow, type AttemptRow, actionFromRow, attemptFromRow } from "../action-rows.js";
import type { Db } from "../database.js";
import { type EventRow, eventFromRow } from "../events.js";
import { queryRows, toDate, toDateOrNull } from "../rows.js";
import { PARTITION_EVENT_KINDS, SESSION_EVENT_KINDS } from "../schema.js";
import { type HostedGrantState, type Placement, readPlacement } from "./queued-placement.js";

/**
 * The session that held an attempt, as its row is now, or as it was when it
 * was forgotten (the attempt keeps a copy).
 */
export interface HoldingSession {
  readonly lastHeardAt: Date;
  readonly deadline: Date;
  readonly streamLostAt: Date | null;
  readonly endedAt: Date | null;
  readonly endReason: string | null;
}

/** What ExplainAction is made from, read in one snapshot. */
export interface ActionHistory {
  readonly action: ActionRecord;
  /**
   * Oldest first, each with its session (undefined if the session's row was
   * forgotten before the attempts kept a copy of it: migration 0018).
   */
  readonly attempts: readonly { attempt: AttemptRecord; session: HoldingSession | undefined }[];
  /**
   * Oldest first: the action's events, the events of the sessions that held
   * it while they held it, and its cluster's partition events while it was
   * leased. At most `limit`.
   */
  readonly events: readonly EventRecord[];
  /** More events than `limit` exist. */
  readonly truncated: boolean;
  /** The database's clock when it was read. */
  readonly now: Date;
  /** Where the action could go now, read in the same snapshot: only while it is QUEUED. */
  readonly placement?: Placement;
}

const list = (kinds: readonly string[]) => sql.raw(`(${kinds.map((k) => `'${k}'`).join(", ")})`);

/**
 * Reads an action's history in one read-only repeatable-read transaction;
 * undefined if the action is unknown. Every part is an index range: the
 * action's events (`events_action_idx`), each holding session's events within
 * its attempt (`events_session_idx`, partial), and the cluster's partition
 * events within the leased span (`events_partition_idx`, partial). A queued
 * action also gets its {@link Placement} (`readPlacement`), judged with what
 * `hosted` says of the calling process's streams.
 */
export async function readActionHistory(
  db: Db,
  actionId: string,
  limit: number,
  hosted?: HostedGrantState,
): Promise<ActionHistory | undefined> {
  return db.transaction(
    async (tx) => {
      const t = tx as unknown as Db;
      const [row] = await queryRows<ActionRow & { db_now: unknown }>(
        t,
        sql`select *, now() as db_now from actions where id = ${actionId}`,
      );
      if (!row) return undefined;
      const action = actionFromRow(row);
      const now = toDate(row.db_now);
      const attemptRows = await queryRows<
        AttemptRow & {
          s_last_heard_at: unknown;
          s_deadline: unknown;
          s_stream_lost_at: unknown;
          s_ended_at: unknown;
          s_end_reason: string | null;
        }
      >(
        t,
        // The session's row, or once it is forgotten the copy of it its attempts kept.
        sql`select t.*, coalesce(s.last_heard_at, t.session_last_heard_at) as s_last_heard_at,
              coalesce(s.deadline, t.session_deadline) as s_deadline,
              case when s.id is null then t.session_stream_lost_at else s.stream_lost_at end as s_stream_lost_at,
              case when s.id is null then t.session_ended_at else s.ended_at end as s_ended_at,
              case when s.id is null then t.session_end_reason else s.end_reason end as s_end_reason
            from attempts t left join sessions s on s.id = t.session_id
            where t.action_id = ${actionId} order by t.epoch`,
      );
      const eventRows = await queryRows<EventRow>(
        t,
        sql`with held as (
              select session_id, started_at, coalesce(ended_at, now()) as ended_at
              from attempts where action_id = ${actionId}
            )
            select * from (
              -- Each part is cut to the limit on its own index, so that an action with a
              -- flood of events (fenced reports) is not read whole.
              -- Only the action's cluster's: a fenced report an agent of another cluster sent
              -- naming this action is recorded in that agent's cluster, which the caller may not
              -- read (its worker, session and principal).
              (select * from events where action_id = ${actionId}
                 and (cluster is null or cluster = ${action.cluster})
               order by sequence limit ${limit + 1})
              union all
              (select e.* from events e
               where e.session_id in (select session_id from held)
                 and e.kind in ${list(SESSION_EVENT_KINDS)}
                 -- exists, not a join: one session may hold the action twice.
                 and exists (select 1 from held h
                             where h.session_id = e.session_id and e.at between h.started_at and h.ended_at)
               order by e.sequence limit ${limit + 1})
              union all
              (select e.* from events e
               where e.cluster = ${action.cluster} and e.kind in ${list(PARTITION_EVENT_KINDS)}
                 and e.at between (select min(started_at) from held) and (select max(ended_at) from held)
               order by e.sequence limit ${limit + 1})
            ) x
            order by sequence
            limit ${limit + 1}`,
      );
      const placement =
        action.state === "QUEUED"
          ? await readPlacement(t, action.cluster, action.labelSelector, hosted)
          : undefined;
      return {
        action,
        attempts: attemptRows.map((r) => ({
          attempt: attemptFromRow(r),
          session:
            r.s_deadline === null
              ? undefined
              : {
                  lastHeardAt: toDate(r.s_last_heard_at),
                  deadline: toDate(r.s_deadline),
                  streamLostAt: toDateOrNull(r.s_stream_lost_at),
                  endedAt: toDateOrNull(r.s_ended_at),
                  endReason: r.s_end_reason,
                },
        })),
        events: eventRows.slice(0, limit).map(eventFromRow),
        truncated: eventRows.length > limit,
        now,
        ...(placement && { placement }),
      };
    },
    { isolationLevel: "repeatable read", accessMode: "read only" },
  );
}
