import { create, toBinary } from "@bufbuild/protobuf";
import { type Any, anyPack } from "@bufbuild/protobuf/wkt";
import { Metadata, type StatusObject, type status } from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
} from "../gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../gen/google/rpc/status_pb.js";

/** ErrorInfo.domain of every error Leasehold returns. */
export const ERROR_DOMAIN = "leasehold.dev";

/**
 * SQLSTATEs and driver error codes, and the status each becomes. This table
 * and {@link toLeaseholdError} are the one place where storage errors turn
 * into statuses. Serialization failures and deadlocks are retried by the
 * store first; reaching this table means the retries ran out.
 */
const SQL_CODES: ReadonlyArray<readonly [test: (code: string) => boolean, Code, string]> = [
  [(c) => c === "23505", Code.AlreadyExists, "the entity already exists"],
  [(c) => c === "23503", Code.FailedPrecondition, "a referenced entity does not exist"],
  [(c) => c === "40001" || c === "40P01", Code.Aborted, "a concurrent change conflicted; retry the call"],
  [(c) => c.startsWith("08"), Code.Unavailable, "the database connection failed; retry later"],
  [(c) => c === "57P01" || c === "57P02" || c === "57P03", Code.Unavailable, "the database is unavailable"],
  [(c) => c.startsWith("53"), Code.Unavailable, "the database is out of resources; retry later"],
  [
    (c) =>
      c === "ECONNREFUSED" ||
      c === "ECONNRESET" ||
      c === "ETIMEDOUT" ||
      c === "CONNECTION_CLOSED" ||
      c === "CONNECTION_ENDED" ||
      c === "CONNECTION_DESTROYED" ||
      c === "CONNECT_TIMEOUT",
    Code.Unavailable,
    "the database cannot be reached; retry later",
  ],
];

/** The SQLSTATE or driver code of an error or of any error in its cause chain. */
function storageCode(error: unknown): string | undefined {
  for (let e = error, depth = 0; e !== null && typeof e === "object" && depth < 8; depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}

/**
 * Turns anything thrown into a LeaseholdError. Known storage failures get
 * their status from {@link SQL_CODES}; anything else is INTERNAL with a
 * generic message (the original stays in `cause`, for the log only).
 */
export function toLeaseholdError(error: unknown): LeaseholdError {
  if (error instanceof LeaseholdError) return error;
  const code = storageCode(error);
  if (code !== undefined) {
    for (const [test, status, message] of SQL_CODES) {
      if (test(code))
        return new LeaseholdError(status, message, { reason: `SQLSTATE_${code}`, cause: error });
    }
  }
  return new LeaseholdError(Code.Internal, "internal error; the server log has the details", {
    reason: "INTERNAL",
    cause: error,
  });
}

/**
 * The grpc-js status for an error, with a google.rpc.Status in
 * `grpc-status-details-bin`. INTERNAL errors are logged with their cause;
 * other errors are the caller's business and are not logged.
 */
export function toStatusObject(error: unknown, log: Logger, method: string): StatusObject {
  const e = toLeaseholdError(error);
  if (e.code === Code.Internal || e.code === Code.Unknown) {
    log.error({ err: e.cause ?? e, method }, "handler failed with an unexpected error");
  }
  const details: Any[] = [
    anyPack(
      ErrorInfoSchema,
      create(ErrorInfoSchema, {
        reason: e.reason ?? Code[e.code] ?? "UNKNOWN",
        domain: ERROR_DOMAIN,
        metadata: { ...e.metadata },
      }),
    ),
  ];
  if (e.fieldViolations.length > 0) {
    details.push(
      anyPack(BadRequestSchema, create(BadRequestSchema, { fieldViolations: [...e.fieldViolations] })),
    );
  }
  if (e.preconditionViolations.length > 0) {
    details.push(
      anyPack(
        PreconditionFailureSchema,
        create(PreconditionFailureSchema, { violations: [...e.preconditionViolations] }),
      ),
    );
  }
  const metadata = new Metadata();
  const status = create(StatusSchema, { code: e.code, message: e.message, details });
  metadata.set("grpc-status-details-bin", Buffer.from(toBinary(StatusSchema, status)));
  // Code mirrors the wire numbers, so it is a valid grpc-js Status.
  return { code: e.code as number as status, details: e.message, metadata };
}
