import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { Ownership, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const DAY_MS = 86_400_000;

/**
 * A committed lease's record is where the deployments its commit kept save
 * their outputs (insertResource): it stays, whether deleted by DeleteLease,
 * DeleteLeases or --history-retention, until those deployments have ended.
 */
describe("deleting a committed lease whose kept deployment still runs", () => {
  let clock: FakeClock;
  let t: TestServer | undefined;
  const workers: TestWorker[] = [];
  afterEach(async () => {
    for (const w of workers.splice(0)) w.drop();
    await t?.[Symbol.asyncDispose]();
    t = undefined;
  });

  /** A server, and a lease of runtime `runtime` committed while its deployment runs on a worker. */
  async function committedWhileRunning(runtime: string) {
    clock = createFakeClock();
    t = await startTestServer({
      config: { historyRetention: "7d", gracePeriod: "1h", heartbeatInterval: "1s" },
      overrides: { clock, timers: false },
    });
    const worker = await connectWorker(t.address, {
      workerId: `${runtime}-agent`,
      cluster: runtime,
      capacity: 1,
    });
    workers.push(worker);
    const leases = t.client(LeaseService);
    const resources = t.client(ResourceService);
    const leaseId = (await leases.createLease({ runtime, label: runtime })).lease?.id ?? "";
    const { resource } = await resources.createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: ["serve"] } }], outputsDir: "out" },
    });
    const deploymentId = resource?.id ?? "";
    const grant = await worker.next("grant");
    await leases.commitLease({ leaseId });
    return { server: t, worker, leases, resources, leaseId, deploymentId, grant };
  }

  it("refuses DeleteLease naming the deployment until it ends, and keeps the outputs it saves meanwhile", async () => {
    const { worker, leases, resources, leaseId, deploymentId, grant } = await committedWhileRunning("kept");
    const refused = await expectStatus(
      leases.deleteLease({ leaseId }),
      Code.FailedPrecondition,
      new RegExp(
        `cannot delete lease ${leaseId}: deployment ${deploymentId}, which its commit kept, has not ended`,
      ),
    );
    expect(refused.reason).toBe("DEPLOYMENT_RUNNING");
    // So an output its agent saves after the commit still finds the lease, and is kept.
    const saved = await resources.createFile({
      leaseId,
      name: "report.txt",
      content: new TextEncoder().encode("done"),
      outputOf: { deploymentId, epoch: grant.epoch },
    });
    expect(saved.resource?.ownership).toBe(Ownership.WORKSPACE);
    const fileId = saved.resource?.id ?? "";
    await worker.complete(grant, { output: { containers: [], outputFileIds: [fileId], skipped: [] } });
    // Ended: the record goes, and what the commit kept stays.
    await leases.deleteLease({ leaseId });
    await expectStatus(leases.getLease({ leaseId }), Code.NotFound, /not found/);
    expect((await resources.getResource({ resourceId: fileId })).resource?.id).toBe(fileId);
  });

  it("leaves it out of DeleteLeases, counted, until the deployment ends", async () => {
    const { worker, leases, leaseId, grant } = await committedWhileRunning("kept-bulk");
    const done = (await leases.createLease({ runtime: "kept-bulk", label: "kept-bulk" })).lease?.id ?? "";
    await leases.commitLease({ leaseId: done });
    expect(await leases.deleteLeases({ label: "kept-bulk" })).toMatchObject({
      deleted: 1,
      skippedOpen: 0,
      skippedRunning: 1,
    });
    expect((await leases.getLease({ leaseId })).lease?.state).toBe(LeaseState.COMMITTED);
    await worker.complete(grant, { output: { containers: [], outputFileIds: [], skipped: [] } });
    expect(await leases.deleteLeases({ label: "kept-bulk" })).toMatchObject({
      deleted: 1,
      skippedRunning: 0,
    });
  });

  it("keeps it past --history-retention until the deployment ends", async () => {
    const { server, worker, leases, leaseId, grant } = await committedWhileRunning("kept-retention");
    clock.advance(8 * DAY_MS);
    await server.server.history.removeDue();
    expect((await leases.getLease({ leaseId })).lease?.state).toBe(LeaseState.COMMITTED);
    await worker.complete(grant, { output: { containers: [], outputFileIds: [], skipped: [] } });
    clock.advance(8 * DAY_MS);
    expect(await server.server.history.removeDue()).toMatchObject({ leases: 1 });
    await expectStatus(leases.getLease({ leaseId }), Code.NotFound, /not found/);
  });
});
