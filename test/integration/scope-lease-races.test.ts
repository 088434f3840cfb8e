import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { CLOSE_TRIES } from "../../src/store/scope-leases.js";
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
  /** Every statement whose text matches it fails as a deadlock victim does (40P01). */
  let conflicting: RegExp | undefined;
  /** Deadlocks met (thrown) so far. */
  let conflicts = 0;
  const deadlock = (): never => {
    conflicts++;
    throw Object.assign(new Error("deadlock detected"), { code: "40P01" });
  };

  const start = async () => {
    t = await startTestServer({
      overrides: {
        timers: false,
        wrapDb: intercepting(async (text, execute) => {
          if (conflicting?.test(text)) deadlock();
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
    conflicting = undefined;
    conflicts = 0;
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

  it("runs a rollback whose cancel met a deadlock again instead of answering ABORTED; a second rollback still loses", async () => {
    const server = await start();
    const leases = server.client(LeaseService);
    const resources = server.client(ResourceService);
    const actions = server.client(ActionService);
    const leaseId = (await leases.createLease({ runtime: "east", ttl: { seconds: 600n } })).lease?.id ?? "";
    const spec = { containers: [{ name: "c", command: { argv: ["sleep", "600"] } }] };
    const actionIds: string[] = [];
    for (let i = 0; i < 3; i++) {
      const { resource } = await resources.createDeployment({ leaseId, spec });
      actionIds.push(resource?.body.case === "deployment" ? resource.body.value.actionId : "");
    }
    const cancel = /update actions a set state = 'CANCELLED'/;
    // The deployments' cancel fails once as PostgreSQL fails the statement its deadlock detector
    // picks (a batch of reports locking the same rows), which ends its transaction.
    before = { pattern: cancel, run: async () => deadlock() };
    const answer = await leases.rollbackLease({ leaseId });
    expect(conflicts).toBe(1);
    expect(answer.lease?.state).toBe(LeaseState.ROLLED_BACK);
    expect(answer.destroyedResources).toBe(3);
    expect((await resources.listResources({ leaseId })).resources).toEqual([]);
    for (const actionId of actionIds)
      expect((await actions.getAction({ actionId })).action?.state).toBe(ActionState.CANCELLED);
    // One close wins; another is refused as before.
    await expectStatus(leases.rollbackLease({ leaseId }), Code.FailedPrecondition, /ROLLED_BACK/);

    // A conflict on every try is answered ABORTED in the end; the lease stays open, to close again.
    const other = (await leases.createLease({ runtime: "east", ttl: { seconds: 600n } })).lease?.id ?? "";
    await resources.createDeployment({ leaseId: other, spec });
    conflicts = 0;
    conflicting = cancel;
    await expectStatus(leases.rollbackLease({ leaseId: other }), Code.Aborted, /retry the call/);
    expect(conflicts).toBe(CLOSE_TRIES);
    conflicting = undefined;
    expect((await leases.getLease({ leaseId: other })).lease?.state).toBe(LeaseState.OPEN);
    expect((await leases.rollbackLease({ leaseId: other })).lease?.state).toBe(LeaseState.ROLLED_BACK);
  });
});
