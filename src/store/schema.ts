import { sql } from "drizzle-orm";
import {
  bigint,
  bigserial,
  boolean,
  customType,
  doublePrecision,
  index,
  integer,
  jsonb,
  pgTable,
  primaryKey,
  text,
  timestamp,
  uniqueIndex,
} from "drizzle-orm/pg-core";

/**
 * The Leasehold schema. Migrations in `src/store/migrations` are generated
 * from this file by `npm run db:generate` (drizzle-kit) and applied at start.
 * Every timestamp comes from the database clock (`now()`), the one clock for
 * deadlines when several server processes share a database.
 */

const tstz = (name: string) => timestamp(name, { withTimezone: true, mode: "date" });

/** PostgreSQL bytea (file contents). */
const bytea = customType<{ data: Uint8Array; driverData: Uint8Array }>({ dataType: () => "bytea" });

/** Named groups of workers. A row appears on the first worker hello or action submit. */
export const clusters = pgTable("clusters", {
  name: text("name").primaryKey(),
  createdAt: tstz("created_at").notNull().defaultNow(),
  /** HEALTHY | DEGRADED | UNHEALTHY, as last computed from recent expiries. */
  health: text("health").notNull().default("HEALTHY"),
  healthReason: text("health_reason").notNull().default(""),
  /**
   * SPEC rule 10: set while more than the partition share of the cluster's live sessions have
   * lost their streams. Expiries of its sessions pause until it clears, unless an operator
   * resumed them for this partition (`expiries_resumed_at`).
   */
  partitionedAt: tstz("partitioned_at"),
  expiriesResumedAt: tstz("expiries_resumed_at"),
});

/** Agent processes, by their stable worker id. */
export const workers = pgTable(
  "workers",
  {
    workerId: text("worker_id").primaryKey(),
    cluster: text("cluster").notNull(),
    capacity: integer("capacity").notNull(),
    labels: jsonb("labels").$type<Record<string, string>>().notNull().default({}),
    agentVersion: text("agent_version").notNull().default(""),
    /** No new grants while true. */
    draining: boolean("draining").notNull().default(false),
    /** Why, as the operator said when asking for the drain: sent again to every new stream. */
    drainReason: text("drain_reason").notNull().default(""),
    createdAt: tstz("created_at").notNull().defaultNow(),
    lastSeenAt: tstz("last_seen_at").notNull().defaultNow(),
  },
  (t) => [index("workers_cluster_idx").on(t.cluster)],
);

/**
 * Worker sessions. A session lives until `deadline` (last contact + grace);
 * the server renews deadlines of the streams it hosts in one statement per
 * tick. At most one live (not ended) session per worker.
 */
export const sessions = pgTable(
  "sessions",
  {
    id: text("id").primaryKey(),
    workerId: text("worker_id")
      .notNull()
      .references(() => workers.workerId),
    /** The server process hosting the stream, if any. */
    serverId: text("server_id"),
    /**
     * Identifies the stream currently attached to the session (new on every
     * hello). Writes made on behalf of a stream (renewal, stream loss,
     * goodbye, grants) are conditional on it, so a stale stream, even on
     * another process, can never act for a session that moved on.
     */
    streamToken: text("stream_token"),
    startedAt: tstz("started_at").notNull().defaultNow(),
    deadline: tstz("deadline").notNull(),
    /**
     * When the server last heard from the worker. Restarts extend deadlines
     * (SPEC rule 6) only for sessions heard from within the maximum silence.
     */
    lastHeardAt: tstz("last_heard_at").notNull().defaultNow(),
    /** Set when the stream is lost; cleared when the worker reconnects. */
    streamLostAt: tstz("stream_lost_at"),
    /**
     * With `stream_lost_at`: this server ended the stream on purpose and told
     * the worker to reconnect elsewhere with its session intact (a closing
     * process's handover, or a rebalancing move). Until its deadline passes
     * such a session does not count as lost for the partition valve (SPEC
     * rule 10); it is reaped at its deadline as any other. False otherwise.
     */
    streamHandedOver: boolean("stream_handed_over").notNull().default(false),
    endedAt: tstz("ended_at"),
    /** reaped | goodbye | taken_over */
    endReason: text("end_reason"),
    /**
     * The principal whose hello opened the session; only it may take the
     * session over or resume it (SPEC §2 rule 8). `anonymous` when
     * authentication is off.
     */
    principal: text("principal").notNull().default(""),
    /**
     * Hello.instance_id of the process attached to the session ('' when its
     * hello had none): while its stream is open, a hello with another
     * instance id is refused (WORKER_ID_IN_USE), so a second process started
     * with the same worker id cannot take the session from the first.
     */
    instanceId: text("instance_id").notNull().default(""),
  },
  // No index on deadline, which every renewal moves (once per heartbeat interval for every live
  // session): without one, and with room left on each page (fillfactor 70, set in migration 0008),
  // a renewal is a HOT update that writes no index entry. The reaper and the restart extension
  // read live sessions through sessions_one_live_per_worker instead.
  (t) => [uniqueIndex("sessions_one_live_per_worker").on(t.workerId).where(sql`${t.endedAt} is null`)],
);

/**
 * Units of work. `epoch` increases by one per grant; (id, epoch) is the fencing token.
 *
 * Lock order: a statement that locks several actions and waits for them
 * (reports, progress, cancels of deployments, expiries, goodbyes) locks them
 * in id order (`order by id ... for update`, then updates the locked set), so
 * two such statements never deadlock on each other's actions rows (rows of
 * other tables they lock may still meet in another order: the store retries
 * 40P01 where a caller would otherwise see it). Claims skip what is locked
 * (`skip locked`) and need no order.
 */
export const actions = pgTable(
  "actions",
  {
    id: text("id").primaryKey(),
    /**
     * Client idempotency key, scoped to the submitting principal: unique per
     * (created_by, request_id) when set, so one principal's keys can neither
     * find nor block another's.
     */
    requestId: text("request_id"),
    /** Hash of the submitted request, to tell a retry from a conflicting reuse of request_id. */
    requestHash: text("request_hash"),
    /**
     * W3C traceparent of the span that submitted the action, when the server
     * traces: its grants' spans are children of it. Null otherwise.
     */
    traceParent: text("trace_parent"),
    runId: text("run_id").notNull().default(""),
    cluster: text("cluster").notNull(),
    labelSelector: jsonb("label_selector").$type<Record<string, string>>().notNull().default({}),
    payload: jsonb("payload").$type<Record<string, unknown>>(),
    priority: integer("priority").notNull().default(0),
    maxAttempts: integer("max_attempts").notNull(),
    initialBackoffMs: integer("initial_backoff_ms").notNull(),
    backoffMultiplier: doublePrecision("backoff_multiplier").notNull(),
    maxBackoffMs: integer("max_backoff_ms").notNull(),
    maxSystemRetries: integer("max_system_retries").notNull(),
    /** QUEUED | LEASED | SUCCEEDED | FAILED | CANCELLED */
    state: text("state").notNull(),
    epoch: bigint("epoch", { mode: "number" }).notNull().default(0),
    attemptCount: integer("attempt_count").notNull().default(0),
    failureCount: integer("failure_count").notNull().default(0),
    systemRetryCount: integer("system_retry_count").notNull().default(0),
    /** The session holding the current lease, while LEASED. */
    sessionId: text("session_id"),
    workerId: text("worker_id"),
    grantedAt: tstz("granted_at"),
    cancelRequested: boolean("cancel_requested").notNull().default(false),
    output: jsonb("output").$type<Record<string, unknown>>(),
    lastError: jsonb("last_error").$type<{ message: string; retryable: boolean; details?: unknown }>(),
    failureReason: text("failure_reason").notNull().default(""),
    phase: text("phase").notNull().default(""),
    /** Details of the last progress report (deployments: their container states). */
    phaseDetails: jsonb("phase_details").$type<Record<string, unknown>>(),
    /**
     * A graceful stop asked of the holder while the lease stays valid:
     * COLLECT_OUTPUTS (save the outputs, then finish). Sent again on reconnect.
     */
    stopReason: text("stop_reason"),
    /** Last checkpoint reported, handed to the next attempt. */
    checkpoint: jsonb("checkpoint").$type<Record<string, unknown>>(),
    createdAt: tstz("created_at").notNull().defaultNow(),
    updatedAt: tstz("updated_at").notNull().defaultNow(),
    notBefore: tstz("not_before").notNull().defaultNow(),
    finishedAt: tstz("finished_at"),
    /** The principal that submitted it (for deployments: that created the deployment). */
    createdBy: text("created_by").notNull().default(""),
  },
  (t) => [
    // Not partial: an ON CONFLICT naming these columns (every server version's submit) needs it whole.
    uniqueIndex("actions_created_by_request_id_key").on(t.createdBy, t.requestId),
    // The claim path: queued actions of a cluster, by priority then age.
    index("actions_claim_idx")
      .on(t.cluster, t.priority.desc(), t.createdAt)
      .where(sql`${t.state} = 'QUEUED'`),
    index("actions_session_idx").on(t.sessionId).where(sql`${t.state} = 'LEASED'`),
    // Partial, like events_worker_idx: the many rows without a run (or worker) skip it.
    index("actions_run_idx").on(t.runId).where(sql`${t.runId} <> ''`),
    // Partial: queued actions are found through actions_claim_idx, and succeeded ones (most of
    // the table) in id order by the primary key; a submit and a success then write no entry here.
    // Queries name a state as a literal, which lets the planner prove the predicate.
    index("actions_state_idx")
      .on(t.state, t.cluster)
      .where(sql`${t.state} <> 'QUEUED' and ${t.state} <> 'SUCCEEDED'`),
    // A cluster's actions in id order (ListActions naming a cluster, as every caller scoped to
    // some clusters must): without it a page of a small cluster reads the whole table.
    index("actions_cluster_idx").on(t.cluster, t.id),
  ],
);

/** One row per grant: (action id, epoch). */
export const attempts = pgTable(
  "attempts",
  {
    actionId: text("action_id")
      .notNull()
      .references(() => actions.id, { onDelete: "cascade" }),
    epoch: bigint("epoch", { mode: "number" }).notNull(),
    workerId: text("worker_id").notNull(),
    sessionId: text("session_id").notNull(),
    /** RUNNING | SUCCEEDED | FAILED | LEASE_EXPIRED | RELEASED | CANCELLED */
    outcome: text("outcome").notNull(),
    error: jsonb("error").$type<{ message: string; retryable: boolean; details?: unknown }>(),
    startedAt: tstz("started_at").notNull().defaultNow(),
    endedAt: tstz("ended_at"),
    /**
     * The holding session's record (`sessions`: last_heard_at, deadline,
     * stream_lost_at, ended_at, end_reason), copied here when its row is
     * forgotten (`forgetWorkers`, `forgetWorker`): ExplainAction tells an
     * attempt's heartbeats and why its lease expired from them, and the
     * attempt is kept as long as its action, longer than the session's row.
     * Null while the session's row exists, and for sessions forgotten before
     * migration 0018.
     */
    sessionLastHeardAt: tstz("session_last_heard_at"),
    sessionDeadline: tstz("session_deadline"),
    sessionStreamLostAt: tstz("session_stream_lost_at"),
    sessionEndedAt: tstz("session_ended_at"),
    sessionEndReason: text("session_end_reason"),
  },
  (t) => [
    primaryKey({ columns: [t.actionId, t.epoch] }),
    // Forgetting sessions copies their records onto the attempts they held (above).
    index("attempts_session_idx").on(t.sessionId),
  ],
);

/** Events about a session, as ExplainAction shows them beside the leases it held. */
export const SESSION_EVENT_KINDS = [
  "stream_lost",
  "session_resumed",
  "session_taken_over",
  "session_reaped",
  "session_closed",
] as const;

/** Events about a cluster's lease expiries being paused and going on (SPEC rule 10). */
export const PARTITION_EVENT_KINDS = [
  "cluster_partitioned",
  "cluster_recovered",
  "cluster_expiries_resumed",
] as const;

/** The audit trail: every lease and action event, in sequence order. */
export const events = pgTable(
  "events",
  {
    sequence: bigserial("sequence", { mode: "number" }).primaryKey(),
    /** Snake-case event kind, e.g. `lease_expired`. */
    kind: text("kind").notNull(),
    at: tstz("at").notNull().defaultNow(),
    actionId: text("action_id"),
    workerId: text("worker_id"),
    cluster: text("cluster"),
    sessionId: text("session_id"),
    epoch: bigint("epoch", { mode: "number" }),
    leaseId: text("lease_id"),
    message: text("message").notNull().default(""),
    details: jsonb("details").$type<Record<string, unknown>>(),
    /**
     * The principal whose call caused the event; empty for the server's own
     * decisions (expiries, TTL rollbacks, re-grants).
     */
    actor: text("actor").notNull().default(""),
  },
  (t) => [
    index("events_action_idx").on(t.actionId, t.sequence),
    // Removing a scope lease past --history-retention removes its events. Partial: the hot
    // path's events (grants, completions) name no lease.
    index("events_lease_idx").on(t.leaseId, t.sequence).where(sql`${t.leaseId} is not null`),
    index("events_worker_idx").on(t.workerId, t.sequence).where(sql`${t.workerId} is not null`),
    index("events_cluster_idx").on(t.cluster, t.sequence),
    // A cluster's recent expiries, which its health counts (clusters.ts): read every few seconds
    // while a cluster is not healthy. Partial: the hot path's events are never expiries.
    index("events_expiry_idx").on(t.cluster, t.at).where(sql`${t.kind} = 'lease_expired'`),
    // ExplainAction: what the sessions holding an action went through, and when its cluster's
    // expiries paused. Partial, so that the hot path's events (grants, completions) skip them.
    index("events_session_idx")
      .on(t.sessionId, t.sequence)
      .where(sql`${t.kind} in ${sql.raw(`(${SESSION_EVENT_KINDS.map((k) => `'${k}'`).join(", ")})`)}`),
    index("events_partition_idx")
      .on(t.cluster, t.sequence)
      .where(sql`${t.kind} in ${sql.raw(`(${PARTITION_EVENT_KINDS.map((k) => `'${k}'`).join(", ")})`)}`),
  ],
);

/**
 * Scope leases: transaction boundaries around resources. OPEN until a commit,
 * a rollback, or the TTL passing (rolled back, close reason EXPIRED).
 */
export const scopeLeases = pgTable(
  "scope_leases",
  {
    id: text("id").primaryKey(),
    /** The cluster its deployments run on. */
    runtime: text("runtime").notNull(),
    label: text("label").notNull().default(""),
    /** Client idempotency key, unique per (created_by, request_id) when set, like actions'. */
    requestId: text("request_id"),
    /** OPEN | COMMITTED | ROLLED_BACK */
    state: text("state").notNull(),
    /** COMMITTED | ROLLED_BACK | EXPIRED, once closed. */
    closeReason: text("close_reason"),
    ttlMs: bigint("ttl_ms", { mode: "number" }).notNull(),
    createdAt: tstz("created_at").notNull().defaultNow(),
    expiresAt: tstz("expires_at").notNull(),
    closedAt: tstz("closed_at"),
    /** Set with SetResult; survives the close. */
    result: jsonb("result").$type<Record<string, unknown>>(),
    /** The principal that created it: with `lease.use.own` only it may use the lease. */
    createdBy: text("created_by").notNull().default(""),
  },
  (t) => [
    uniqueIndex("scope_leases_created_by_request_id_key").on(t.createdBy, t.requestId),
    index("scope_leases_open_expiry_idx").on(t.expiresAt).where(sql`${t.state} = 'OPEN'`),
    index("scope_leases_label_idx").on(t.label),
  ],
);

/**
 * Resources runs create. Exactly two ownership states: WORKSPACE (permanent)
 * or LEASE (inside the open lease `lease_id`). `lease_id` is set only at
 * creation, the one way into a lease, and kept after a promote or commit as
 * the lease the resource was made in.
 */
export const resources = pgTable(
  "resources",
  {
    id: text("id").primaryKey(),
    /** file | deployment | a user-given object kind */
    kind: text("kind").notNull(),
    /** WORKSPACE | LEASE */
    ownership: text("ownership").notNull(),
    leaseId: text("lease_id"),
    createdAt: tstz("created_at").notNull().defaultNow(),
    /** Files: name, size, hash, media type and content. */
    name: text("name"),
    sizeBytes: bigint("size_bytes", { mode: "number" }),
    sha256: text("sha256"),
    contentType: text("content_type"),
    content: bytea("content"),
    /** Objects: the user's JSON body. Deployments: the spec. */
    body: jsonb("body").$type<Record<string, unknown>>(),
    /** Deployments: the long-running action that runs it on an agent. */
    actionId: text("action_id"),
    /**
     * The cluster the resource belongs to, for rights: the runtime of the
     * lease it was created in (kept after a promote or commit, and after the
     * lease's record is deleted), or a deployment's runtime (its action's
     * cluster). Null for a file or object created without a lease: it
     * belongs to no cluster.
     */
    runtime: text("runtime"),
    /**
     * The principal whose `lease.use.own` reaches the resource once its
     * lease's record is deleted: the lease's creator (recorded when the
     * resource was made in the lease). Null without a lease.
     */
    leaseOwner: text("lease_owner"),
    /**
     * Files saved as a deployment's outputs: the run (action and epoch) that
     * saved them (CreateFileRequest.output_of). A run lost before it ended
     * takes the ones its lease still owns with it (trigger
     * attempts_discard_lost_outputs, migration 0014).
     */
    outputActionId: text("output_action_id"),
    outputEpoch: bigint("output_epoch", { mode: "number" }),
    /**
     * The client's idempotency key (Create*Request.request_id), unique per
     * principal (`requested_by`, set with it) like actions' and leases'.
     */
    requestId: text("request_id"),
    requestedBy: text("requested_by"),
    /** Hash of the create request, to tell a retry from a conflicting reuse of request_id. */
    requestHash: text("request_hash"),
  },
  (t) => [
    index("resources_lease_idx").on(t.leaseId, t.ownership),
    // Partial: only outputs have a run; the trigger finds a lost run's files through it.
    index("resources_output_run_idx")
      .on(t.outputActionId, t.outputEpoch)
      .where(sql`${t.outputActionId} is not null`),
    index("resources_kind_idx").on(t.kind),
    // A deployment's action is kept past --history-retention while the deployment exists.
    index("resources_action_idx").on(t.actionId).where(sql`${t.actionId} is not null`),
    uniqueIndex("resources_requested_by_request_id_key").on(t.requestedBy, t.requestId),
  ],
);

/**
 * One row: how far --history-retention has removed the event log. Every event
 * removed had a sequence at most `events_removed_through`, so a watch resuming
 * after that sequence has missed nothing (WatchEvents refuses one before it).
 */
export const history = pgTable("history", {
  /** Always true: the table holds one row. */
  singleton: boolean("singleton").primaryKey().default(true),
  eventsRemovedThrough: bigint("events_removed_through", { mode: "number" }).notNull().default(0),
});

/**
 * The server processes on the database, each marking itself alive every
 * heartbeat interval (queries/server-liveness.ts): the spreading of worker
 * streams counts only those whose mark is current and whose connections are
 * still open, not a process that hangs with its connections open nor one
 * killed a moment ago. A process deletes its row when it closes; rows of
 * processes killed long ago are deleted by the others' marks.
 */
export const serverProcesses = pgTable("server_processes", {
  /** The process's server id (new at every start). */
  id: text("id").primaryKey(),
  /** Its connections' `application_name` (unique per process: see database.ts). */
  applicationName: text("application_name").notNull(),
  /** Counted as a server process until then (its last mark plus a few intervals). */
  aliveUntil: tstz("alive_until").notNull(),
});
