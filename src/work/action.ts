/**
 * Actions as the domain sees them: no protobuf and no SQL types. The rpc layer
 * converts to and from the wire; the store converts to and from rows.
 */

/** QUEUED → LEASED → SUCCEEDED | FAILED | CANCELLED (SPEC §2). */
export type ActionState = "QUEUED" | "LEASED" | "SUCCEEDED" | "FAILED" | "CANCELLED";

/** States an action never leaves. */
export const TERMINAL_STATES: ReadonlySet<ActionState> = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

/** A JSON object (protobuf Struct). */
export type JsonObject = { [key: string]: unknown };

/** How an attempt ended. */
export type AttemptOutcome = "RUNNING" | "SUCCEEDED" | "FAILED" | "LEASE_EXPIRED" | "RELEASED" | "CANCELLED";

/** An error a worker reported. */
export interface ActionErrorInfo {
  readonly message: string;
  readonly retryable: boolean;
  readonly details?: JsonObject | undefined;
}

/** Retry policy with every default filled in. */
export interface RetryPolicy {
  readonly maxAttempts: number;
  readonly initialBackoffMs: number;
  readonly backoffMultiplier: number;
  readonly maxBackoffMs: number;
}

/** Defaults of a submitted action (documented in action.proto). */
export const ACTION_DEFAULTS = {
  retryPolicy: { maxAttempts: 3, initialBackoffMs: 1_000, backoffMultiplier: 2, maxBackoffMs: 60_000 },
  maxSystemRetries: 3,
} as const satisfies { retryPolicy: RetryPolicy; maxSystemRetries: number };

/** A validated submission. */
export interface NewAction {
  readonly requestId: string | undefined;
  /** Hash of the request, to tell a retry from a conflicting reuse of requestId. */
  readonly requestHash: string | undefined;
  readonly runId: string;
  readonly cluster: string;
  readonly labelSelector: Readonly<Record<string, string>>;
  readonly payload: JsonObject | undefined;
  readonly priority: number;
  readonly retryPolicy: RetryPolicy;
  readonly maxSystemRetries: number;
  /** W3C traceparent of the submitting span, when the server traces; its grants' spans are children of it. */
  readonly traceParent?: string | undefined;
}

/** An action as stored. */
export interface ActionRecord {
  readonly id: string;
  readonly requestId: string | null;
  readonly runId: string;
  readonly cluster: string;
  readonly labelSelector: Readonly<Record<string, string>>;
  readonly payload: JsonObject | null;
  readonly priority: number;
  readonly retryPolicy: RetryPolicy;
  readonly maxSystemRetries: number;
  readonly state: ActionState;
  readonly epoch: number;
  readonly attemptCount: number;
  readonly failureCount: number;
  readonly systemRetryCount: number;
  readonly sessionId: string | null;
  readonly workerId: string | null;
  readonly grantedAt: Date | null;
  readonly cancelRequested: boolean;
  readonly output: JsonObject | null;
  readonly lastError: ActionErrorInfo | null;
  readonly failureReason: string;
  readonly phase: string;
  /** Details of the last progress report. */
  readonly phaseDetails: JsonObject | null;
  /** A graceful stop asked of the holder (COLLECT_OUTPUTS), if any. */
  readonly stopReason: string | null;
  readonly createdAt: Date;
  readonly updatedAt: Date;
  readonly notBefore: Date;
  readonly finishedAt: Date | null;
  /** The principal that submitted it (a deployment's: the one that created the deployment). */
  readonly createdBy: string;
}

/** One grant of an action. */
export interface AttemptRecord {
  readonly actionId: string;
  readonly epoch: number;
  readonly workerId: string;
  readonly sessionId: string;
  readonly outcome: AttemptOutcome;
  readonly error: ActionErrorInfo | null;
  readonly startedAt: Date;
  readonly endedAt: Date | null;
}

/** Filters of a list call; all optional, combined with AND. */
export interface ActionFilter {
  readonly state?: ActionState | undefined;
  readonly cluster?: string | undefined;
  readonly runId?: string | undefined;
  /** Actions this worker was granted, now or before (its `lease_granted` events). */
  readonly workerId?: string | undefined;
}
