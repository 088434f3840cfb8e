import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createAgent, createDeploymentHandler } from "../../src/agent/index.js";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { Ownership, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { RevokeReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { agentEvents } from "../helpers/agent-events.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { failure } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * CollectOutputs against what can happen while a deployment saves: the server
 * going away, its run lost and queued again. Workers speak the raw protocol,
 * so each step is awaited, not slept through.
 */
describe("CollectOutputs while things happen around it", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer({ config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });
  const leases = () => t.client(LeaseService);
  const resources = () => t.client(ResourceService);

  it("called again after OUTPUTS_LOST while the deployment waits to run again, collects its next run instead of cancelling it", async () => {
    const runtime = "collect-again";
    const lost = await connectWorker(t.address, { workerId: "lost-run", cluster: runtime, capacity: 1 });
    const leaseId = (await leases().createLease({ runtime })).lease?.id ?? "";
    const { resource } = await resources().createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: ["true"] } }], outputsDir: "out" },
    });
    const actionId = resource?.body.case === "deployment" ? resource.body.value.actionId : "";
    const grant = await lost.next("grant");
    const first = failure(leases().collectOutputs({ leaseId, timeout: { seconds: 60n } }));
    await lost.next("revoke", (r) => r.actionId === grant.actionId);
    lost.drop();
    const f = await first;
    expect(f.reason).toBe("OUTPUTS_LOST");
    // As its advice says, at once: the deployment is queued again, and no agent has it yet.
    expect((await t.client(ActionService).getAction({ actionId })).action?.state).toBe(ActionState.QUEUED);
    const second = leases().collectOutputs({ leaseId, timeout: { seconds: 60n } });
    const next = await connectWorker(t.address, { workerId: "next-run", cluster: runtime, capacity: 1 });
    const regrant = await Promise.race([
      next.next("grant"),
      second.then((answer) => {
        throw new Error(`the collect answered before the deployment ran again: ${JSON.stringify(answer)}`);
      }),
    ]);
    expect(regrant.epoch).toBe(grant.epoch + 1n);
    // Its next run is asked to save, and what it saves is the answer.
    const revoke = await next.next("revoke", (r) => r.actionId === actionId);
    expect(revoke.reason).toBe(RevokeReason.COLLECT_OUTPUTS);
    const saved = await resources().createFile({ leaseId, name: "report.txt", content: new Uint8Array([1]) });
    const fileId = saved.resource?.id ?? "";
    await next.complete(regrant, { output: { containers: [], outputFileIds: [fileId], skipped: [] } });
    expect((await second).fileIds).toEqual([fileId]);
    next.drop();
  }, 60_000);

  it("a run lost while it saves takes what it saved with it: after the next run the lease owns one set of outputs", async () => {
    const runtime = "collect-partial";
    const lost = await connectWorker(t.address, { workerId: "partial-run", cluster: runtime, capacity: 1 });
    const leaseId = (await leases().createLease({ runtime })).lease?.id ?? "";
    const { resource } = await resources().createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: ["true"] } }], outputsDir: "out" },
    });
    const deploymentId = resource?.id ?? "";
    const grant = await lost.next("grant");
    const first = failure(leases().collectOutputs({ leaseId, timeout: { seconds: 60n } }));
    await lost.next("revoke", (r) => r.actionId === grant.actionId);
    // Half of its outputs are up when its agent dies.
    const outputOf = { deploymentId, epoch: grant.epoch };
    const partial = await resources().createFile({
      leaseId,
      name: "a.txt",
      content: new Uint8Array([1]),
      outputOf,
    });
    lost.drop();
    expect((await first).reason).toBe("OUTPUTS_LOST");
    const files = async () =>
      (await resources().listResources({ leaseId, kind: "file" })).resources.map((r) => r.id);
    // Gone with the loss, in the same transaction: nothing of the lost run is the lease's.
    expect(await files()).toEqual([]);
    const discarded = await failure(resources().getResource({ resourceId: partial.resource?.id ?? "" }));
    expect(discarded.code).toBe(Code.NotFound);
    // Its late uploads are refused: that run saves nothing more.
    const late = await failure(
      resources().createFile({ leaseId, name: "b.txt", content: new Uint8Array([2]), outputOf }),
    );
    expect({ code: late.code, reason: late.reason }).toEqual({
      code: Code.FailedPrecondition,
      reason: "RUN_NOT_HELD",
    });
    // The next run saves the whole set again, and that is the lease's only set.
    const second = leases().collectOutputs({ leaseId, timeout: { seconds: 60n } });
    const next = await connectWorker(t.address, { workerId: "whole-run", cluster: runtime, capacity: 1 });
    const regrant = await next.next("grant");
    await next.next("revoke", (r) => r.actionId === regrant.actionId);
    const ids: string[] = [];
    for (const name of ["a.txt", "b.txt"]) {
      const saved = await resources().createFile({
        leaseId,
        name,
        content: new Uint8Array([3]),
        outputOf: { deploymentId, epoch: regrant.epoch },
      });
      ids.push(saved.resource?.id ?? "");
    }
    await next.complete(regrant, { output: { containers: [], outputFileIds: ids, skipped: [] } });
    expect((await second).fileIds).toEqual(ids);
    expect(await files()).toEqual(ids);
    expect((await leases().commitLease({ leaseId })).keptResources).toBe(3);
    next.drop();
  }, 60_000);

  it("keeps what a deployment saves after its lease was committed during the collect, and returns it", async () => {
    const runtime = "collect-commit";
    const w = await connectWorker(t.address, { workerId: "saver", cluster: runtime, capacity: 1 });
    const leaseId = (await leases().createLease({ runtime })).lease?.id ?? "";
    const { resource } = await resources().createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: ["true"] } }], outputsDir: "out" },
    });
    const grant = await w.next("grant");
    const outputOf = { deploymentId: resource?.id ?? "", epoch: grant.epoch };
    const collecting = leases().collectOutputs({ leaseId, timeout: { seconds: 60n } });
    await w.next("revoke", (r) => r.actionId === grant.actionId);
    // Saving: one file is up when the commit lands, the other comes after it.
    const before = await resources().createFile({
      leaseId,
      name: "a.txt",
      content: new Uint8Array([1]),
      outputOf,
    });
    expect((await leases().commitLease({ leaseId })).keptResources).toBe(2);
    // While it saves, the committed lease takes only what names the run its agent holds: not any
    // file of the same principal (with authentication off, every client's), nor another run's.
    const stranger = await failure(
      resources().createFile({ leaseId, name: "x", content: new Uint8Array([9]) }),
    );
    expect({ code: stranger.code, reason: stranger.reason }).toEqual({
      code: Code.FailedPrecondition,
      reason: "LEASE_CLOSED",
    });
    const stale = await failure(
      resources().createFile({
        leaseId,
        name: "x",
        content: new Uint8Array([9]),
        outputOf: { ...outputOf, epoch: grant.epoch + 1n },
      }),
    );
    expect(stale.reason).toBe("LEASE_CLOSED");
    const after = await resources().createFile({
      leaseId,
      name: "late.txt",
      content: new Uint8Array([2]),
      outputOf,
    });
    expect(after.resource).toMatchObject({ leaseId, ownership: Ownership.WORKSPACE });
    const ids = [before.resource?.id ?? "", after.resource?.id ?? ""];
    await w.complete(grant, { output: { containers: [], outputFileIds: ids, skipped: [] } });
    expect((await collecting).fileIds).toEqual(ids);
    const kept = await resources().getResource({ resourceId: ids[1] as string });
    expect(kept.resource?.ownership).toBe(Ownership.WORKSPACE);
    // Only its deployment's outputs: once it has stopped, the committed lease takes nothing more.
    const f = await failure(
      resources().createFile({ leaseId, name: "x", content: new Uint8Array([3]), outputOf }),
    );
    expect({ code: f.code, reason: f.reason }).toEqual({
      code: Code.FailedPrecondition,
      reason: "LEASE_CLOSED",
    });
    w.drop();
  });

  it("saves nothing once its agent gives the lease back while it stops: no file is left in the lease outside any answer", async () => {
    const runtime = "collect-giveback";
    const workDir = await mkdtemp(join(tmpdir(), "leasehold-giveback-"));
    // The container tells this server when it got SIGTERM, and then never exits by itself.
    let termed: () => void = () => {};
    const gotTerm = new Promise<void>((resolve) => {
      termed = resolve;
    });
    const listener = createServer((socket) => {
      termed();
      socket.destroy();
    });
    await new Promise<void>((resolve) => listener.listen(0, "127.0.0.1", resolve));
    const port = (listener.address() as { port: number }).port;
    const events = agentEvents();
    const agent = createAgent({
      address: t.address,
      cluster: runtime,
      workerId: "giving-back",
      onEvent: events.onEvent,
      handler: createDeploymentHandler({ address: t.address, workDir, stopGraceMs: 60_000 }),
    });
    try {
      const leaseId = (await leases().createLease({ runtime })).lease?.id ?? "";
      const script = `require("fs").writeFileSync("out/a.txt", "one");
        process.on("SIGTERM", () => require("net").connect(${port}, "127.0.0.1").on("error", () => {}));
        setInterval(() => {}, 1000);`;
      await resources().createDeployment({
        leaseId,
        spec: {
          containers: [{ name: "w", command: { argv: [process.execPath, "-e", script] } }],
          readinessProbe: { check: { case: "exec", value: { argv: ["test", "-f", "out/a.txt"] } } },
          outputsDir: "out",
        },
      });
      for await (const _ of leases().waitLease({ leaseId, timeout: { seconds: 60n } }));
      const collecting = failure(leases().collectOutputs({ leaseId, timeout: { seconds: 60n } }));
      // Stopping: its container got SIGTERM and takes its time. The agent stops at once (a
      // second Ctrl-C), giving the lease back.
      await gotTerm;
      await agent.close({ timeoutMs: 0 });
      const f = await collecting;
      expect(f.reason).toBe("OUTPUTS_LOST");
      expect(f.message).toMatch(/its agent gave the lease back, and what it wrote went with it/);
      const files = await resources().listResources({ leaseId, kind: "file" });
      expect(files.resources.map((r) => (r.body.case === "file" ? r.body.value.name : r.id))).toEqual([]);
    } finally {
      await agent.close({ timeoutMs: 0 });
      listener.close();
      await rm(workDir, { recursive: true, force: true });
    }
  }, 60_000);

  // Last: it stops the server.
  it("ends UNAVAILABLE (SHUTTING_DOWN), which clients try again, when the server shuts down during it", async () => {
    const runtime = "collect-shutdown";
    const w = await connectWorker(t.address, { workerId: "slow-saver", cluster: runtime, capacity: 1 });
    const leaseId = (await leases().createLease({ runtime })).lease?.id ?? "";
    await resources().createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: ["true"] } }], outputsDir: "out" },
    });
    const grant = await w.next("grant");
    // A client of its own: the test server's clients are closed before it stops.
    const client = createClient(LeaseService, t.address);
    try {
      const collecting = failure(client.collectOutputs({ leaseId, timeout: { seconds: 30n } }));
      await w.next("revoke", (r) => r.actionId === grant.actionId);
      // The deployment is saving (STOPPING) when the server goes.
      await t.stop();
      const f = await collecting;
      expect({ code: f.code, reason: f.reason }).toEqual({ code: Code.Unavailable, reason: "SHUTTING_DOWN" });
    } finally {
      client.close();
    }
  }, 60_000);
});
