import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { type Any, anyPack, anyUnpack, durationFromMs, durationMs } from "@bufbuild/protobuf/wkt";
import { Metadata, type StatusObject, status } from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
  RetryInfoSchema,
} from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";
import { driverError } from "../store/rows.js";

/** ErrorInfo.domain of every error Leasehold returns. */
export const ERROR_DOMAIN = "leasehold.dev";

/**
 * ErrorInfo reason of a storage error that says the database refused the
 * statement before it did anything (see {@link REFUSED}): the same reason
 * the server gives calls it refuses while its watch finds the database
 * unreachable (startup-gate.ts), so a client takes the call to another server
 * as it is (rpc/failover.ts, the agents).
 */
const DATABASE_UNREACHABLE = "DATABASE_UNREACHABLE";

/**
 * SQLSTATEs and driver codes of a database that cannot take the call, and
 * refused it before running anything of it: nothing was written, so another
 * server may take the call as it is. Answered UNAVAILABLE, reason
 * DATABASE_UNREACHABLE. 25006 read_only_sql_transaction is a database that
 * refuses writes: a hot standby, a primary demoted under the servers, or
 * `default_transaction_read_only` set; it was INTERNAL, and the CLI did not
 * try its next --server. The others never got a connection: 57P03
 * cannot_connect_now (starting up, shutting down, in recovery), 53300
 * too_many_connections, 08001 and 08004 (the server could not establish one,
 * or rejected it), a refused or timed-out connect.
 */
const REFUSED: ReadonlyArray<readonly [test: (code: string) => boolean, message: string]> = [
  [
    (c) => c === "25006",
    "the database refuses writes (it is read-only: a standby, or a primary demoted or set read-only); nothing was done: retry later, or on another server",
  ],
  [
    (c) => c === "57P03" || c === "53300" || c === "08001" || c === "08004",
    "the database accepts no connection now; nothing was done: retry later, or on another server",
  ],
  [
    (c) => c === "ECONNREFUSED" || c === "CONNECT_TIMEOUT",
    "the database cannot be reached; nothing was done: retry later, or on another server",
  ],
];

/**
 * SQLSTATEs and driver error codes, and the status each becomes. This table,
 * {@link REFUSED} and {@link toLeaseholdError} are the one place where
 * storage errors turn into statuses. Serialization failures and deadlocks are
 * retried by the store first; reaching this table means the retries ran out.
 * The UNAVAILABLE ones here keep a reason of their own (`SQLSTATE_<code>`),
 * not DATABASE_UNREACHABLE: a connection lost while a statement ran (08006, a
 * reset, 57P01 admin_shutdown, 57P02 crash_shutdown) may have lost the answer
 * to a commit that was made, so the call's outcome is not known.
 */
const SQL_CODES: ReadonlyArray<readonly [test: (code: string) => boolean, Code, string]> = [
  [(c) => c === "23505", Code.AlreadyExists, "the entity already exists"],
  [(c) => c === "23503", Code.FailedPrecondition, "a referenced entity does not exist"],
  [(c) => c === "40001" || c === "40P01", Code.Aborted, "a concurrent change conflicted; retry the call"],
  [(c) => c.startsWith("08"), Code.Unavailable, "the database connection failed; retry later"],
  [(c) => c === "57P01" || c === "57P02", Code.Unavailable, "the database is unavailable"],
  [(c) => c.startsWith("53"), Code.Unavailable, "the database is out of resources; retry later"],
  // A role's or database's statement_timeout or lock_timeout, or an operator's pg_cancel_backend:
  // the statement (and its transaction) rolled back. Not a bug of the call: it may pass again.
  [
    (c) => c === "57014" || c === "55P03",
    Code.Unavailable,
    "the database cancelled a statement (statement_timeout, lock_timeout or a cancel request); retry the call",
  ],
  [
    (c) =>
      c === "ECONNRESET" ||
      c === "ETIMEDOUT" ||
      c === "CONNECTION_CLOSED" ||
      c === "CONNECTION_ENDED" ||
      c === "CONNECTION_DESTROYED",
    Code.Unavailable,
    "the database cannot be reached; retry later",
  ],
];

/**
 * An error that ended the connection (severity FATAL or PANIC) means the
 * database cannot be used now, whatever its SQLSTATE: 55000 "database … is
 * not currently accepting connections", 3D000 for a database dropped under
 * the server, 28P01 for a password changed under it. Like the health check,
 * which turns NOT_SERVING on the same errors, calls answer UNAVAILABLE.
 */
const endsConnection = (severity: unknown) => severity === "FATAL" || severity === "PANIC";

/**
 * Turns anything thrown into a LeaseholdError. Known storage failures get
 * their status from {@link SQL_CODES}; anything else is INTERNAL with a
 * generic message (the original stays in `cause`, for the log only).
 */
export function toLeaseholdError(error: unknown): LeaseholdError {
  if (error instanceof LeaseholdError) return error;
  const driver = driverError(error);
  if (driver !== undefined) {
    const { code, severity } = driver;
    for (const [test, message] of REFUSED) {
      if (test(code))
        return new LeaseholdError(Code.Unavailable, message, {
          reason: DATABASE_UNREACHABLE,
          metadata: { sqlstate: code },
          cause: error,
        });
    }
    for (const [test, status, message] of SQL_CODES) {
      if (test(code))
        return new LeaseholdError(status, message, { reason: `SQLSTATE_${code}`, cause: error });
    }
    if (endsConnection(severity)) {
      return new LeaseholdError(Code.Unavailable, "the database refused the connection; retry later", {
        reason: `SQLSTATE_${code}`,
        cause: error,
      });
    }
  }
  return new LeaseholdError(Code.Internal, "internal error; the server log has the details", {
    reason: "INTERNAL",
    cause: error,
  });
}

/** Longest status message sent; the rest is cut. Statuses travel in HTTP/2 trailers, which must stay small. */
const MAX_MESSAGE_CHARS = 1024;
/** Most field violations sent in a BadRequest, and the longest field path and description. */
const MAX_VIOLATIONS = 16;
const MAX_FIELD_CHARS = 256;
const MAX_DESCRIPTION_CHARS = 512;

const cut = (text: string, max: number) => (text.length <= max ? text : `${text.slice(0, max)}…`);

/**
 * Unexpected errors are logged with their stack, but at most
 * {@link LOG_BURST} per method in each {@link LOG_WINDOW_MS}: a bug that
 * every call hits must not flood the log at the call rate. The rest are
 * counted, and the count goes with the next error logged.
 */
const LOG_WINDOW_MS = 60_000;
const LOG_BURST = 10;
const logBudgets = new WeakMap<
  Logger,
  Map<string, { windowStart: number; logged: number; suppressed: number }>
>();

function logUnexpected(log: Logger, method: string, error: LeaseholdError): void {
  let budgets = logBudgets.get(log);
  if (!budgets) {
    budgets = new Map();
    logBudgets.set(log, budgets);
  }
  const now = Date.now();
  let budget = budgets.get(method);
  if (!budget || now - budget.windowStart >= LOG_WINDOW_MS) {
    budget = { windowStart: now, logged: 0, suppressed: budget?.suppressed ?? 0 };
    budgets.set(method, budget);
  }
  if (budget.logged < LOG_BURST) {
    budget.logged += 1;
    const suppressed = budget.suppressed;
    budget.suppressed = 0;
    log.error(
      { err: error.cause ?? error, method, ...(suppressed > 0 ? { suppressed } : {}) },
      "handler failed with an unexpected error",
    );
    return;
  }
  if (budget.suppressed === 0) {
    log.error(
      { method, limit: LOG_BURST, windowMs: LOG_WINDOW_MS },
      "more unexpected errors of this method; counting them instead of logging each until the window ends",
    );
  }
  budget.suppressed += 1;
}

/**
 * The grpc-js status for an error, with a google.rpc.Status in
 * `grpc-status-details-bin`. INTERNAL errors are logged with their cause
 * (rate-limited per method); other errors are the caller's business and are
 * not logged. Messages and details are cut to a bounded size whatever the
 * error holds.
 */
export function toStatusObject(error: unknown, log: Logger, method: string): StatusObject {
  const { code, message, details } = toStatus(error, log, method);
  const metadata = new Metadata();
  const status = create(StatusSchema, { code, message, details: [...details] });
  metadata.set("grpc-status-details-bin", Buffer.from(toBinary(StatusSchema, status)));
  // Code mirrors the wire numbers, so it is a valid grpc-js Status.
  return { code: code as number as status, details: message, metadata };
}

/**
 * ErrorInfo.reason of a failed call's status (`grpc-status-details-bin`), as
 * a client reads it; undefined when there is none or it cannot be read.
 */
export function errorReasonOf(error: unknown): string | undefined {
  return errorInfoOf(error)?.reason;
}

/**
 * ErrorInfo (reason and metadata) of a failed call's status
 * (`grpc-status-details-bin`), as a client reads it; undefined when there is
 * none or it cannot be read.
 */
export function errorInfoOf(
  error: unknown,
): { readonly reason: string; readonly metadata: Readonly<Record<string, string>> } | undefined {
  const bin = (error as { metadata?: Metadata } | undefined)?.metadata?.get?.("grpc-status-details-bin")?.[0];
  if (!(bin instanceof Buffer)) return undefined;
  try {
    for (const detail of fromBinary(StatusSchema, bin).details) {
      const info = anyUnpack(detail, ErrorInfoSchema);
      if (info) return { reason: info.reason, metadata: info.metadata };
    }
  } catch {
    // Not a google.rpc.Status: no reason.
  }
  return undefined;
}

/**
 * The retry delay of a failed call's status (google.rpc.RetryInfo in
 * `grpc-status-details-bin`), in milliseconds, as a client reads it;
 * undefined when there is none or it cannot be read.
 */
export function retryDelayMsOf(error: unknown): number | undefined {
  const bin = (error as { metadata?: Metadata } | undefined)?.metadata?.get?.("grpc-status-details-bin")?.[0];
  if (!(bin instanceof Buffer)) return undefined;
  try {
    for (const detail of fromBinary(StatusSchema, bin).details) {
      const info = anyUnpack(detail, RetryInfoSchema);
      if (info?.retryDelay) return durationMs(info.retryDelay);
    }
  } catch {
    // Not a google.rpc.Status: no delay.
  }
  return undefined;
}

/**
 * The receive limit a server refused a request for being over, in bytes: what
 * grpc-js says as RESOURCE_EXHAUSTED "Received message larger than max
 * (5000015 vs 4194304)", before the server reads it (for Leasehold, its
 * --max-file-size plus 1 MiB). Undefined for any other error.
 */
export function receiveLimitOf(error: unknown): number | undefined {
  const e = error as { code?: number; details?: string };
  const over = /^Received message larger than max \(\d+ vs (\d+)\)/.exec(e.details ?? "");
  return e.code === 8 && over ? Number(over[1]) : undefined;
}

/** The parts of a google.rpc.Status, whatever protocol carries them. */
export interface StatusParts {
  readonly code: Code;
  readonly message: string;
  readonly details: readonly Any[];
}

/**
 * The status for an error, transport aside: {@link toStatusObject} sends it
 * over gRPC, the console over Connect. INTERNAL errors are logged here.
 */
export function toStatus(error: unknown, log: Logger, method: string): StatusParts {
  const e = toLeaseholdError(error);
  if (e.code === Code.Internal || e.code === Code.Unknown) logUnexpected(log, method, e);
  const message = cut(e.message, MAX_MESSAGE_CHARS);
  const details: Any[] = [
    anyPack(
      ErrorInfoSchema,
      create(ErrorInfoSchema, {
        // Without a reason of its own: the code's gRPC name (DEADLINE_EXCEEDED), UPPER_SNAKE like
        // every documented reason, not the TypeScript enum's name (DeadlineExceeded).
        reason: e.reason ?? status[e.code] ?? "UNKNOWN",
        domain: ERROR_DOMAIN,
        metadata: Object.fromEntries(
          Object.entries(e.metadata).map(([k, v]) => [cut(k, MAX_FIELD_CHARS), cut(v, MAX_FIELD_CHARS)]),
        ),
      }),
    ),
  ];
  if (e.fieldViolations.length > 0) {
    details.push(
      anyPack(
        BadRequestSchema,
        create(BadRequestSchema, {
          fieldViolations: e.fieldViolations.slice(0, MAX_VIOLATIONS).map((v) => ({
            field: cut(v.field, MAX_FIELD_CHARS),
            description: cut(v.description, MAX_DESCRIPTION_CHARS),
          })),
        }),
      ),
    );
  }
  if (e.preconditionViolations.length > 0) {
    details.push(
      anyPack(
        PreconditionFailureSchema,
        create(PreconditionFailureSchema, {
          violations: e.preconditionViolations.slice(0, MAX_VIOLATIONS).map((v) => ({
            type: cut(v.type, MAX_FIELD_CHARS),
            subject: cut(v.subject, MAX_FIELD_CHARS),
            description: cut(v.description, MAX_DESCRIPTION_CHARS),
          })),
        }),
      ),
    );
  }
  if (e.retryDelayMs !== undefined) {
    details.push(
      anyPack(RetryInfoSchema, create(RetryInfoSchema, { retryDelay: durationFromMs(e.retryDelayMs) })),
    );
  }
  return { code: e.code, message, details };
}
