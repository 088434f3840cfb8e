import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { intercepting } from "../helpers/intercept-db.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";

/**
 * A scope-lease call racing another server's change to the same lease: the
 * other change is made (through this server, which is as good as another on
 * the same database) right after a chosen statement of the call, where
 * another server's could land. The answer must be one the proto documents.
 */
describe("scope lease calls racing changes from another server", () => {
  let t: TestServer | undefined;
  /** Runs once after the next statement whose text matches `pattern`, before the call goes on. */
  let after: { pattern: RegExp; run: () => Promise<unknown> } | undefined;
  /** Runs once before the next statement whose text matches `pattern`. */
  let before: { pattern: RegExp; run: () => Promise<unknown> } | undefined;

  const start = async () => {
    t = await startTestServer({
      overrides: {
        timers: false,
        wrapDb: intercepting(async (text, execute) => {
          const first = before;
          if (first?.pattern.test(text)) {
            before = undefined;
            await first.run();
          }
          const result = await execute();
          const then = after;
          if (then?.pattern.test(text)) {
            after = undefined;
            await then.run();
          }
          return result;
        }),
      },
    });
    return t;
  };
  afterEach(async () => {
    after = undefined;
    before = undefined;
    await t?.[Symbol.asyncDispose]();
    t = undefined;
  });

  const closedLease = async (server: TestServer) => {
    const leases = server.client(LeaseService);
    const id = (await leases.createLease({ runtime: "east", ttl: { seconds: 600n } })).lease?.id ?? "";
    await leases.rollbackLease({ leaseId: id });
    return id;
  };

  it("answers a result set just before the lease is deleted with the lease as written, never INTERNAL", async () => {
    const server = await start();
    const leases = server.client(LeaseService);
    const id = await closedLease(server);
    let deleted = false;
    after = {
      pattern: /update scope_leases set result/,
      run: async () => {
        await leases.deleteLease({ leaseId: id });
        deleted = true;
      },
    };
    const answer = await leases.setResult({ leaseId: id, result: { passed: 3 } });
    expect(deleted).toBe(true);
    expect(answer.lease).toMatchObject({ id, state: LeaseState.ROLLED_BACK, result: { passed: 3 } });
    // After the delete, the same call is NOT_FOUND, as lease.proto says.
    await expectStatus(leases.setResult({ leaseId: id, result: { passed: 4 } }), Code.NotFound, /not found/);
  });

  it("answers NOT_FOUND to a delete that another delete beat, not OK for a delete that did nothing", async () => {
    const server = await start();
    const leases = server.client(LeaseService);
    const id = await closedLease(server);
    let other: Promise<unknown> | undefined;
    before = {
      pattern: /delete from scope_leases/,
      run: () => {
        other = leases.deleteLease({ leaseId: id });
        return other;
      },
    };
    await expectStatus(leases.deleteLease({ leaseId: id }), Code.NotFound, /not found/);
    await expect(other).resolves.toBeDefined();
  });

  it("refuses a deployment whose own-lease inputs a rollback destroyed after the open check with LEASE_CLOSED", async () => {
    const server = await start();
    const leases = server.client(LeaseService);
    const resources = server.client(ResourceService);
    const leaseId = (await leases.createLease({ runtime: "east", ttl: { seconds: 600n } })).lease?.id ?? "";
    const files: string[] = [];
    for (const name of ["a.txt", "b.txt"]) {
      const created = await resources.createFile({ leaseId, name, content: new TextEncoder().encode(name) });
      files.push(created.resource?.id ?? "");
    }
    const spec = {
      containers: [{ name: "c", command: { argv: ["true"] } }],
      inputs: files.map((fileId, i) => ({ fileId, path: `in${i}` })),
    };
    let rolledBack = false;
    // The inputs' read comes after the open check: the rollback lands between the two.
    before = {
      pattern: /from resources\s+where id/,
      run: async () => {
        await leases.rollbackLease({ leaseId });
        rolledBack = true;
      },
    };
    const refused = await expectStatus(
      resources.createDeployment({ leaseId, spec }),
      Code.FailedPrecondition,
      /cannot create a deployment in it: lease .* is ROLLED_BACK/,
    );
    expect(rolledBack).toBe(true);
    expect(refused.reason).toBe("LEASE_CLOSED");
    // A missing input of an open lease is still the input's fault.
    const open = (await leases.createLease({ runtime: "east", ttl: { seconds: 600n } })).lease?.id ?? "";
    const missing = await expectStatus(
      resources.createDeployment({ leaseId: open, spec }),
      Code.InvalidArgument,
      /no file resource/,
    );
    expect(missing.fields).toEqual(["spec.inputs[0].file_id", "spec.inputs[1].file_id"]);
  });
});
