import { SQL, StringChunk } from "drizzle-orm";

/** A statement's text with `$1`… placeholders, and its parameters in order. */
export interface QueryText {
  readonly sql: string;
  readonly params: unknown[];
}

/**
 * The text and parameters drizzle's `PgDialect.sqlToQuery` gives for a
 * statement made only of `sql` templates, `sql.raw`, `sql.join` and plain
 * values (strings, numbers, booleans, bigints, null): the shape of every
 * hot-path statement. Undefined for anything else (a table, a column, a
 * Date, a drizzle Param, inlined params): build those with drizzle.
 *
 * drizzle's builder checks each chunk against a dozen entity kinds and
 * merges per-chunk results; for the settle-and-grant statement that took
 * about 15 µs a round, a fifth of the server's own work when one slot
 * keeps one statement busy. This walk takes a few.
 */
export function simpleQueryText(query: SQL): QueryText | undefined {
  const params: unknown[] = [];
  const parts: string[] = [];
  return appendChunks(query, parts, params) ? { sql: parts.join(""), params } : undefined;
}

function appendChunks(query: SQL, parts: string[], params: unknown[]): boolean {
  if ((query as unknown as { shouldInlineParams: boolean }).shouldInlineParams) return false;
  for (const chunk of query.queryChunks) {
    if (chunk instanceof StringChunk) {
      for (const s of chunk.value) parts.push(s);
    } else if (chunk instanceof SQL) {
      if (!appendChunks(chunk, parts, params)) return false;
    } else if (chunk === undefined) {
      // drizzle writes nothing for it
    } else if (
      chunk === null ||
      typeof chunk === "string" ||
      typeof chunk === "number" ||
      typeof chunk === "boolean" ||
      typeof chunk === "bigint"
    ) {
      params.push(chunk);
      parts.push(`$${params.length}`);
    } else {
      return false;
    }
  }
  return true;
}
