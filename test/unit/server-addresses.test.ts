import { describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { checkAddresses, splitAddresses } from "../../src/rpc/targets.js";

/** The message `checkAddresses` refuses `--server text` with, or undefined when it takes it. */
function refusal(text: string): string | undefined {
  try {
    checkAddresses(splitAddresses(text));
    return undefined;
  } catch (error) {
    expect(error).toBeInstanceOf(LeaseholdError);
    expect((error as LeaseholdError).code).toBe(Code.InvalidArgument);
    return (error as LeaseholdError).message;
  }
}

describe("the --server address check", () => {
  it("takes host:port, [ipv6]:port, lists of them, and the gRPC targets grpc-js resolves", () => {
    for (const text of [
      "127.0.0.1:50051",
      "localhost:1",
      "leasehold.example.com:65535",
      "[::1]:50051",
      "[fe80::1%eth0]:50051",
      "10.0.0.11:50051, 10.0.0.12:50051,",
      "dns:///leasehold.example.com:50051",
      "dns://8.8.8.8/leasehold.example.com:50051",
      "dns:localhost:50051",
      "ipv4:127.0.0.1:50051",
      "ipv6:[::1]:50051",
      "unix:/run/leasehold.sock",
      "unix:///run/leasehold.sock",
      "unix:relative.sock",
    ]) {
      expect(refusal(text), text).toBeUndefined();
    }
  });

  it("refuses what grpc-js cannot dial, or would dial on a port nobody meant, saying why", () => {
    const cases: [string, RegExp][] = [
      ["", /^--server: no address given; expected host:port/],
      [" , ", /no address given/],
      [
        "127.0.0.1:abc",
        /^--server: "127\.0\.0\.1:abc" has port "abc", not a whole number from 1 to 65535; expected/,
      ],
      ["127.0.0.1:0", /has port "0"/],
      ["127.0.0.1:65536", /has port "65536"/],
      ["127.0.0.1:", /has port ""/],
      ["localhost", /"localhost" has no port/],
      ["[::1]", /has no port/],
      [":50051", /has no host/],
      ["::1:50051", /an IPv6 address goes in brackets, e\.g\. \[::1\]:50051/],
      ["[localhost]:50051", /brackets around something other than an IPv6 address/],
      ["[::1]50051", /is not \[ipv6\]:port/],
      ["http://127.0.0.1:50051", /starts with a scheme: give host:port alone/],
      ["grpc://localhost", /starts with a scheme/],
      ["leasehold server:50051", /"leasehold server" as its host/],
      ["127.0.0.1:50051,127.0.0.1:x", /"127\.0\.0\.1:x" has port "x"/],
      ["ipv4:localhost:50051", /needs an IPv4 address after ipv4:/],
      ["ipv6:::1", /an IPv6 address goes in brackets/],
      ["ipv6:localhost:50051", /needs a bracketed IPv6 address after ipv6:/],
      ["dns:///localhost", /has no port/],
      ["unix:", /names no socket path/],
    ];
    for (const [text, message] of cases) expect(refusal(text), text).toMatch(message);
  });
});
