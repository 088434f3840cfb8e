import { DrizzleQueryError } from "drizzle-orm/errors";
import { stdSerializers } from "pino";

/** Characters of a failed statement's text kept in a log line. */
export const LOGGED_QUERY_CHARS = 200;

/**
 * The log's `err` serializer: pino's, except for a statement that failed.
 * drizzle wraps the driver's error in one whose message is the whole
 * statement and every parameter ("Failed query: … params: …"), repeated in
 * its stack: during an outage a warning ran to 9 KB, and the audit's
 * listed every lease its statement carried, so it grew with the fleet.
 * Such a line keeps the driver's error as `cause`, the statement's first
 * {@link LOGGED_QUERY_CHARS} characters, and only the number of parameters
 * (they hold payloads and ids, not needed to tell what failed).
 */
export function serializeError(error: unknown): unknown {
  if (!(error instanceof DrizzleQueryError)) return stdSerializers.err(error as Error);
  const text = error.query.replace(/\s+/g, " ").trim();
  const query = text.length > LOGGED_QUERY_CHARS ? `${text.slice(0, LOGGED_QUERY_CHARS)}…` : text;
  const cause = error.cause instanceof Error ? stdSerializers.err(error.cause) : undefined;
  return {
    type: "DrizzleQueryError",
    message: `${cause?.message ?? "the statement failed"} (statement: ${query})`,
    query,
    parameters: error.params.length,
    ...(cause ? { cause } : {}),
  };
}

/** An error's message for a log line's text: a failed statement's is its cause's, without the statement. */
export function errorSummary(error: unknown): string {
  if (error instanceof DrizzleQueryError && error.cause instanceof Error) return error.cause.message;
  return error instanceof Error ? error.message : String(error);
}
