import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { LeaseholdError } from "../../src/errors.js";
import { addressOfPeer, limitCallsPerAddress } from "../../src/rpc/calls-per-address.js";

describe("calls per address", () => {
  it("reads the address of a grpc-js peer, IPv4 or IPv6, with or without a port", () => {
    expect(addressOfPeer("127.0.0.1:5000")).toBe("127.0.0.1");
    expect(addressOfPeer("[::1]:5000")).toBe("::1");
    expect(addressOfPeer("::1")).toBe("::1");
    expect(addressOfPeer("host")).toBe("host");
  });

  it("counts each address apart, forgets a call once however often told, and has no limit at 0", () => {
    const limit = limitCallsPerAddress(2, pino({ level: "silent" }));
    const a1 = limit.enter("10.0.0.1:1");
    const a2 = limit.enter("10.0.0.1:2");
    expect(limit.enter("10.0.0.1:3")).toBeInstanceOf(LeaseholdError);
    expect(typeof limit.enter("10.0.0.2:1")).toBe("function");
    if (typeof a1 !== "function" || typeof a2 !== "function") throw new Error("admitted calls expected");
    a1();
    a1();
    expect(typeof limit.enter("10.0.0.1:4")).toBe("function");
    expect(limit.enter("10.0.0.1:5")).toMatchObject({
      reason: "CALLS_PER_ADDRESS",
      metadata: { limit: "2" },
    });
    const none = limitCallsPerAddress(0, pino({ level: "silent" }));
    for (let i = 0; i < 10; i++) expect(typeof none.enter("10.0.0.1:1")).toBe("function");
  });
});
