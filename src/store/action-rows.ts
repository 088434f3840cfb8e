import type {
  ActionErrorInfo,
  ActionRecord,
  ActionState,
  AttemptOutcome,
  AttemptRecord,
  JsonObject,
} from "../work/action.js";
import { toDate, toDateOrNull, toNumber } from "./rows.js";

/** An `actions` row as raw SQL returns it (snake_case columns). */
export interface ActionRow {
  id: string;
  request_id: string | null;
  run_id: string;
  cluster: string;
  label_selector: Record<string, string>;
  payload: JsonObject | null;
  priority: number;
  max_attempts: number;
  initial_backoff_ms: number;
  backoff_multiplier: number;
  max_backoff_ms: number;
  max_system_retries: number;
  state: string;
  epoch: unknown;
  attempt_count: number;
  failure_count: number;
  system_retry_count: number;
  session_id: string | null;
  worker_id: string | null;
  granted_at: unknown;
  cancel_requested: boolean;
  output: JsonObject | null;
  last_error: ActionErrorInfo | null;
  failure_reason: string;
  phase: string;
  phase_details: JsonObject | null;
  stop_reason: string | null;
  created_at: unknown;
  updated_at: unknown;
  not_before: unknown;
  finished_at: unknown;
  created_by: string;
}

export function actionFromRow(row: ActionRow): ActionRecord {
  return {
    id: row.id,
    requestId: row.request_id,
    runId: row.run_id,
    cluster: row.cluster,
    labelSelector: row.label_selector,
    payload: row.payload,
    priority: row.priority,
    retryPolicy: {
      maxAttempts: row.max_attempts,
      initialBackoffMs: row.initial_backoff_ms,
      backoffMultiplier: Number(row.backoff_multiplier),
      maxBackoffMs: row.max_backoff_ms,
    },
    maxSystemRetries: row.max_system_retries,
    state: row.state as ActionState,
    epoch: toNumber(row.epoch),
    attemptCount: row.attempt_count,
    failureCount: row.failure_count,
    systemRetryCount: row.system_retry_count,
    sessionId: row.session_id,
    workerId: row.worker_id,
    grantedAt: toDateOrNull(row.granted_at),
    cancelRequested: row.cancel_requested,
    output: row.output,
    lastError: row.last_error,
    failureReason: row.failure_reason,
    phase: row.phase,
    phaseDetails: row.phase_details ?? null,
    stopReason: row.stop_reason ?? null,
    createdAt: toDate(row.created_at),
    updatedAt: toDate(row.updated_at),
    notBefore: toDate(row.not_before),
    finishedAt: toDateOrNull(row.finished_at),
    createdBy: row.created_by,
  };
}

/** An `attempts` row as raw SQL returns it. */
export interface AttemptRow {
  action_id: string;
  epoch: unknown;
  worker_id: string;
  session_id: string;
  outcome: string;
  error: ActionErrorInfo | null;
  started_at: unknown;
  ended_at: unknown;
}

export function attemptFromRow(row: AttemptRow): AttemptRecord {
  return {
    actionId: row.action_id,
    epoch: toNumber(row.epoch),
    workerId: row.worker_id,
    sessionId: row.session_id,
    outcome: row.outcome as AttemptOutcome,
    error: row.error,
    startedAt: toDate(row.started_at),
    endedAt: toDateOrNull(row.ended_at),
  };
}
