import { type SQL, sql } from "drizzle-orm";
import { Code, LeaseholdError } from "../errors.js";
import type { JsonObject, NewAction } from "../work/action.js";
import type { Clock } from "./clock.js";
import type { Db } from "./database.js";
import { cancelDeploymentActions, type EndedActions } from "./deployments.js";
import { uuidv7 } from "./ids.js";
import { type PAGE_JSON_BYTES, readPage, type SizedRow } from "./page-read.js";
import { insertActions } from "./queries/insert-actions.js";
import { queryRows, retryOnConflict, toDate, toDateOrNull, toNumber } from "./rows.js";

/** OPEN, or closed by commit or rollback. */
export type ScopeLeaseState = "OPEN" | "COMMITTED" | "ROLLED_BACK";
/** Why a lease closed. EXPIRED is a rollback done by the TTL. */
export type CloseReason = "COMMITTED" | "ROLLED_BACK" | "EXPIRED";

export interface ScopeLeaseRecord {
  readonly id: string;
  readonly runtime: string;
  readonly label: string;
  readonly state: ScopeLeaseState;
  readonly closeReason: CloseReason | null;
  readonly ttlMs: number;
  readonly createdAt: Date;
  readonly expiresAt: Date;
  readonly closedAt: Date | null;
  readonly result: JsonObject | null;
  /** Resources it still owns. */
  readonly ownedResources: number;
  /** The principal that created it; with `lease.use.own` only it may use the lease. */
  readonly createdBy: string;
}

export type Ownership = "WORKSPACE" | "LEASE";

export interface ResourceRecord {
  readonly id: string;
  readonly kind: string;
  readonly ownership: Ownership;
  readonly leaseId: string | null;
  readonly createdAt: Date;
  readonly name: string | null;
  readonly sizeBytes: number | null;
  readonly sha256: string | null;
  readonly contentType: string | null;
  readonly body: JsonObject | null;
  /** Deployments: the action that runs it. */
  readonly actionId: string | null;
  /**
   * The cluster it belongs to: the runtime of the lease it was created in
   * (stored with it, so it outlives the lease's record), or a deployment's
   * runtime (the cluster it runs on) when created without a lease. Null for
   * a file or object created without a lease: it belongs to no cluster.
   */
  readonly runtime: string | null;
  /**
   * Deployments: the principal that created it (its action's creator). Files and objects made in a
   * lease: the lease's creator. Null otherwise.
   */
  readonly createdBy: string | null;
}

interface LeaseRow {
  id: string;
  runtime: string;
  label: string;
  state: ScopeLeaseState;
  close_reason: CloseReason | null;
  ttl_ms: unknown;
  created_at: unknown;
  expires_at: unknown;
  closed_at: unknown;
  result: JsonObject | null;
  owned: unknown;
  created_by: string;
}

const leaseFromRow = (r: LeaseRow): ScopeLeaseRecord => ({
  id: r.id,
  runtime: r.runtime,
  label: r.label,
  state: r.state,
  closeReason: r.close_reason,
  ttlMs: toNumber(r.ttl_ms),
  createdAt: toDate(r.created_at),
  expiresAt: toDate(r.expires_at),
  closedAt: toDateOrNull(r.closed_at),
  result: r.result,
  ownedResources: toNumber(r.owned ?? 0),
  createdBy: r.created_by,
});

interface ResourceRow {
  id: string;
  kind: string;
  ownership: Ownership;
  lease_id: string | null;
  created_at: unknown;
  name: string | null;
  size_bytes: unknown;
  sha256: string | null;
  content_type: string | null;
  body: JsonObject | null;
  action_id: string | null;
  runtime: string | null;
  created_by: string | null;
}

const resourceFromRow = (r: ResourceRow): ResourceRecord => ({
  id: r.id,
  kind: r.kind,
  ownership: r.ownership,
  leaseId: r.lease_id,
  createdAt: toDate(r.created_at),
  name: r.name,
  sizeBytes: r.size_bytes === null ? null : toNumber(r.size_bytes),
  sha256: r.sha256,
  contentType: r.content_type,
  body: r.body,
  actionId: r.action_id,
  runtime: r.runtime,
  createdBy: r.created_by,
});

/**
 * Every column but the file content, and a deployment's creator from its
 * action (where it lives; actions are never deleted); a file's or object's
 * "creator" is its lease's (`lease_owner`), whose lease.use.own reaches it. A deployment without a
 * runtime of its own (written by a server older than migration 0016 during a
 * rolling upgrade) takes its action's cluster, as before the column. Also
 * valid in `returning` of an insert or update of `resources` (unaliased).
 */
const RESOURCE_COLUMNS = sql`id, kind, ownership, lease_id, created_at, name, size_bytes, sha256, content_type, body, action_id,
  coalesce(runtime, (select a.cluster from actions a where a.id = resources.action_id)) as runtime,
  coalesce((select a.created_by from actions a where a.id = resources.action_id), lease_owner) as created_by`;
const LEASE_COLUMNS = sql`l.*, (select count(*) from resources r where r.lease_id = l.id and r.ownership = 'LEASE') as owned`;

/**
 * Opens a lease, or finds the one an earlier call of the same `actor` with
 * the same request id opened (request ids are per principal: another's never
 * matches). `actor` (the creating principal) becomes its `created_by` and the
 * actor of its `scope_lease_created` event.
 */
export async function insertScopeLease(
  db: Db,
  clock: Clock,
  input: { runtime: string; label: string; ttlMs: number; requestId: string | undefined; actor: string },
): Promise<{ lease: ScopeLeaseRecord; created: boolean }> {
  const now = clock.now();
  const id = uuidv7();
  const [row] = await queryRows<LeaseRow>(
    db,
    sql`
      with inserted as (
        insert into scope_leases (id, runtime, label, request_id, state, ttl_ms, created_at, expires_at, created_by)
        values (${id}, ${input.runtime}, ${input.label}, ${input.requestId ?? null}, 'OPEN', ${input.ttlMs},
                ${now}, ${now} + make_interval(secs => ${input.ttlMs} / 1000.0), ${input.actor})
        on conflict (created_by, request_id) do nothing
        returning *
      ),
      event as (
        insert into events (kind, lease_id, cluster, message, actor)
        select 'scope_lease_created', id, runtime,
          'scope lease created on ' || runtime || ' (ttl ' || (ttl_ms / 1000) || 's)', created_by from inserted
      )
      select *, 0 as owned from inserted`,
  );
  if (row) return { lease: leaseFromRow(row), created: true };
  const existing = await queryRows<LeaseRow>(
    db,
    sql`select ${LEASE_COLUMNS} from scope_leases l
        where l.created_by = ${input.actor} and l.request_id = ${input.requestId ?? null}`,
  );
  const [first] = existing;
  // Deleted between the insert and this read (lease delete frees its request id): rare, and safe to retry.
  if (!first)
    throw new LeaseholdError(
      Code.Aborted,
      "the lease with this request_id changed concurrently; retry the call",
    );
  return { lease: leaseFromRow(first), created: false };
}

export async function findScopeLease(db: Db, id: string): Promise<ScopeLeaseRecord | undefined> {
  const [row] = await queryRows<LeaseRow>(
    db,
    sql`select ${LEASE_COLUMNS} from scope_leases l where l.id = ${id}`,
  );
  return row && leaseFromRow(row);
}

/**
 * One page of leases in id (= creation) order, after `afterId`: up to
 * `limit`, fewer (`cut`) where the next would take the page's results past
 * {@link PAGE_JSON_BYTES}.
 */
export function listScopeLeases(
  db: Db,
  filter: { state?: ScopeLeaseState | undefined; label?: string | undefined; runtime?: string | undefined },
  afterId: string | undefined,
  limit: number,
): Promise<{ items: ScopeLeaseRecord[]; cut: boolean }> {
  const conditions: SQL[] = [sql`true`];
  if (filter.state) conditions.push(sql`l.state = ${filter.state}`);
  if (filter.label) conditions.push(sql`l.label = ${filter.label}`);
  if (filter.runtime) conditions.push(sql`l.runtime = ${filter.runtime}`);
  const read = async (after: string | undefined, n: number) => {
    const where = after ? [...conditions, sql`l.id > ${after}`] : conditions;
    const rows = await queryRows<LeaseRow & { json_bytes: unknown }>(
      db,
      sql`select ${LEASE_COLUMNS}, coalesce(octet_length(l.result::text), 0) as json_bytes
          from scope_leases l where ${sql.join(where, sql` and `)} order by l.id limit ${n}`,
    );
    return rows.map((row) => ({ item: leaseFromRow(row), jsonBytes: toNumber(row.json_bytes) }));
  };
  return readPage(read, (l) => l.id, afterId, limit);
}

/** Why an operation on a lease could not happen. */
export type LeaseRefusal =
  | { readonly refused: "not_found" }
  | { readonly refused: "closed"; readonly lease: ScopeLeaseRecord };

/**
 * Locks an open lease against closing (`for share`) inside `tx`; a lease
 * whose TTL has passed counts as closed even before the expiry loop rolls it
 * back. Commit, rollback and expiry take the row `for update`, so whichever
 * comes first wins and the other sees the outcome.
 */
export async function lockOpen(tx: Db, clock: Clock, leaseId: string): Promise<LeaseRefusal | undefined> {
  const [row] = await queryRows<{ state: string; expired: boolean }>(
    tx,
    sql`select state, expires_at <= ${clock.now()} as expired from scope_leases where id = ${leaseId} for share`,
  );
  if (!row) return { refused: "not_found" };
  if (row.state !== "OPEN" || row.expired) {
    return { refused: "closed", lease: (await findScopeLease(tx, leaseId)) as ScopeLeaseRecord };
  }
  return undefined;
}

/** A new resource, inside an open lease or workspace-owned. */
export interface NewResource {
  readonly kind: string;
  readonly leaseId: string | undefined;
  readonly name?: string;
  readonly content?: Uint8Array;
  readonly sha256?: string;
  readonly contentType?: string;
  readonly body?: JsonObject;
  /** The creating principal: the actor of its `resource_created` event. */
  readonly actor: string;
  /**
   * Files an agent saves as a deployment's outputs: the run they are the
   * outputs of (the deployment, and the epoch of the agent's lease on its
   * action). The file is created only while that run is held by a live
   * session `actor` opened, and is deleted if the run is lost before it ends.
   */
  readonly outputOf?: { readonly deploymentId: string; readonly epoch: number } | undefined;
  /** The client's idempotency key, with a hash of its request (see {@link earlierRequest}). */
  readonly request?: ResourceRequest | undefined;
}

/** A create request's idempotency key (per `actor`) and the hash of the request it was sent with. */
export interface ResourceRequest {
  readonly id: string;
  readonly hash: string;
}

/** A request id that `actor` used before for another request: that one's resource. */
export interface RequestIdReused {
  readonly refused: "request_id_reused";
  readonly resourceId: string;
}

/**
 * The resource an earlier create of `actor` with the same request id made,
 * if one exists: a retry, answered with it; or {@link RequestIdReused} when
 * that request differed. Run first in the create's transaction: it holds a
 * transaction-scoped advisory lock on (actor, request id), so two calls with
 * one key (on any server) are taken one after the other and the second finds
 * the first's resource; the unique index on (requested_by, request_id) backs
 * that up.
 */
async function earlierRequest(
  tx: Db,
  actor: string,
  request: ResourceRequest,
): Promise<ResourceRecord | RequestIdReused | undefined> {
  await queryRows(
    tx,
    sql`select pg_advisory_xact_lock(hashtextextended(${JSON.stringify(["resource request", actor, request.id])}, 0))`,
  );
  const earlier = await findRequestedResource(tx, actor, request.id);
  if (!earlier) return undefined;
  if (earlier.requestHash !== request.hash) return { refused: "request_id_reused", resourceId: earlier.id };
  return earlier;
}

/** The resource `actor` created with request id `requestId`, with its request's hash, if it exists. */
export async function findRequestedResource(
  db: Db,
  actor: string,
  requestId: string,
): Promise<(ResourceRecord & { readonly requestHash: string | null }) | undefined> {
  const [row] = await queryRows<ResourceRow & { request_hash: string | null }>(
    db,
    sql`select ${RESOURCE_COLUMNS}, request_hash from resources
        where requested_by = ${actor} and request_id = ${requestId}`,
  );
  return row && { ...resourceFromRow(row), requestHash: row.request_hash };
}

/** A file saved as the output of a run that is not (or no longer) held by the saving principal. */
export interface RunNotHeld {
  readonly refused: "run_not_held";
}

/**
 * Creates a resource. With a lease id this is the only way a resource enters
 * a lease, and it happens atomically with a check that the lease is open.
 * The same statement records `resource_created` with the lease's runtime as
 * its cluster (none for a resource created without a lease) and `actor`.
 *
 * One exception to "open": a file that a deployment of a committed lease
 * saves (its outputs, uploaded after the commit, while a collect stops it or
 * its containers end) is kept as the commit kept the deployment: created
 * workspace-owned in that lease. It is recognised as an output only by the
 * run it names (`outputOf`): a run of one of the lease's deployments that
 * `actor`'s live session holds right now (see {@link heldRunAction}). Not by
 * its creator alone: with authentication off every caller is `anonymous`,
 * and any of them could add files to the committed lease while an agent
 * ran one of its deployments.
 */
export async function insertResource(
  db: Db,
  clock: Clock,
  input: NewResource,
): Promise<ResourceRecord | LeaseRefusal | RunNotHeld | RequestIdReused> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const earlier = input.request && (await earlierRequest(tx, input.actor, input.request));
    if (earlier) return earlier;
    let ownership: Ownership = input.leaseId ? "LEASE" : "WORKSPACE";
    /** The action of the run the file is an output of, checked held (and locked) below. */
    let outputAction: string | undefined;
    if (input.leaseId) {
      const refusal = await lockOpen(tx, clock, input.leaseId);
      const committed = refusal?.refused === "closed" && refusal.lease.state === "COMMITTED";
      // Into a lease that takes no file at all (rolled back, past its TTL), the lease's state is the answer.
      if (input.outputOf && (!refusal || committed)) {
        outputAction = await heldRunAction(tx, input.leaseId, input.outputOf, input.actor);
        // Into a committed lease, a file that is no held run's output is refused as closed (below).
        if (!outputAction && !refusal) return { refused: "run_not_held" as const };
      }
      const kept = committed && input.kind === "file" && outputAction !== undefined;
      if (refusal && !kept) return refusal;
      if (kept) ownership = "WORKSPACE";
    }
    const content = input.content ? Buffer.from(input.content).toString("base64") : null;
    const [row] = await queryRows<ResourceRow>(
      tx,
      sql`
        with inserted as (
          insert into resources (id, kind, ownership, lease_id, runtime, lease_owner, created_at, name, size_bytes, sha256,
                                 content_type, content, body, output_action_id, output_epoch, request_id, requested_by,
                                 request_hash)
          values (${uuidv7()}, ${input.kind}, ${ownership}, ${input.leaseId ?? null},
                  (select runtime from scope_leases where id = ${input.leaseId ?? null}),
                  (select created_by from scope_leases where id = ${input.leaseId ?? null}),
                  ${clock.now()}, ${input.name ?? null}, ${input.content ? input.content.byteLength : null},
                  ${input.sha256 ?? null}, ${input.contentType ?? null},
                  case when ${content}::text is null then null else decode(${content}::text, 'base64') end,
                  ${input.body ? JSON.stringify(input.body) : null}::jsonb,
                  ${outputAction ?? null}, ${outputAction ? (input.outputOf?.epoch ?? null) : null},
                  ${requestColumns(input.actor, input.request)})
          returning ${RESOURCE_COLUMNS}
        ),
        event as (
          insert into events (kind, lease_id, cluster, message, details, actor)
          select 'resource_created', i.lease_id, l.runtime,
            i.kind || ' ' || i.id || ' created ' || case
              when i.lease_id is null then 'workspace-owned'
              when i.ownership = 'WORKSPACE' then 'in committed lease ' || i.lease_id || ', kept with its deployment'
              else 'in lease ' || i.lease_id end,
            jsonb_strip_nulls(jsonb_build_object('resource_id', i.id, 'kind', i.kind, 'name', i.name)),
            ${input.actor}
          from inserted i left join scope_leases l on l.id = i.lease_id
        )
        select * from inserted`,
    );
    return resourceFromRow(row as ResourceRow);
  });
}

/**
 * The action of run `run` (deployment and epoch) when it is a deployment of
 * lease `leaseId` whose action is leased right now at that epoch to a live
 * session `principal` opened: the agent saving that run's outputs. The
 * action's row is locked `for share` until the upload commits, so the run
 * cannot end meanwhile: a statement ending it waits, and its trigger
 * (attempts_discard_lost_outputs) then sees this file. One ended first is
 * not found (the lock re-reads the row): the upload is refused.
 */
async function heldRunAction(
  tx: Db,
  leaseId: string,
  run: { readonly deploymentId: string; readonly epoch: number },
  principal: string,
): Promise<string | undefined> {
  const [row] = await queryRows<{ id: string }>(
    tx,
    sql`
      select a.id from resources r
      join actions a on a.id = r.action_id
      join sessions s on s.id = a.session_id
      where r.id = ${run.deploymentId} and r.kind = 'deployment' and r.lease_id = ${leaseId}
        and a.state = 'LEASED' and a.epoch = ${run.epoch}
        and s.principal = ${principal} and s.ended_at is null
      for share of a`,
  );
  return row?.id;
}

/**
 * Creates a deployment and the long-running action that runs it on an agent
 * of its runtime (the lease's runtime when it has a lease), atomically with
 * the check that the lease is open.
 */
export async function insertDeployment(
  db: Db,
  clock: Clock,
  input: {
    readonly leaseId: string | undefined;
    /** The runtime of a deployment created without a lease. */
    readonly runtime: string | undefined;
    readonly spec: JsonObject;
    /** The action to run it, given the deployment's id and runtime. */
    readonly action: (deploymentId: string, runtime: string) => NewAction;
    /** The creating principal: its action's `created_by` and the event's actor. */
    readonly actor: string;
    /** The client's idempotency key, with a hash of its request (see {@link earlierRequest}). */
    readonly request?: ResourceRequest | undefined;
  },
): Promise<ResourceRecord | LeaseRefusal | RequestIdReused> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const earlier = input.request && (await earlierRequest(tx, input.actor, input.request));
    if (earlier) return earlier;
    let runtime = input.runtime ?? "";
    if (input.leaseId) {
      const refusal = await lockOpen(tx, clock, input.leaseId);
      if (refusal) return refusal;
      const [lease] = await queryRows<{ runtime: string }>(
        tx,
        sql`select runtime from scope_leases where id = ${input.leaseId}`,
      );
      runtime = (lease as { runtime: string }).runtime;
    }
    const id = uuidv7();
    const actionId = uuidv7();
    await insertActions(tx, clock, [{ id: actionId, action: input.action(id, runtime), actor: input.actor }]);
    const [row] = await queryRows<ResourceRow>(
      tx,
      sql`
        with inserted as (
          insert into resources (id, kind, ownership, lease_id, runtime, lease_owner, created_at, body, action_id,
                                 request_id, requested_by, request_hash)
          values (${id}, 'deployment', ${input.leaseId ? "LEASE" : "WORKSPACE"}, ${input.leaseId ?? null},
                  ${runtime}, (select created_by from scope_leases where id = ${input.leaseId ?? null}),
                  ${clock.now()}, ${JSON.stringify(input.spec)}::jsonb, ${actionId},
                  ${requestColumns(input.actor, input.request)})
          returning ${RESOURCE_COLUMNS}
        ),
        event as (
          insert into events (kind, lease_id, action_id, cluster, message, details, actor)
          select 'deployment_created', lease_id, action_id, ${runtime},
            'deployment ' || id || ' created; action ' || action_id || ' runs it',
            jsonb_build_object('resource_id', id, 'kind', kind), ${input.actor} from inserted
        )
        select * from inserted`,
    );
    return resourceFromRow(row as ResourceRow);
  });
}

/** The values of request_id, requested_by and request_hash for a new resource. */
const requestColumns = (actor: string, request: ResourceRequest | undefined): SQL =>
  request ? sql`${request.id}, ${actor}, ${request.hash}` : sql`null, null, null`;

export async function findResource(db: Db, id: string): Promise<ResourceRecord | undefined> {
  const [row] = await queryRows<ResourceRow>(
    db,
    sql`select ${RESOURCE_COLUMNS} from resources where id = ${id}`,
  );
  return row && resourceFromRow(row);
}

/** The resources among `ids` that exist, by id, read in one statement. */
export async function findResources(db: Db, ids: readonly string[]): Promise<Map<string, ResourceRecord>> {
  if (ids.length === 0) return new Map();
  const rows = await queryRows<ResourceRow>(
    db,
    sql`select ${RESOURCE_COLUMNS} from resources
        where id in (select jsonb_array_elements_text(${JSON.stringify(ids)}::jsonb))`,
  );
  return new Map(rows.map((r) => [r.id, resourceFromRow(r)]));
}

/** Filters of a listing of resources; they combine with AND. */
export interface ResourceFilter {
  readonly leaseId?: string | undefined;
  readonly kind?: string | undefined;
  readonly ownership?: Ownership | undefined;
}

/** Up to `limit` resources in id (= creation) order, after `afterId`. */
export async function listResources(
  db: Db,
  filter: ResourceFilter,
  afterId: string | undefined,
  limit: number,
): Promise<ResourceRecord[]> {
  return (await readResources(db, filter, afterId, limit)).map((row) => row.item);
}

/**
 * The actions of the deployments created in lease `leaseId`, the newest
 * first, at most `limit`: from their `deployment_created` events, which
 * outlive a deployment its lease's close destroyed.
 */
export async function deploymentActionIds(db: Db, leaseId: string, limit: number): Promise<string[]> {
  const rows = await queryRows<{ action_id: string }>(
    db,
    sql`select action_id from events
        where lease_id = ${leaseId} and kind = 'deployment_created' and action_id is not null
        order by sequence desc limit ${limit}`,
  );
  return rows.map((r) => r.action_id);
}

/** How many resources lease `leaseId` owns or owned and promoted. */
export async function countLeaseResources(db: Db, leaseId: string): Promise<number> {
  const [row] = await queryRows<{ n: unknown }>(
    db,
    sql`select count(*) as n from resources where lease_id = ${leaseId}`,
  );
  return toNumber(row?.n ?? 0);
}

/**
 * One page of resources in id order, after `afterId`: up to `limit`, fewer
 * (`cut`) where the next would take the page's JSON past
 * {@link PAGE_JSON_BYTES}.
 */
export function listResourcePage(
  db: Db,
  filter: ResourceFilter,
  afterId: string | undefined,
  limit: number,
): Promise<{ items: ResourceRecord[]; cut: boolean }> {
  return readPage(
    (after, n) => readResources(db, filter, after, n),
    (r) => r.id,
    afterId,
    limit,
  );
}

/**
 * Up to `limit` resources after `afterId`, each with the size of the JSON
 * its answer carries: an object's body, a deployment's spec and what its
 * view shows of its action (output, error, phase details).
 */
async function readResources(
  db: Db,
  filter: ResourceFilter,
  afterId: string | undefined,
  limit: number,
): Promise<SizedRow<ResourceRecord>[]> {
  const conditions: SQL[] = [sql`true`];
  if (filter.leaseId) conditions.push(sql`lease_id = ${filter.leaseId}`);
  if (filter.kind) conditions.push(sql`kind = ${filter.kind}`);
  if (filter.ownership) conditions.push(sql`ownership = ${filter.ownership}`);
  if (afterId) conditions.push(sql`id > ${afterId}`);
  const rows = await queryRows<ResourceRow & { json_bytes: unknown }>(
    db,
    sql`select ${RESOURCE_COLUMNS}, coalesce(octet_length(body::text), 0)
          + coalesce((select coalesce(octet_length(a.output::text), 0) + coalesce(octet_length(a.last_error::text), 0)
                        + coalesce(octet_length(a.phase_details::text), 0)
                      from actions a where a.id = resources.action_id), 0) as json_bytes
        from resources where ${sql.join(conditions, sql` and `)} order by id limit ${limit}`,
  );
  return rows.map((row) => ({ item: resourceFromRow(row), jsonBytes: toNumber(row.json_bytes) }));
}

/**
 * Makes one lease-owned resource workspace-owned, while the lease is open.
 * The event carries the lease's runtime as its cluster and `actor`. A
 * resource this lease promoted already is returned as it is, with no event,
 * even once the lease has closed (a promote that won a race with the close,
 * its answer lost, then retried); so is one the lease's commit kept.
 */
export async function promoteResource(
  db: Db,
  clock: Clock,
  leaseId: string,
  kind: string,
  resourceId: string,
  actor: string,
): Promise<ResourceRecord | LeaseRefusal | { refused: "no_resource" }> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const refusal = await lockOpen(tx, clock, leaseId);
    if (refusal) return (refusal.refused === "closed" && (await promotedAlready())) || refusal;
    const [row] = await queryRows<ResourceRow>(
      tx,
      sql`
        with promoted as (
          update resources set ownership = 'WORKSPACE'
          where id = ${resourceId} and kind = ${kind} and lease_id = ${leaseId} and ownership = 'LEASE'
          returning ${RESOURCE_COLUMNS}
        ),
        event as (
          insert into events (kind, lease_id, cluster, message, actor)
          select 'resource_promoted', p.lease_id, l.runtime, p.kind || ' ' || p.id || ' promoted out of the lease',
            ${actor}
          from promoted p join scope_leases l on l.id = p.lease_id
        )
        select * from promoted`,
    );
    if (row) return resourceFromRow(row);
    return (await promotedAlready()) ?? { refused: "no_resource" as const };

    /** Promoted already, by this lease: the same answer again, so a retry after a lost answer is safe. */
    async function promotedAlready(): Promise<ResourceRecord | undefined> {
      const [again] = await queryRows<ResourceRow>(
        tx,
        sql`select ${RESOURCE_COLUMNS} from resources
            where id = ${resourceId} and kind = ${kind} and lease_id = ${leaseId} and ownership = 'WORKSPACE'`,
      );
      return again ? resourceFromRow(again) : undefined;
    }
  });
}

/** What a close did. */
export interface Closed {
  readonly lease: ScopeLeaseRecord;
  /** Resources kept (commit) or destroyed (rollback). */
  readonly resources: readonly { id: string; kind: string }[];
  /** Destroyed deployments' actions, to wake their watchers and revoke from their holders. */
  readonly ended: EndedActions;
}

/**
 * Closes a lease: commit keeps everything it still owns (workspace-owned from
 * now on), rollback destroys it. Exactly one close wins: the first statement
 * closes the row only if it is still OPEN (waiting out any creation or
 * promotion holding it `for share`); the second runs with a fresh snapshot,
 * so a resource created just before the close is kept or destroyed with the
 * rest, never left behind in a closed lease. `actor` is the closing principal.
 *
 * A close that meets a deadlock or a serialization failure (its cancel of
 * many deployments against their agents' reports, or anything else locking
 * the same rows) was rolled back whole, and is run again, up to
 * {@link CLOSE_TRIES} times in all, rather than answered ABORTED: the
 * caller's retry would do the same. A close another one beat meanwhile is
 * then refused as closed, as it would have been.
 */
export async function closeScopeLease(
  db: Db,
  clock: Clock,
  leaseId: string,
  how: "COMMITTED" | "ROLLED_BACK",
  actor: string,
): Promise<Closed | LeaseRefusal> {
  return retryOnConflict(CLOSE_TRIES, () => closeOnce(db, clock, leaseId, how, actor));
}

/** Tries of a close before a conflict is answered (ABORTED). */
export const CLOSE_TRIES = 5;

async function closeOnce(
  db: Db,
  clock: Clock,
  leaseId: string,
  how: "COMMITTED" | "ROLLED_BACK",
  actor: string,
): Promise<Closed | LeaseRefusal> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const now = clock.now();
    const [closed] = await queryRows<{ id: string }>(
      tx,
      sql`update scope_leases set state = ${how}, close_reason = ${how}, closed_at = ${now}
          where id = ${leaseId} and state = 'OPEN' and expires_at > ${now} returning id`,
    );
    if (!closed) {
      const lease = await findScopeLease(tx, leaseId);
      return lease ? { refused: "closed" as const, lease } : { refused: "not_found" as const };
    }
    const touched = await settleResources(tx, [leaseId], how === "COMMITTED" ? "keep" : "destroy");
    await recordClose(tx, [leaseId], how, actor);
    const ended = await cancelDeploymentActions(
      tx,
      deploymentActions(touched),
      `scope lease ${leaseId} was ${how === "COMMITTED" ? "committed" : "rolled back"}`,
      actor,
    );
    return {
      lease: (await findScopeLease(tx, leaseId)) as ScopeLeaseRecord,
      resources: touched.map(({ id, kind }) => ({ id, kind })),
      ended,
    };
  });
}

type Settled = { id: string; kind: string; action_id: string | null };

/** The actions of the destroyed deployments among `settled` (commit destroys none). */
const deploymentActions = (settled: readonly Settled[]) =>
  settled.flatMap((r) => (r.kind === "deployment" && r.action_id ? [r.action_id] : []));

async function settleResources(
  tx: Db,
  leaseIds: readonly string[],
  what: "keep" | "destroy",
): Promise<Settled[]> {
  const ids = sql`(select jsonb_array_elements_text(${JSON.stringify(leaseIds)}::jsonb))`;
  if (what === "keep") {
    // Kept deployments keep running: their actions are not reported.
    return queryRows<Settled>(
      tx,
      sql`update resources set ownership = 'WORKSPACE' where lease_id in ${ids} and ownership = 'LEASE'
          returning id, kind, null as action_id`,
    );
  }
  return queryRows<Settled>(
    tx,
    sql`delete from resources where lease_id in ${ids} and ownership = 'LEASE' returning id, kind, action_id`,
  );
}

/** Records the close events; `actor` is empty for an expiry (the server's own decision). */
async function recordClose(
  tx: Db,
  leaseIds: readonly string[],
  reason: CloseReason,
  actor: string,
): Promise<void> {
  const kind = reason === "COMMITTED" ? "scope_lease_committed" : "scope_lease_rolled_back";
  const words = {
    COMMITTED: "committed",
    ROLLED_BACK: "rolled back",
    EXPIRED: "rolled back: its TTL passed",
  }[reason];
  await tx.execute(sql`
    insert into events (kind, lease_id, cluster, message, actor)
    select ${kind}, id, runtime, 'scope lease ' || ${words}, ${actor} from scope_leases
    where id in (select jsonb_array_elements_text(${JSON.stringify(leaseIds)}::jsonb))`);
}

/** What one round of {@link expireScopeLeases} rolled back. */
export interface ExpiredScopeLeases {
  /** The leases rolled back. */
  readonly ids: string[];
  /** Their runtimes (clusters), each once. */
  readonly runtimes: string[];
  /** How many resources they owned were destroyed. */
  readonly destroyed: number;
  readonly ended: EndedActions;
}

/**
 * Rolls back every open lease whose TTL has passed (close reason EXPIRED).
 * Locking: `for update skip locked`, so several processes can run it; a lease
 * being created into or promoted from is skipped until the next round. Runs
 * from the database clock, so it also catches leases that expired while no
 * server was running.
 */
export async function expireScopeLeases(db: Db, clock: Clock, limit: number): Promise<ExpiredScopeLeases> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const now = clock.now();
    const expired = await queryRows<{ id: string; runtime: string }>(
      tx,
      sql`
        with due as (
          select id from scope_leases where state = 'OPEN' and expires_at <= ${now}
          order by expires_at limit ${limit} for update skip locked
        )
        update scope_leases l set state = 'ROLLED_BACK', close_reason = 'EXPIRED', closed_at = ${now}
        from due where l.id = due.id returning l.id, l.runtime`,
    );
    const ids = expired.map((r) => r.id);
    const runtimes = [...new Set(expired.map((r) => r.runtime))].sort();
    if (ids.length === 0) return { ids, runtimes, destroyed: 0, ended: { actionIds: [], revokes: [] } };
    const destroyed = await settleResources(tx, ids, "destroy");
    await recordClose(tx, ids, "EXPIRED", "");
    const ended = await cancelDeploymentActions(
      tx,
      deploymentActions(destroyed),
      "its scope lease was rolled back: the TTL passed",
      "",
    );
    return { ids, runtimes, destroyed: destroyed.length, ended };
  });
}

/**
 * Moves an open lease's TTL rollback to `ttlMs` from now, recording a
 * `scope_lease_renewed` event with `actor` in the same statement. A lease
 * whose TTL has passed is not renewed: its rollback has begun (or is due),
 * and the expiry's `for update skip locked` must not find it open again. The
 * update waits out an expiry or close holding the row, then sees its result.
 */
export async function renewScopeLease(
  db: Db,
  clock: Clock,
  leaseId: string,
  ttlMs: number | undefined,
  actor: string,
): Promise<ScopeLeaseRecord | LeaseRefusal> {
  const now = clock.now();
  const [row] = await queryRows<LeaseRow>(
    db,
    sql`
      with renewed as (
        update scope_leases
        set expires_at = ${now} + make_interval(secs => coalesce(${ttlMs ?? null}::bigint, ttl_ms) / 1000.0)
        where id = ${leaseId} and state = 'OPEN' and expires_at > ${now}
        returning *
      ),
      event as (
        insert into events (kind, lease_id, cluster, message, actor, details)
        select 'scope_lease_renewed', id, runtime,
          'scope lease renewed: it rolls back ' || (coalesce(${ttlMs ?? null}::bigint, ttl_ms) / 1000.0)::float8::text
            || 's from now unless closed or renewed again', ${actor},
          jsonb_build_object('expire_time', to_json(expires_at) #>> '{}',
                             'ttl_ms', coalesce(${ttlMs ?? null}::bigint, ttl_ms))
        from renewed
      )
      select r.*, (select count(*) from resources x where x.lease_id = r.id and x.ownership = 'LEASE') as owned
      from renewed r`,
  );
  if (row) return leaseFromRow(row);
  const lease = await findScopeLease(db, leaseId);
  return lease ? { refused: "closed", lease } : { refused: "not_found" };
}

/**
 * Records a lease's result (replacing an earlier one) and, in the same
 * statement, a `scope_lease_result_set` event with `actor`. Returns the lease
 * as written, from that statement: a read after it could find the record
 * deleted meanwhile (DeleteLease on another server). Undefined if there is no
 * such lease.
 */
export async function setScopeLeaseResult(
  db: Db,
  leaseId: string,
  result: JsonObject,
  actor: string,
): Promise<ScopeLeaseRecord | undefined> {
  const [row] = await queryRows<LeaseRow>(
    db,
    sql`
      with updated as (
        update scope_leases set result = ${JSON.stringify(result)}::jsonb where id = ${leaseId}
        returning *
      ),
      event as (
        insert into events (kind, lease_id, cluster, message, actor)
        select 'scope_lease_result_set', id, runtime, 'scope lease result set', ${actor} from updated
      )
      select u.*, (select count(*) from resources r where r.lease_id = u.id and r.ownership = 'LEASE') as owned
      from updated u`,
  );
  return row && leaseFromRow(row);
}

/**
 * Whether the committed lease `lease` (an SQL reference to its id) has a
 * deployment whose action has not ended (queued, running, or stopping): one
 * its commit kept, which may still save outputs into it (see
 * {@link insertResource}), so its record must stay until that ends. Only
 * ever goes from true to false: a closed lease gets no new deployment, and an
 * ended action never runs again; so one snapshot's answer stays safe.
 */
export const keptDeploymentRunning = (lease: SQL): SQL => sql`exists (
  select 1 from resources r join actions a on a.id = r.action_id
  where r.lease_id = ${lease} and r.kind = 'deployment' and a.state not in ('SUCCEEDED', 'FAILED', 'CANCELLED'))`;

/** What {@link deleteClosedScopeLeases} did, and what it left. */
export interface DeletedLeases {
  readonly deleted: number;
  /** Open leases the id, runtime and label filters match (none with `closedBefore`). */
  readonly skippedOpen: number;
  /** Committed leases matched whose kept deployments have not ended ({@link keptDeploymentRunning}). */
  readonly skippedRunning: number;
  /** With an id filter, one such deployment of that lease and its action's state, to name it. */
  readonly running: { readonly deploymentId: string; readonly state: string } | undefined;
}

/**
 * Deletes closed lease records (housekeeping); open ones are never deleted
 * here, nor committed ones whose kept deployments have not ended (their
 * outputs still arrive: {@link keptDeploymentRunning}). One set-based
 * statement deletes them and records a `scope_lease_deleted` event per lease
 * (its runtime as cluster, `actor`), and counts, from the same snapshot,
 * what the filters match that it left.
 */
export async function deleteClosedScopeLeases(
  db: Db,
  filter: {
    id?: string;
    label?: string | undefined;
    runtime?: string | undefined;
    closedBefore?: Date | undefined;
  },
  actor: string,
): Promise<DeletedLeases> {
  const matches: SQL[] = [];
  if (filter.id) matches.push(sql`id = ${filter.id}`);
  if (filter.runtime) matches.push(sql`runtime = ${filter.runtime}`);
  if (filter.label) matches.push(sql`label = ${filter.label}`);
  const closed = [sql`state <> 'OPEN'`, ...matches];
  if (filter.closedBefore) closed.push(sql`closed_at < ${filter.closedBefore.toISOString()}::timestamptz`);
  const running = sql`state = 'COMMITTED' and ${keptDeploymentRunning(sql`scope_leases.id`)}`;
  // Open leases the other filters match are left; counted in the same statement (one snapshot),
  // so the caller hears of them. None match "closed before".
  const open = filter.closedBefore
    ? sql`0`
    : sql`(select count(*) from scope_leases where ${sql.join([sql`state = 'OPEN'`, ...matches], sql` and `)})`;
  // The deployment a refused delete of one lease names.
  const named = filter.id
    ? sql`(select r.id || ' ' || a.state from resources r join actions a on a.id = r.action_id
          where r.lease_id = ${filter.id} and r.kind = 'deployment'
            and a.state not in ('SUCCEEDED', 'FAILED', 'CANCELLED')
          order by r.id limit 1)`
    : sql`null`;
  const [row] = await queryRows<{
    deleted: unknown;
    skipped_open: unknown;
    skipped_running: unknown;
    running: string | null;
  }>(
    db,
    sql`
      with deleted as (
        delete from scope_leases where ${sql.join(closed, sql` and `)} and not (${running})
        returning id, runtime, label, state
      ),
      event as (
        insert into events (kind, lease_id, cluster, message, details, actor)
        select 'scope_lease_deleted', id, runtime, 'scope lease record deleted (it was ' || lower(state) || ')',
          jsonb_build_object('label', label, 'state', state), ${actor}
        from deleted order by id
      )
      select (select count(*) from deleted) as deleted, ${open} as skipped_open,
        (select count(*) from scope_leases where ${sql.join(closed, sql` and `)} and ${running}) as skipped_running,
        ${named} as running`,
  );
  const [deploymentId, state] = row?.running?.split(" ") ?? [];
  return {
    deleted: toNumber(row?.deleted ?? 0),
    skippedOpen: toNumber(row?.skipped_open ?? 0),
    skippedRunning: toNumber(row?.skipped_running ?? 0),
    running: deploymentId && state ? { deploymentId, state } : undefined,
  };
}

/**
 * Deletes a workspace-owned resource; lease-owned ones go with their lease.
 * The same statement records `resource_deleted` with `actor` (the deleting
 * principal, also the actor of a deployment's cancel event) and as cluster
 * the runtime of the lease it was created in, or a deployment's runtime.
 */
export async function deleteWorkspaceResource(
  db: Db,
  id: string,
  actor: string,
): Promise<{ outcome: "deleted"; ended: EndedActions } | { outcome: "lease_owned" | "not_found" }> {
  return db.transaction(async (t) => {
    const tx = t as unknown as Db;
    const [row] = await queryRows<{ ownership: Ownership; deleted: boolean; action_id: string | null }>(
      tx,
      sql`
        with target as (select id, ownership, action_id from resources where id = ${id}),
        deleted as (
          delete from resources r using target where r.id = target.id and target.ownership = 'WORKSPACE'
          returning r.id, r.kind, r.lease_id, r.action_id, r.runtime
        ),
        event as (
          insert into events (kind, lease_id, action_id, cluster, message, details, actor)
          select 'resource_deleted', d.lease_id, d.action_id, d.runtime,
            d.kind || ' ' || d.id || ' deleted', jsonb_build_object('resource_id', d.id, 'kind', d.kind), ${actor}
          from deleted d
        )
        select ownership, action_id, exists (select 1 from deleted) as deleted from target`,
    );
    if (!row) return { outcome: "not_found" as const };
    if (!row.deleted) return { outcome: "lease_owned" as const };
    const ended = row.action_id
      ? await cancelDeploymentActions(tx, [row.action_id], `deployment ${id} was deleted`, actor)
      : { actionIds: [], revokes: [] };
    return { outcome: "deleted" as const, ended };
  });
}
