import { describe, expect, it } from "vitest";
import { unreachableWhy } from "../../src/cli/output.js";

describe("unreachableWhy", () => {
  it("keeps what a user needs from grpc-js's UNAVAILABLE details", () => {
    const refused =
      "No connection established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: ";
    expect(unreachableWhy({ code: 14, details: refused })).toBe("connect ECONNREFUSED 127.0.0.1:1");
    expect(unreachableWhy(`14 UNAVAILABLE: ${refused}`)).toBe("connect ECONNREFUSED 127.0.0.1:1");
    expect(unreachableWhy({ details: "Name resolution failed for target dns:nope.invalid:5" })).toBe(
      "Name resolution failed for target dns:nope.invalid:5",
    );
    // Node's error code in brackets says nothing to a user either.
    const altnames =
      "No connection established. Last error: Error [ERR_TLS_CERT_ALTNAME_INVALID]: Hostname/IP does not match certificate's altnames: Host: localhost. is not cert's CN: s1. Resolution note: ";
    expect(unreachableWhy({ details: altnames })).toBe(
      "Hostname/IP does not match certificate's altnames: Host: localhost. is not cert's CN: s1",
    );
    // A resolution note that says something stays.
    expect(unreachableWhy({ details: "No connection established. Resolution note: no addresses" })).toBe(
      "No connection established. Resolution note: no addresses",
    );
  });
});
