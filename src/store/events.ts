import { type SQL, sql } from "drizzle-orm";
import type { JsonObject } from "../work/action.js";
import type { EventFilter, EventKind, EventRecord } from "../work/event.js";
import type { Db } from "./database.js";
import { type PAGE_JSON_BYTES, readPage, type SizedRow } from "./page-read.js";
import { queryRows, toDate, toNumber } from "./rows.js";

export interface EventRow {
  sequence: unknown;
  kind: string;
  at: unknown;
  action_id: string | null;
  worker_id: string | null;
  cluster: string | null;
  session_id: string | null;
  epoch: unknown;
  lease_id: string | null;
  message: string;
  details: JsonObject | null;
  actor: string;
}

export const eventFromRow = (r: EventRow): EventRecord => ({
  sequence: toNumber(r.sequence),
  kind: r.kind as EventKind,
  at: toDate(r.at),
  actionId: r.action_id,
  workerId: r.worker_id,
  cluster: r.cluster,
  sessionId: r.session_id,
  epoch: r.epoch === null ? null : toNumber(r.epoch),
  leaseId: r.lease_id,
  message: r.message,
  details: r.details,
  actor: r.actor,
});

/** Events matching `filter` with a sequence above `afterSequence`, oldest first. */
export async function listEvents(
  db: Db,
  filter: EventFilter,
  afterSequence: number,
  limit: number,
): Promise<EventRecord[]> {
  const conditions = [sql`sequence > ${afterSequence}`, ...filterConditions(filter)];
  const rows = await queryRows<EventRow>(
    db,
    sql`select * from events where ${sql.join(conditions, sql` and `)} order by sequence limit ${limit}`,
  );
  return rows.map(eventFromRow);
}

/**
 * One page of events matching `filter`: oldest first after `from`, or with
 * `newestFirst` newest first before it (from the newest when undefined). Up
 * to `limit`, fewer (`cut`) where the next would take the page's messages
 * and details past {@link PAGE_JSON_BYTES}: a page of a thousand failures
 * with messages of 64 Ki characters read nearly 200 MB.
 */
export function listEventPage(
  db: Db,
  filter: EventFilter,
  from: number | undefined,
  limit: number,
  newestFirst: boolean,
): Promise<{ items: EventRecord[]; cut: boolean }> {
  const read = async (afterKey: string | undefined, n: number): Promise<SizedRow<EventRecord>[]> => {
    const after = afterKey === undefined ? undefined : Number(afterKey);
    const conditions = [
      after === undefined ? sql`true` : newestFirst ? sql`sequence < ${after}` : sql`sequence > ${after}`,
      ...filterConditions(filter),
    ];
    const rows = await queryRows<EventRow & { json_bytes: unknown }>(
      db,
      sql`select *, octet_length(message) + coalesce(octet_length(details::text), 0) as json_bytes
          from events where ${sql.join(conditions, sql` and `)}
          order by sequence ${newestFirst ? sql`desc` : sql`asc`} limit ${n}`,
    );
    return rows.map((row) => ({ item: eventFromRow(row), jsonBytes: toNumber(row.json_bytes) }));
  };
  return readPage(read, (e) => String(e.sequence), from === undefined ? undefined : String(from), limit);
}

/** The WHERE conditions of a listing's filter (each served by an index on it and the sequence). */
function filterConditions(filter: EventFilter): SQL[] {
  const conditions: SQL[] = [];
  if (filter.actionId) conditions.push(sql`action_id = ${filter.actionId}`);
  if (filter.workerId) conditions.push(sql`worker_id = ${filter.workerId}`);
  if (filter.cluster) conditions.push(sql`cluster = ${filter.cluster}`);
  if (filter.kind) conditions.push(sql`kind = ${filter.kind}`);
  if (filter.leaseId) conditions.push(sql`lease_id = ${filter.leaseId}`);
  if (filter.clusterGlobs) conditions.push(clusterGlobsCondition(filter.clusterGlobs));
  return conditions;
}

/**
 * Whether an event's cluster matches one of `globs`; false, not null, for an
 * event without one. A glob without `*` or `?` is an equality, which the index
 * on the cluster and the sequence serves.
 */
function clusterGlobsCondition(globs: readonly string[]): SQL {
  if (globs.length === 0) return sql`false`;
  const each = globs.map((g) =>
    g.includes("*") || g.includes("?") ? sql`cluster like ${likePattern(g)}` : sql`cluster = ${g}`,
  );
  return sql`(cluster is not null and (${sql.join(each, sql` or `)}))`;
}

/** A glob (`*` any run of characters, `?` one) as a LIKE pattern, the glob's `%`, `_` and backslashes escaped. */
const likePattern = (glob: string): string =>
  glob
    .replace(/[\\%_]/g, "\\$&")
    .replace(/\*/g, "%")
    .replace(/\?/g, "_");

/**
 * Every event after `afterSequence` (matching or not, so gaps in the sequence
 * are visible), with whether each matches `filter`. Used by watches.
 */
export async function readEventsAfter(
  db: Db,
  filter: EventFilter,
  afterSequence: number,
  limit: number,
): Promise<{ event: EventRecord; matches: boolean }[]> {
  const conditions: SQL[] = [sql`true`];
  if (filter.actionId) conditions.push(sql`action_id is not distinct from ${filter.actionId}`);
  if (filter.workerId) conditions.push(sql`worker_id is not distinct from ${filter.workerId}`);
  if (filter.cluster) conditions.push(sql`cluster is not distinct from ${filter.cluster}`);
  if (filter.kind) conditions.push(sql`kind = ${filter.kind}`);
  if (filter.leaseId) conditions.push(sql`lease_id is not distinct from ${filter.leaseId}`);
  if (filter.clusterGlobs) conditions.push(clusterGlobsCondition(filter.clusterGlobs));
  const rows = await queryRows<EventRow & { matches: boolean }>(
    db,
    sql`select *, (${sql.join(conditions, sql` and `)}) as matches from events
        where sequence > ${afterSequence} order by sequence limit ${limit}`,
  );
  return rows.map((r) => ({ event: eventFromRow(r), matches: r.matches }));
}

/** The highest event sequence so far (0 when there are none). */
export async function lastEventSequence(db: Db): Promise<number> {
  const [row] = await queryRows<{ max: unknown }>(
    db,
    sql`select coalesce(max(sequence), 0) as max from events`,
  );
  return toNumber(row?.max ?? 0);
}
