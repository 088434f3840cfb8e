import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { toStatusObject } from "../../src/rpc/status.js";
import { statusDetails } from "../helpers/status.js";

describe("statuses", () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it("cut messages and details to a bounded size whatever the error holds", () => {
    const long = "x".repeat(1024 * 1024);
    const status = toStatusObject(
      new LeaseholdError(Code.InvalidArgument, long, {
        fieldViolations: Array.from({ length: 100 }, () => ({ field: long, description: long })),
      }),
      pino({ level: "silent" }),
      "m",
    );
    expect(status.details.length).toBeLessThanOrEqual(1025);
    expect(statusDetails(status.metadata).fields).toHaveLength(16);
    const bin = status.metadata?.get("grpc-status-details-bin")[0] as Buffer;
    expect(bin.byteLength).toBeLessThan(16 * 1024);
  });

  it("give an error without a reason of its own its code's gRPC name as reason", () => {
    const reasonOf = (code: Code) =>
      statusDetails(toStatusObject(new LeaseholdError(code, "m"), pino({ level: "silent" }), "m").metadata)
        .reason;
    expect(reasonOf(Code.DeadlineExceeded)).toBe("DEADLINE_EXCEEDED");
    expect(reasonOf(Code.Canceled)).toBe("CANCELLED");
    expect(reasonOf(Code.FailedPrecondition)).toBe("FAILED_PRECONDITION");
    expect(reasonOf(Code.NotFound)).toBe("NOT_FOUND");
  });

  it("log unexpected errors of a method at most ten times a minute, then count them", () => {
    vi.useFakeTimers();
    vi.setSystemTime(new Date("2026-12-02T12:00:00Z"));
    const lines: { msg: string; suppressed?: number; err?: { message: string } }[] = [];
    const log = pino({ level: "error" }, { write: (line: string) => lines.push(JSON.parse(line)) });
    for (let i = 0; i < 25; i++) toStatusObject(new Error(`boom ${i}`), log, "svc/M");
    expect(lines.filter((l) => l.err)).toHaveLength(10);
    expect(lines.filter((l) => !l.err)).toEqual([
      expect.objectContaining({ msg: expect.stringMatching(/^more unexpected errors of this method/) }),
    ]);
    // Another method has a budget of its own.
    toStatusObject(new Error("other"), log, "svc/Other");
    expect(lines.at(-1)?.err?.message).toBe("other");
    // A minute later the next one is logged with the count of those not logged.
    vi.setSystemTime(new Date("2026-12-02T12:01:00Z"));
    toStatusObject(new Error("later"), log, "svc/M");
    expect(lines.at(-1)).toMatchObject({ suppressed: 15, err: { message: "later" } });
  });

  it("answer a database that refused before doing anything UNAVAILABLE, reason DATABASE_UNREACHABLE; one lost mid-statement keeps its own", () => {
    const log = pino({ level: "silent" });
    const answer = (code: string, severity = "ERROR") => {
      const error = Object.assign(new Error("driver"), { name: "PostgresError", code, severity });
      const status = toStatusObject(error, log, "m");
      return { code: status.code as number, reason: statusDetails(status.metadata).reason };
    };
    const refused = { code: Code.Unavailable, reason: "DATABASE_UNREACHABLE" };
    // A read-only database: a standby, a demoted primary, default_transaction_read_only.
    expect(answer("25006")).toEqual(refused);
    expect(answer("57P03", "FATAL")).toEqual(refused);
    expect(answer("53300", "FATAL")).toEqual(refused);
    expect(answer("ECONNREFUSED")).toEqual(refused);
    // Lost while a statement ran: a commit may have been made, so no claim that nothing was.
    expect(answer("57P01", "FATAL")).toEqual({ code: Code.Unavailable, reason: "SQLSTATE_57P01" });
    expect(answer("08006", "FATAL")).toEqual({ code: Code.Unavailable, reason: "SQLSTATE_08006" });
    expect(answer("CONNECTION_CLOSED")).toEqual({
      code: Code.Unavailable,
      reason: "SQLSTATE_CONNECTION_CLOSED",
    });
    // A role's statement_timeout or lock_timeout cancelled the statement: worth a retry, not INTERNAL.
    expect(answer("57014")).toEqual({ code: Code.Unavailable, reason: "SQLSTATE_57014" });
    expect(answer("55P03")).toEqual({ code: Code.Unavailable, reason: "SQLSTATE_55P03" });
  });
});
