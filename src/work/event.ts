import type { JsonObject } from "./action.js";

/** Snake-case event kinds, as stored (the proto enum names in lower case). */
export type EventKind =
  | "action_submitted"
  | "action_cancel_requested"
  | "action_cancelled"
  | "action_succeeded"
  | "action_failed"
  | "action_retry_scheduled"
  | "lease_granted"
  | "lease_resumed"
  | "lease_expired"
  | "lease_released"
  | "lease_revoked"
  | "report_fenced"
  | "session_started"
  | "stream_lost"
  | "session_resumed"
  | "session_taken_over"
  | "session_reaped"
  | "session_closed"
  | "worker_draining"
  | "cluster_health_changed"
  | "scope_lease_created"
  | "scope_lease_committed"
  | "scope_lease_rolled_back"
  | "resource_promoted"
  | "deployment_created"
  | "outputs_requested"
  | "cluster_partitioned"
  | "cluster_recovered"
  | "cluster_expiries_resumed"
  | "scope_lease_result_set"
  | "scope_lease_deleted"
  | "scope_lease_renewed"
  | "resource_created"
  | "resource_deleted"
  | "worker_undrained"
  | "worker_forgotten"
  | "database_restored"
  | "epoch_regression"
  | "database_unreachable";

/** One stored event. */
export interface EventRecord {
  readonly sequence: number;
  readonly kind: EventKind;
  readonly at: Date;
  readonly actionId: string | null;
  readonly workerId: string | null;
  readonly cluster: string | null;
  readonly sessionId: string | null;
  readonly epoch: number | null;
  readonly leaseId: string | null;
  readonly message: string;
  readonly details: JsonObject | null;
  /**
   * The principal whose call caused it; empty for the server's own decisions
   * (expiries, TTL rollbacks, re-grants).
   */
  readonly actor: string;
}

/** Event filters, combined with AND. */
export interface EventFilter {
  readonly actionId?: string | undefined;
  readonly workerId?: string | undefined;
  readonly cluster?: string | undefined;
  readonly kind?: EventKind | undefined;
  /** Only events about this scope lease. */
  readonly leaseId?: string | undefined;
  /**
   * Only events whose cluster matches one of these globs (`*`, `?`): the
   * clusters a caller whose right to read events is bound to some clusters
   * may read. An event without a cluster matches none.
   */
  readonly clusterGlobs?: readonly string[] | undefined;
}
