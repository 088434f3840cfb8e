import { DrizzleQueryError } from "drizzle-orm/errors";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { errorSummary, LOGGED_QUERY_CHARS, serializeError } from "../../src/log-errors.js";

/** One log line written with `err`, parsed. */
function logged(err: unknown): Record<string, unknown> {
  let line = "";
  const log = pino({ serializers: { err: serializeError } }, { write: (text: string) => (line = text) });
  log.warn({ err }, "something failed");
  return JSON.parse(line);
}

describe("errors in the log", () => {
  it("keeps a failed statement's cause and start, not its parameters", () => {
    const cause = Object.assign(new Error("write CONNECTION_CLOSED 127.0.0.1:5432"), {
      code: "CONNECTION_CLOSED",
    });
    const query = `update sessions\n   set deadline = $1 where id = any($2) ${"and x = y ".repeat(100)}`;
    const params = [new Date(0).toISOString(), Array.from({ length: 5000 }, (_, i) => `lease-${i}`)];
    const line = logged(new DrizzleQueryError(query, params, cause));
    const err = line.err as Record<string, unknown>;
    expect(err).toMatchObject({
      type: "DrizzleQueryError",
      parameters: 2,
      cause: { message: "write CONNECTION_CLOSED 127.0.0.1:5432", code: "CONNECTION_CLOSED" },
    });
    expect(err.query).toBe(`${query.replace(/\s+/g, " ").slice(0, LOGGED_QUERY_CHARS)}…`);
    expect(err.message).toBe(`write CONNECTION_CLOSED 127.0.0.1:5432 (statement: ${err.query})`);
    expect(JSON.stringify(line)).not.toContain("lease-4999");
    expect(JSON.stringify(line).length).toBeLessThan(3000);
  });

  it("writes any other error as pino does", () => {
    const err = logged(Object.assign(new Error("boom"), { code: "E1" })).err as Record<string, unknown>;
    expect(err).toMatchObject({ type: "Error", message: "boom", code: "E1" });
    expect(err.stack).toMatch(/^Error: boom/);
  });

  it("sums a failed statement up by its cause", () => {
    const cause = new Error("connection lost");
    expect(errorSummary(new DrizzleQueryError("select 1", [], cause))).toBe("connection lost");
    expect(errorSummary(new Error("plain"))).toBe("plain");
    expect(errorSummary("text")).toBe("text");
  });
});
