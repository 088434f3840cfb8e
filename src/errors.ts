/**
 * gRPC status codes, numbered as on the wire. Defined here, not imported from
 * grpc-js, so that domain and store code can raise coded errors without
 * depending on the transport.
 */
export enum Code {
  /** The operation was cancelled, typically by the caller. */
  Canceled = 1,
  /** An error with no better code. */
  Unknown = 2,
  /** The request is malformed; the message names the field. */
  InvalidArgument = 3,
  /** The deadline passed before the operation completed. */
  DeadlineExceeded = 4,
  /** The named entity does not exist. */
  NotFound = 5,
  /** The entity the request would create already exists. */
  AlreadyExists = 6,
  /** The caller may not do this. */
  PermissionDenied = 7,
  /** A size or quota limit was exceeded. */
  ResourceExhausted = 8,
  /** The system is not in a state that allows the operation (closed lease, stale epoch). */
  FailedPrecondition = 9,
  /** A concurrency conflict that outlasted our retries; the caller may retry. */
  Aborted = 10,
  /** A value is outside its valid range. */
  OutOfRange = 11,
  /** The method is not implemented (yet). */
  Unimplemented = 12,
  /** A bug or broken invariant; the details are logged, not returned. */
  Internal = 13,
  /** A dependency (usually the database) cannot be reached; retry later. */
  Unavailable = 14,
  /** Unrecoverable data loss. */
  DataLoss = 15,
  /** The caller did not prove who it is. */
  Unauthenticated = 16,
}

/** One invalid field of a request, as in google.rpc.BadRequest.FieldViolation. */
export interface FieldViolation {
  /** Path of the field, e.g. `retry_policy.max_attempts`. */
  readonly field: string;
  /** What is wrong and how to fix it. */
  readonly description: string;
}

/** One failed precondition, as in google.rpc.PreconditionFailure.Violation. */
export interface PreconditionViolation {
  /** Kind of precondition, e.g. `ACTION_STATE`. */
  readonly type: string;
  /** What the precondition is about, e.g. `actions/0193...`. */
  readonly subject: string;
  /** Why it failed. */
  readonly description: string;
}

/** Options of {@link LeaseholdError}. */
export interface LeaseholdErrorOptions {
  /** Stable machine-readable reason (google.rpc.ErrorInfo.reason), e.g. `LEASE_FENCED`. */
  readonly reason?: string;
  /** Extra facts for ErrorInfo.metadata. */
  readonly metadata?: Readonly<Record<string, string>>;
  /** Invalid fields, sent as google.rpc.BadRequest. */
  readonly fieldViolations?: readonly FieldViolation[];
  /** Failed preconditions, sent as google.rpc.PreconditionFailure. */
  readonly preconditionViolations?: readonly PreconditionViolation[];
  /** How long the caller should wait before it retries, sent as google.rpc.RetryInfo. */
  readonly retryDelayMs?: number;
  /** The underlying error, logged but never sent to the caller. */
  readonly cause?: unknown;
}

/** Characters of a caller's value that a message may echo. */
export const ECHO_CHARS = 64;

/**
 * A caller's value as messages echo it: JSON-quoted, and cut to its first
 * `max` characters with "…" when longer, so that no error message (or log
 * line, or trailer) grows with what a caller sent.
 */
export function quote(value: string, max = ECHO_CHARS): string {
  return value.length <= max ? JSON.stringify(value) : `${JSON.stringify(value.slice(0, max))}…`;
}

const brand = Symbol.for("leasehold.LeaseholdError");

/**
 * The one error class of Leasehold: a gRPC code, a message for people, and
 * optional machine-readable details. Anything thrown from a handler that is
 * not a LeaseholdError becomes INTERNAL with a generic message (see
 * `src/rpc/status.ts`, the one place errors are mapped to statuses).
 */
export class LeaseholdError extends Error {
  readonly code: Code;
  readonly reason: string | undefined;
  readonly metadata: Readonly<Record<string, string>>;
  readonly fieldViolations: readonly FieldViolation[];
  readonly preconditionViolations: readonly PreconditionViolation[];
  /** Milliseconds to wait before a retry (google.rpc.RetryInfo); undefined: none said. */
  readonly retryDelayMs: number | undefined;
  readonly [brand] = true;

  constructor(code: Code, message: string, options: LeaseholdErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "LeaseholdError";
    this.code = code;
    this.reason = options.reason;
    this.metadata = options.metadata ?? {};
    this.fieldViolations = options.fieldViolations ?? [];
    this.preconditionViolations = options.preconditionViolations ?? [];
    this.retryDelayMs = options.retryDelayMs;
  }

  /** `instanceof` that also holds across duplicated copies of this module. */
  static override [Symbol.hasInstance](value: unknown): boolean {
    return typeof value === "object" && value !== null && brand in value;
  }

  /** INVALID_ARGUMENT for one field; the message starts with the field's name. */
  static invalidArgument(field: string, description: string): LeaseholdError {
    return LeaseholdError.invalidFields([{ field, description }]);
  }

  /** INVALID_ARGUMENT listing every violation (the message names the first ones). */
  static invalidFields(violations: readonly FieldViolation[]): LeaseholdError {
    const message = violations.map((v) => `${v.field}: ${v.description}`).join("; ");
    return new LeaseholdError(Code.InvalidArgument, message, {
      reason: "INVALID_ARGUMENT",
      fieldViolations: violations,
    });
  }

  /** NOT_FOUND for an entity of the given kind. */
  static notFound(kind: string, id: string): LeaseholdError {
    return new LeaseholdError(Code.NotFound, `${kind} ${quote(id)} not found`, {
      reason: `${kind.toUpperCase().replaceAll(" ", "_")}_NOT_FOUND`,
      metadata: { [kind.replaceAll(" ", "_")]: id.length <= ECHO_CHARS ? id : `${id.slice(0, ECHO_CHARS)}…` },
    });
  }

  /** FAILED_PRECONDITION with one violation and a stable reason. */
  static failedPrecondition(
    reason: string,
    message: string,
    violation: PreconditionViolation,
  ): LeaseholdError {
    return new LeaseholdError(Code.FailedPrecondition, message, {
      reason,
      preconditionViolations: [violation],
    });
  }
}
