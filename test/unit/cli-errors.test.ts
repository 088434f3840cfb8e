import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { accessOf } from "../../src/auth/access.js";
import { refusedChunk } from "../../src/cli/action-commands.js";
import { jsonObjectOption } from "../../src/cli/json-option.js";
import { durationText } from "../../src/cli/lease-commands.js";
import { cliErrorFrom, EXIT } from "../../src/cli/output.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { toStatusObject } from "../../src/rpc/status.js";

/** The error a client gets for a status the server sent. */
const fromServer = (error: LeaseholdError) => {
  const status = toStatusObject(error, pino({ level: "silent" }), "/test");
  return Object.assign(new Error(status.details), status);
};

describe("a request too large for the server", () => {
  it("over its receive limit says the limit and what to do, not grpc-js's words (exit 1: the server refused it, as a file over --max-file-size)", () => {
    const refused = Object.assign(
      new Error("8 RESOURCE_EXHAUSTED: Received message larger than max (5242941 vs 4194304)"),
      {
        code: 8,
        details: "Received message larger than max (5242941 vs 4194304)",
      },
    );
    const error = cliErrorFrom(refused, "127.0.0.1:50051");
    expect(error.exitCode).toBe(EXIT.failed);
    expect(error.message).toBe(
      "the request (5242941 bytes) is too large for the server at 127.0.0.1:50051: it refuses requests over " +
        "4194304 bytes (its --max-file-size plus 1 MiB); send less, or raise the server's --max-file-size",
    );
  });

  it("a JSON flag over the server's payload limits is refused before it is sent, naming the flag", async () => {
    const big = JSON.stringify({ rows: "x".repeat(5 * 1024 * 1024) });
    await expect(jsonObjectOption("--result", big)).rejects.toMatchObject({
      exitCode: EXIT.usage,
      message: "--result: must be at most 1 MiB as JSON",
    });
    await expect(jsonObjectOption("--body", '{"a": "b\\u0000"}')).rejects.toMatchObject({
      exitCode: EXIT.usage,
      message: '--body["a"]: must not contain NUL (\\u0000) characters',
    });
    expect(await jsonObjectOption("--result", '{"passed": true}')).toEqual({ passed: true });
  });
});

describe("the CLI's exit code for a failed call", () => {
  it("is 1 for the server's own DEADLINE_EXCEEDED: what it waited for did not happen in time", () => {
    const error = cliErrorFrom(
      fromServer(
        new LeaseholdError(Code.DeadlineExceeded, "deployments d1 (STOPPING) did not save their outputs"),
      ),
      "127.0.0.1:50051",
    );
    expect(error).toMatchObject({
      exitCode: EXIT.failed,
      message: "deployments d1 (STOPPING) did not save their outputs",
    });
  });

  it("names the flag of the filter a scoped caller's list must set, not only the request's field", () => {
    const team = accessOf("team-b", [{ role: "reader", clusters: ["b"], workerIds: "*" }]);
    const refusal = (field?: "cluster" | "runtime") => {
      try {
        team.requireListScope("action.read", "", field);
      } catch (error) {
        return cliErrorFrom(fromServer(error as LeaseholdError), "127.0.0.1:50051");
      }
      throw new Error("not refused");
    };
    expect(refusal()).toMatchObject({
      exitCode: EXIT.failed,
      message:
        '"team-b" lacks the right action.read in every cluster; name one of its clusters in the ' +
        "request's cluster filter (leasehold: --cluster <name>)",
    });
    expect(refusal("runtime").message).toMatch(/request's runtime filter \(leasehold: --runtime <name>\)$/);
  });

  it("is 3 for a call the server or the connection cancelled, saying its outcome is unknown", () => {
    const cancelled = Object.assign(new Error("1 CANCELLED: Call cancelled"), {
      code: 1,
      details: "Call cancelled",
    });
    expect(cliErrorFrom(cancelled, "127.0.0.1:50051")).toMatchObject({
      exitCode: EXIT.unreachable,
      message:
        "the call to the server at 127.0.0.1:50051 ended before its answer (Call cancelled; the server may be stopping): " +
        "a change it asked for may or may not have been made; run it again (with --request-id a submit is not made twice)",
    });
  });

  it("is 3 when the call's own deadline passed without an answer, and for UNAVAILABLE", () => {
    const unanswered = Object.assign(new Error("Deadline exceeded"), {
      code: 4,
      details: "Deadline exceeded",
    });
    expect(cliErrorFrom(unanswered, "127.0.0.1:50051").exitCode).toBe(EXIT.unreachable);
    const down = fromServer(
      new LeaseholdError(Code.Unavailable, "the database cannot be reached; retry later"),
    );
    expect(cliErrorFrom(down, "127.0.0.1:50051")).toMatchObject({
      exitCode: EXIT.unreachable,
      message: "the server at 127.0.0.1:50051 is unavailable: the database cannot be reached; retry later",
    });
  });

  it("tells, for a chunk of submit --from, a call refused unserved from one whose outcome is unknown", () => {
    const chunk = [1, 2].map((line) => ({ line, request: { cluster: "east" } })) as never;
    const said = (reason: string) =>
      refusedChunk(
        fromServer(new LeaseholdError(Code.Unavailable, reason, { reason })),
        chunk,
        0,
        chunk,
        "s:1",
      ).message;
    expect(said("DATABASE_UNREACHABLE")).toMatch(
      /the call for lines 1–2 was refused, so nothing from it on was submitted$/,
    );
    expect(said("STARTING")).toMatch(/was refused, so nothing from it on was submitted$/);
    expect(said("OUTCOME_UNKNOWN")).toMatch(
      /the call for lines 1–2 was in flight, and may or may not have been submitted/,
    );
  });

  it("says a server's certificate was not trusted, not that the server may not run, whatever TLS found wrong", () => {
    const unreachable = (lastError: string) =>
      cliErrorFrom(
        { code: 14, details: `No connection established. Last error: ${lastError}. Resolution note: ` },
        "s:1",
      );
    for (const why of [
      "self-signed certificate in certificate chain",
      "self-signed certificate",
      "unable to get local issuer certificate",
      "certificate has expired",
    ]) {
      expect(unreachable(`Error: ${why}`)).toMatchObject({
        exitCode: EXIT.unreachable,
        message: expect.stringMatching(
          new RegExp(
            `^the server at s:1 answered, but its certificate was not trusted \\(${why}\\): pass --tls-ca <ca\\.pem>`,
          ),
        ),
      });
    }
    expect(unreachable("Error: connect ECONNREFUSED 127.0.0.1:1").message).toMatch(/is it running\?/);
    // A server refusing the client's certificate: the client's certificate is the one to fix.
    const alert =
      "Error: 80ECE:error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca:ssl/record/rec_layer_s3.c:1605:SSL alert number 48";
    expect(unreachable(alert).message).toBe(
      "the server at s:1 refused the TLS connection (tlsv1 alert unknown ca): it wants a client certificate " +
        "it trusts; pass --tls-cert <cert.pem> and --tls-key <key.pem> with one its client CA signed",
    );
  });

  it("writes a server's limit as a duration flag takes it, in the largest unit that holds it whole", () => {
    expect([86_400_000, 5_400_000, 90_000, 1500].map(durationText)).toEqual(["24h", "90m", "90s", "1500ms"]);
  });
});
