import { create } from "@bufbuild/protobuf";
import { ConnectRequestSchema } from "../gen/leasehold/v1/worker_pb.js";
import { requestValidator } from "../rpc/request-validator.js";
import type { JsonObject } from "../work/action.js";

/**
 * The server ends a Connect stream on a message that breaks its limits (see
 * worker.proto). A report the SDK sends again after every reconnect would
 * then end every stream: a poison pill. So reports are fitted to the limits
 * before they are sent, with the server's own check.
 */
const check = requestValidator(ConnectRequestSchema);

/** U+0000 cannot be stored in PostgreSQL text or jsonb; command output may contain it. */
const REPLACEMENT = "\uFFFD";

/** A copy of `value` with every NUL in its strings and keys replaced by U+FFFD (the value itself when it has none). */
export function scrubNul<T>(value: T): T {
  if (typeof value === "string")
    return (value.includes("\u0000") ? value.replaceAll("\u0000", REPLACEMENT) : value) as T;
  if (Array.isArray(value)) return value.map((v) => scrubNul(v)) as T;
  if (value !== null && typeof value === "object") {
    const out: JsonObject = {};
    for (const [k, v] of Object.entries(value)) out[scrubNul(k)] = scrubNul(v);
    return out as T;
  }
  return value;
}

/** Why `message` would be refused, or undefined when it fits. */
export function reportViolation(
  message: Parameters<typeof create<typeof ConnectRequestSchema>>[1],
): string | undefined {
  return check(create(ConnectRequestSchema, message))?.message;
}
