import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { waitForLease } from "../../src/cli/lease-run.js";
import type { WaitLeaseResponse } from "../../src/gen/leasehold/v1/lease_pb.js";
import { DeploymentPhase, DeploymentSchema } from "../../src/gen/leasehold/v1/resource_pb.js";

/** `lease wait --timeout 0`: one question to the server, however slow the client is to ask it. */
describe("waiting for a lease with a timeout of 0", () => {
  it("asks the server once even when the time is up before the call, and takes its verdict", async () => {
    const asked: number[] = [];
    const leases = {
      async *waitLease(request: {
        timeout?: { seconds: bigint; nanos: number };
      }): AsyncIterable<WaitLeaseResponse> {
        asked.push(Number(request.timeout?.seconds ?? 0n) * 1000 + (request.timeout?.nanos ?? 0) / 1e6);
        yield {
          $typeName: "leasehold.v1.WaitLeaseResponse",
          deployment: create(DeploymentSchema, { phase: DeploymentPhase.READY }),
          done: true,
          timedOut: false,
        };
      },
    };
    // A client whose every look at the clock is 5 ms later: the 0 ms it has are long gone.
    let clock = 0;
    const now = () => (clock += 5);
    const outcome = await waitForLease(leases as never, "l-1", 0, () => {}, { now });
    expect(asked).toEqual([1]);
    expect(outcome).toMatchObject({ ready: true, timedOut: false });
  });
});
