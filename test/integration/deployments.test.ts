import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind } from "../../src/gen/leasehold/v1/event_pb.js";
import { CloseReason, LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import {
  DeploymentPhase,
  type DeploymentSpecSchema,
  type Resource,
  ResourceService,
} from "../../src/gen/leasehold/v1/resource_pb.js";
import { RejectReason, RevokeReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { freePort } from "../helpers/ports.js";
import { type LeaseholdProcess, runCli, runReferenceAgent } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus, failure } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * Deployments of scope leases run by a real `leasehold agent` process: the
 * containers are real processes, readiness is probed for real, a rollback or
 * TTL expiry kills them, and collected outputs come back as files.
 */
const RUNTIME = "deployments-test";

describe("deployments", () => {
  let t: TestServer;
  let agent: LeaseholdProcess;
  let workDir: string;
  const leases = () => t.client(LeaseService);
  const resources = () => t.client(ResourceService);

  beforeAll(async () => {
    t = await startTestServer({ config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
    workDir = await mkdtemp(join(tmpdir(), "leasehold-deployments-"));
    // A runtime no other test's agents serve: an agent left dialling a port this server reused once
    // joined it as "east" and finished its deployments as no-ops.
    agent = await runReferenceAgent({ server: t.address, cluster: RUNTIME, workerId: "dep-agent", workDir });
  });
  afterAll(async () => {
    agent.child.kill("SIGKILL");
    await t[Symbol.asyncDispose]();
    await rm(workDir, { recursive: true, force: true });
  });

  const open = async (ttlSeconds = 600) =>
    (await leases().createLease({ runtime: RUNTIME, ttl: { seconds: BigInt(ttlSeconds) } })).lease?.id ?? "";

  /** A node program as a container: `script` runs with the deployment's work directory as cwd. */
  const node = (name: string, script: string, env: Record<string, string> = {}) => ({
    name,
    command: { argv: [process.execPath, "-e", script], env },
  });

  /**
   * A server on `port` that writes its pid, serves greeting.txt, and saves its outputs on SIGTERM,
   * then dies of it as a process with no handler would.
   * The readiness probe connects and hangs up at once, so the reply may meet a reset connection
   * (EPIPE/ECONNRESET, more often on a busy machine): like any server, it ignores a client that
   * went away instead of crashing on the unhandled socket error.
   */
  const webScript = `
    const fs = require("node:fs");
    fs.writeFileSync("pid", String(process.pid));
    fs.writeFileSync("out/started.txt", "started " + fs.readFileSync("greeting.txt", "utf8"));
    require("node:net")
      .createServer((s) => s.on("error", () => {}).end(fs.readFileSync("greeting.txt")))
      .listen(Number(process.env.PORT), "127.0.0.1");
    process.once("SIGTERM", () => {
      fs.mkdirSync("out/nested", { recursive: true });
      fs.writeFileSync("out/nested/final.json", JSON.stringify({ stoppedBy: "SIGTERM" }));
      process.kill(process.pid, "SIGTERM");
    });`;

  async function deployWeb(leaseId: string): Promise<{ resource: Resource; port: number }> {
    const greeting = await resources().createFile({
      leaseId,
      name: "greeting.txt",
      content: new TextEncoder().encode("hello from a fixture"),
    });
    const port = await freePort();
    const spec: MessageInitShape<typeof DeploymentSpecSchema> = {
      containers: [node("web", webScript, { PORT: String(port) })],
      readinessProbe: { check: { case: "tcpPort", value: port }, period: { nanos: 100_000_000 } },
      outputsDir: "out",
      inputs: [{ fileId: greeting.resource?.id ?? "", path: "greeting.txt" }],
    };
    const created = await resources().createDeployment({ leaseId, spec });
    return { resource: created.resource as Resource, port };
  }

  const waitReady = async (leaseId: string) => {
    const updates = [];
    for await (const u of leases().waitLease({ leaseId, timeout: { seconds: 60n } })) updates.push(u);
    return updates;
  };

  /** Whether the process runs: a zombie (dead, waiting to be reaped by whoever adopted it) does not. */
  const alive = (pid: number) => {
    try {
      process.kill(pid, 0);
    } catch {
      return false;
    }
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
    } catch {
      return false;
    }
  };

  /**
   * Polls (bounded, generously: it only bounds a wait) until `check` holds: a process's exit or a
   * directory's removal by another process is not an event this one can subscribe to.
   */
  async function eventually(check: () => boolean | Promise<boolean>): Promise<void> {
    for (let i = 0; i < 1200 && !(await check()); i++) await new Promise((r) => setTimeout(r, 25));
  }

  /** Waits (bounded) for `pid` to be gone. */
  async function gone(pid: number): Promise<void> {
    await eventually(() => !alive(pid));
    expect(alive(pid)).toBe(false);
  }

  const exists = (path: string) =>
    stat(path).then(
      () => true,
      () => false,
    );

  /** Waits for the agent to report a revoke of `actionId`, then for `pid` to be gone. */
  async function torndown(actionId: string, reason: string, pid: number): Promise<void> {
    await agent.waitForLog((l) => l.type === "revoked" && l.actionId === actionId && l.reason === reason);
    await gone(pid);
  }

  it("runs a deployment on the agent until ready, and a rollback kills its processes", async () => {
    const leaseId = await open();
    const { resource, port } = await deployWeb(leaseId);
    const deploymentId = resource.id;
    expect(resource.body.case).toBe("deployment");

    const updates = await waitReady(leaseId);
    const last = updates.at(-1);
    expect(last).toMatchObject({ done: true, timedOut: false });
    expect(last?.deployment?.phase).toBe(DeploymentPhase.READY);
    expect(last?.deployment?.containers).toMatchObject([{ name: "web", state: "running" }]);
    expect(updates.slice(0, -1).every((u) => !u.done)).toBe(true);

    // It really runs: the fixture was placed next to it and it serves it.
    const served = await new Promise<string>((resolve, reject) => {
      const socket = connect({ host: "127.0.0.1", port });
      let text = "";
      socket.on("data", (d: Buffer) => (text += d));
      socket.on("end", () => resolve(text));
      socket.on("error", reject);
    });
    expect(served).toBe("hello from a fixture");
    const pid = Number(await readFile(join(workDir, `${deploymentId}.1`, "pid"), "utf8"));
    expect(alive(pid)).toBe(true);

    const debug = await leases().debugLease({ leaseId });
    expect(debug.deployments).toMatchObject([{ id: deploymentId, phase: DeploymentPhase.READY }]);
    const actionId = debug.deployments[0]?.actionId ?? "";

    const rolled = await leases().rollbackLease({ leaseId });
    expect(rolled.destroyedResources).toBe(2); // the fixture and the deployment
    await torndown(actionId, "rolled_back", pid);
    const { action } = await t.client(ActionService).getAction({ actionId });
    expect(action?.state).toBe(ActionState.CANCELLED);
    expect(action?.failureReason).toMatch(/rolled back/);
    // Its work directory goes with it.
    await eventually(async () => !(await exists(join(workDir, `${deploymentId}.1`))));
    expect(await exists(join(workDir, `${deploymentId}.1`))).toBe(false);
  });

  it("collects outputs: the agent stops the deployment, saves its files into the lease, and returns them", async () => {
    const leaseId = await open();
    const { resource } = await deployWeb(leaseId);
    await waitReady(leaseId);

    // A zero timeout is the default (60 s), as proto3 reads a zero, not "give up at once".
    const { fileIds } = await leases().collectOutputs({ leaseId, timeout: {} });
    expect(fileIds).toHaveLength(2);
    const files = new Map<string, string>();
    for (const id of fileIds) {
      const { resource: file } = await resources().getResource({ resourceId: id });
      expect(file).toMatchObject({ kind: "file", leaseId });
      const chunks: Uint8Array[] = [];
      for await (const part of resources().downloadFile({ resourceId: id })) chunks.push(part.chunk);
      files.set(
        file?.body.case === "file" ? file.body.value.name : "",
        Buffer.concat(chunks).toString("utf8"),
      );
    }
    expect(Object.fromEntries(files)).toEqual({
      "started.txt": "started hello from a fixture",
      "nested/final.json": JSON.stringify({ stoppedBy: "SIGTERM" }),
    });

    const { resource: stopped } = await resources().getResource({ resourceId: resource.id });
    expect(stopped?.body.case === "deployment" && stopped.body.value).toMatchObject({
      phase: DeploymentPhase.STOPPED,
      outputFileIds: fileIds,
      // Stopped by the signal: 128 + 15, as a shell says it.
      containers: [{ name: "web", state: "exited", exitCode: 143, message: "stopped by SIGTERM" }],
    });
    // The lease is still open and owns fixture, deployment and both outputs; a second collect returns the same files.
    expect((await leases().getLease({ leaseId })).lease?.ownedResources).toBe(4);
    expect((await leases().collectOutputs({ leaseId })).fileIds).toEqual(fileIds);
    await leases().rollbackLease({ leaseId });
  });

  it("says which outputs it did not save and why: files over the server's limits, a symbolic link", async () => {
    const leaseId = await open();
    // Over the receive limit (--max-file-size + 1 MiB, refused before the server reads it), over
    // --max-file-size (3 MiB, refused by the server), a symbolic link, and one file that is saved.
    const script = `
      const fs = require("node:fs");
      fs.writeFileSync("out/big.bin", Buffer.alloc(5_000_000));
      fs.writeFileSync("out/mid.bin", Buffer.alloc(3_500_000));
      fs.symlinkSync("/etc/hostname", "out/link");
      fs.writeFileSync("out/small.txt", "saved");
      setInterval(() => {}, 1000);`;
    await resources().createDeployment({
      leaseId,
      spec: {
        containers: [node("writer", script)],
        readinessProbe: { check: { case: "exec", value: { argv: ["test", "-f", "out/small.txt"] } } },
        outputsDir: "out",
      },
    });
    await waitReady(leaseId);

    const { fileIds, skipped } = await leases().collectOutputs({ leaseId });
    expect(fileIds).toHaveLength(1);
    expect(skipped.map((s) => [s.path, s.sizeBytes, s.reason])).toEqual([
      [
        "big.bin",
        5_000_000n,
        'file "big.bin" (5000000 bytes) is over the server\'s receive limit of 4194304 bytes (its --max-file-size plus 1 MiB)',
      ],
      ["link", 0n, "a symbolic link: only regular files are saved"],
      [
        "mid.bin",
        3_500_000n,
        'content: file "mid.bin" (3500000 bytes) is over the server\'s file limit of 3145728 bytes (its --max-file-size)',
      ],
    ]);
    await leases().rollbackLease({ leaseId });
  });

  it("fails a collect whose lease was rolled back meanwhile, instead of answering no outputs", async () => {
    // A worker that holds the deployment and never acts on the request to save: the collect waits.
    const w = await connectWorker(t.address, {
      workerId: "raw-collect",
      cluster: "raw-collect",
      capacity: 1,
    });
    const leaseId = (await leases().createLease({ runtime: "raw-collect" })).lease?.id ?? "";
    await resources().createDeployment({ leaseId, spec: { containers: [node("idle", "")] } });
    const grant = await w.next("grant");
    const collecting = failure(leases().collectOutputs({ leaseId, timeout: { seconds: 60n } }));
    // The collect has asked the holder to save and stop; now the lease goes.
    await w.next("revoke", (r) => r.actionId === grant.actionId);
    await leases().rollbackLease({ leaseId });
    const f = await collecting;
    expect(f.code).toBe(Code.FailedPrecondition);
    expect(f.reason).toBe("LEASE_CLOSED");
    expect(f.message).toMatch(/cannot collect outputs: lease .* is ROLLED_BACK/);
    w.drop();
  });

  it("fails a collect whose deployment's agent was lost before it saved, instead of stopping the next run with nothing", async () => {
    const lost = await connectWorker(t.address, {
      workerId: "lost-collect",
      cluster: "lost-collect",
      capacity: 1,
    });
    const leaseId = (await leases().createLease({ runtime: "lost-collect" })).lease?.id ?? "";
    const { resource } = await resources().createDeployment({
      leaseId,
      spec: { containers: [node("idle", "")] },
    });
    const grant = await lost.next("grant");
    const collecting = failure(leases().collectOutputs({ leaseId, timeout: { seconds: 60n } }));
    await lost.next("revoke", (r) => r.actionId === grant.actionId);
    // The agent goes before it saves anything; after its grace the deployment runs elsewhere.
    lost.drop();
    const next = await connectWorker(t.address, {
      workerId: "next-collect",
      cluster: "lost-collect",
      capacity: 1,
    });
    let askedNext = false;
    void next.next("revoke").then(() => {
      askedNext = true;
    });
    // Heard while it waits out the lost agent's grace (4 s): unheard, its own session would end
    // about as soon, and on a loaded machine one reap took both, leaving no one for the re-grant.
    let beat = 1000;
    const alive = setInterval(
      () => next.send({ message: { case: "heartbeat", value: { sequence: BigInt(beat++) } } }),
      500,
    );
    const regrant = await next.next("grant").finally(() => clearInterval(alive));
    expect(regrant.epoch).toBe(grant.epoch + 1n);
    const f = await collecting;
    expect(f.code).toBe(Code.Aborted);
    expect(f.reason).toBe("OUTPUTS_LOST");
    expect(f.message).toContain(`deployment ${resource?.id} stopped before it saved its outputs`);
    expect(f.message).toMatch(/worker "lost-collect" \(epoch 1\) ended when its lease expired/);
    // The next run was not asked to stop: it goes on as the deployment.
    expect((await next.heartbeat(1)).sequence).toBe(1n);
    expect(askedNext).toBe(false);
    // The snapshot of the lease tells the story: which agent ran it at which epoch.
    const debug = await leases().debugLease({ leaseId });
    const story = debug.events
      .filter((e) => e.actionId === grant.actionId)
      .map((e) => [EventKind[e.kind], e.workerId, e.epoch]);
    expect(story).toEqual(
      expect.arrayContaining([
        ["LEASE_GRANTED", "lost-collect", 1n],
        ["OUTPUTS_REQUESTED", "lost-collect", 1n],
        ["LEASE_EXPIRED", "lost-collect", 1n],
        ["LEASE_GRANTED", "next-collect", 2n],
      ]),
    );
    next.drop();
  }, 60_000);

  it("fails a collect whose deployment's agent gave the lease back instead of saving", async () => {
    const w = await connectWorker(t.address, { workerId: "gave-back", cluster: "gave-back", capacity: 1 });
    const leaseId = (await leases().createLease({ runtime: "gave-back" })).lease?.id ?? "";
    await resources().createDeployment({ leaseId, spec: { containers: [node("idle", "")] } });
    const grant = await w.next("grant");
    const collecting = failure(leases().collectOutputs({ leaseId, timeout: { seconds: 60n } }));
    await w.next("revoke", (r) => r.actionId === grant.actionId);
    await w.release(grant);
    const f = await collecting;
    expect(f.code).toBe(Code.Aborted);
    expect(f.reason).toBe("OUTPUTS_LOST");
    expect(f.message).toMatch(/ended when its agent gave the lease back/);
    w.drop();
  });

  it("fences the holder's completion after its lease was rolled back: the server ended the attempt, no report did", async () => {
    const w = await connectWorker(t.address, {
      workerId: "raw-rollback",
      cluster: "raw-rollback",
      capacity: 1,
    });
    const leaseId = (await leases().createLease({ runtime: "raw-rollback" })).lease?.id ?? "";
    await resources().createDeployment({ leaseId, spec: { containers: [node("idle", "")] } });
    const grant = await w.next("grant");
    await leases().rollbackLease({ leaseId });
    await w.next("revoke", (r) => r.actionId === grant.actionId);
    // Its completion crossed the revoke: it never landed, and must not be answered as if it had.
    const result = await w.complete(grant, { output: { outputs: [] } });
    expect(result).toMatchObject({ accepted: false, rejectReason: RejectReason.FENCED });
    w.drop();
  });

  it("revokes a deleted workspace-owned deployment's lease as destroyed (ROLLED_BACK), not as superseded", async () => {
    const w = await connectWorker(t.address, { workerId: "raw-delete", cluster: "raw-delete", capacity: 1 });
    const { resource } = await resources().createDeployment({
      runtime: "raw-delete",
      spec: { containers: [node("idle", "")] },
    });
    const grant = await w.next("grant");
    await resources().deleteResource({ resourceId: resource?.id ?? "" });
    const revoke = await w.next("revoke", (r) => r.actionId === grant.actionId);
    expect(revoke).toMatchObject({
      reason: RevokeReason.ROLLED_BACK,
      message: `deployment ${resource?.id} was deleted`,
    });
    w.drop();
  });

  it("reports a container that fails as FAILED with its exit code and last words", async () => {
    const leaseId = await open();
    await resources().createDeployment({
      leaseId,
      spec: {
        containers: [
          node("crash", 'setTimeout(() => { console.error("config missing"); process.exit(3) }, 200)'),
        ],
        // Never ready: without a probe it would be READY as soon as it started.
        readinessProbe: { check: { case: "tcpPort", value: await freePort() } },
      },
    });
    const last = (await waitReady(leaseId)).at(-1);
    expect(last).toMatchObject({ done: true, timedOut: false });
    expect(last?.deployment?.phase).toBe(DeploymentPhase.FAILED);
    expect(last?.deployment?.containers).toMatchObject([{ name: "crash", state: "exited", exitCode: 3 }]);
    expect(last?.deployment?.message).toMatch(/container crash exited 3: config missing/);
    await leases().rollbackLease({ leaseId });
    // After the rollback destroyed it, DebugLease still says who ran it and why it failed.
    const debug = await leases().debugLease({ leaseId });
    expect(debug.deployments).toEqual([]);
    const kinds = debug.events.map((e) => e.kind);
    expect(kinds).toEqual(expect.arrayContaining([EventKind.LEASE_GRANTED, EventKind.ACTION_FAILED]));
    expect(debug.events.find((e) => e.kind === EventKind.ACTION_FAILED)?.message).toMatch(
      /action failed on worker dep-agent: container crash exited 3: config missing/,
    );
  });

  it("rolls a deployment back when its lease's TTL passes, killing it", async () => {
    // The TTL must outlast the deployment's start-up (a node process, an input download and a
    // probe), which takes seconds on a busy machine; the expiry itself is the event awaited below.
    const leaseId = await open(8);
    const { resource } = await deployWeb(leaseId);
    // Running before the TTL passed: otherwise nothing would be left for the expiry to kill.
    expect((await waitReady(leaseId)).at(-1)?.deployment?.phase).toBe(DeploymentPhase.READY);
    const pid = Number(await readFile(join(workDir, `${resource.id}.1`, "pid"), "utf8"));
    const actionId = resource.body.case === "deployment" ? resource.body.value.actionId : "";
    // Not the agent's revoke line: on a loaded machine the agent may self-fence first, which kills
    // the container just the same. What matters is that the lease expired and the process is gone.
    for await (const _ of t.client(ActionService).watchAction({ actionId })); // ends once the action is over
    expect((await t.client(ActionService).getAction({ actionId })).action?.state).toBe(ActionState.CANCELLED);
    await gone(pid);
    const { lease } = await leases().getLease({ leaseId });
    expect(lease).toMatchObject({ closeReason: CloseReason.EXPIRED, ownedResources: 0 });
  });

  it("tears down a deployment rolled back before it was ready, and ends the wait", async () => {
    const leaseId = await open();
    const never = await freePort(); // nothing listens there: the probe never passes
    const { resource } = await resources().createDeployment({
      leaseId,
      spec: {
        containers: [
          node(
            "slow",
            `require("node:fs").writeFileSync("pid", String(process.pid)); setInterval(() => {}, 1000);`,
          ),
        ],
        readinessProbe: { check: { case: "tcpPort", value: never }, period: { nanos: 100_000_000 } },
      },
    });
    const id = resource?.id ?? "";
    const actionId = resource?.body.case === "deployment" ? resource.body.value.actionId : "";
    const pidFile = join(workDir, `${id}.1`, "pid");
    const updates: { phase: DeploymentPhase; done: boolean }[] = [];
    const waiting = (async () => {
      for await (const u of leases().waitLease({ leaseId, timeout: { seconds: 60n } }))
        updates.push({ phase: u.deployment?.phase ?? DeploymentPhase.UNSPECIFIED, done: u.done });
    })();
    let pid = 0;
    await eventually(async () => {
      pid = Number(await readFile(pidFile, "utf8").catch(() => "0"));
      return pid > 0;
    });
    expect(pid).toBeGreaterThan(0);
    await leases().rollbackLease({ leaseId });
    await torndown(actionId, "rolled_back", pid);
    await waiting;
    expect(updates.at(-1)).toEqual({ phase: DeploymentPhase.STOPPED, done: true });
    expect(updates.map((u) => u.phase)).not.toContain(DeploymentPhase.READY);
  });

  it("ends WaitLease with timed_out while no agent of the runtime takes the deployment", async () => {
    const { lease } = await leases().createLease({ runtime: "nowhere" });
    const leaseId = lease?.id ?? "";
    await resources().createDeployment({ leaseId, spec: { containers: [node("idle", "")] } });
    const updates = [];
    for await (const u of leases().waitLease({ leaseId, timeout: { nanos: 300_000_000 } })) updates.push(u);
    expect(updates.at(-1)).toMatchObject({ done: true, timedOut: true });
    expect(updates.at(-1)?.deployment?.phase).toBe(DeploymentPhase.PENDING);
    // Collecting a deployment that never started cancels it and returns no files.
    expect((await leases().collectOutputs({ leaseId })).fileIds).toEqual([]);
    await leases().rollbackLease({ leaseId });
  });

  it("stops what a SIGKILLed agent left running, and removes its work directory, when the agent starts again", async () => {
    const dir = await mkdtemp(join(tmpdir(), "leasehold-orphans-"));
    const start = () =>
      runReferenceAgent({ server: t.address, cluster: "orphans", workerId: "phoenix", workDir: dir });
    let first: LeaseholdProcess | undefined = await start();
    let second: LeaseholdProcess | undefined;
    try {
      const { lease } = await leases().createLease({ runtime: "orphans" });
      const leaseId = lease?.id ?? "";
      const { resource } = await deployWeb(leaseId);
      await waitReady(leaseId);
      const pid = Number(await readFile(join(dir, `${resource.id}.1`, "pid"), "utf8"));
      // A second agent of the same worker from the same directory would sweep the first one's work.
      const twin = await runCli([
        "--server",
        t.address,
        "agent",
        "--cluster",
        "orphans",
        "--worker-id",
        "phoenix",
        "--work-dir",
        dir,
        "--allow-any-command",
      ]);
      expect(twin.code).toBe(2);
      expect(twin.stderr).toContain(`another agent (pid ${first.child.pid}) runs as worker phoenix`);
      expect(alive(pid)).toBe(true);
      expect(await exists(join(dir, `${resource.id}.1`))).toBe(true);
      // Its fence keeper kills the container the moment the agent dies (agent-fencing.test.ts):
      // killed first, as when both die together (the OOM killer, a kill -9 of everything).
      const keeper = execFileSync("pgrep", ["-P", String(first.child.pid), "-f", "fence-keeper-main"]);
      process.kill(Number(String(keeper).trim()), "SIGKILL");
      first.child.kill("SIGKILL");
      await new Promise((resolve) => first?.child.once("exit", resolve));
      first = undefined;
      expect(alive(pid)).toBe(true); // nothing stopped it: the agent could not
      second = await start();
      const stopped = await second.waitForLog((l) => l.type === "leftovers_stopped");
      expect(stopped).toMatchObject({ count: 1, directories: 1 });
      // SIGKILL was sent; the exit of a process we are not the parent of is not an event we can await.
      await gone(pid);
      // The attempt's work directory, with what the killed container wrote, went with it.
      expect(await exists(join(dir, `${resource.id}.1`))).toBe(false);
      await leases().rollbackLease({ leaseId });
    } finally {
      first?.child.kill("SIGKILL");
      second?.child.kill("SIGKILL");
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("says a deployment promoted out of the lease is gone from it, rather than asking for one", async () => {
    const leaseId = await open();
    const { resource } = await deployWeb(leaseId);
    await leases().promoteResource({ leaseId, kind: "deployment", resourceId: resource.id });
    await expectStatus(
      leases().collectOutputs({ leaseId }),
      Code.FailedPrecondition,
      new RegExp(`owns no deployment: ${resource.id} was promoted out of it and is no longer the lease's`),
    );
    await resources().deleteResource({ resourceId: resource.id });
    await leases().rollbackLease({ leaseId });
  });

  it("rejects bad deployments with every field to fix, and closed or empty leases by state", async () => {
    const leaseId = await open();
    const bad: MessageInitShape<typeof DeploymentSpecSchema> = {
      containers: [
        { name: "a", command: { argv: [] } },
        { name: "a", command: { argv: ["true"], cwd: "/etc" } },
      ],
      readinessProbe: { check: { case: "tcpPort", value: 70000 } },
      outputsDir: "../escape",
      inputs: [{ fileId: "", path: "/etc/passwd" }],
    };
    const f = await expectStatus(
      resources().createDeployment({ leaseId, spec: bad }),
      Code.InvalidArgument,
      /spec\.containers\[0\]\.command\.argv: is required/,
    );
    expect(f.fields).toEqual([
      "spec.containers[0].command.argv",
      "spec.containers[1].name",
      "spec.containers[1].command.cwd",
      "spec.readiness_probe.tcp_port",
      "spec.outputs_dir",
      "spec.inputs[0].file_id",
      "spec.inputs[0].path",
    ]);
    await expectStatus(
      resources().createDeployment({ leaseId, spec: { containers: [node("x", "")] }, runtime: "west" }),
      Code.InvalidArgument,
      /^runtime: must be empty when lease_id is set/,
    );
    await expectStatus(
      resources().createDeployment({ spec: { containers: [node("x", "")] } }),
      Code.InvalidArgument,
      /^runtime: is required without a lease_id: the cluster the deployment runs on \(or set lease_id: it runs on the lease's runtime\)$/,
    );
    await expectStatus(
      resources().createDeployment({
        leaseId,
        spec: { containers: [node("x", "")], inputs: [{ fileId: "missing", path: "a" }] },
      }),
      Code.InvalidArgument,
      /spec\.inputs\[0\]\.file_id: no file resource "missing"/,
    );
    await expectStatus(
      leases().collectOutputs({ leaseId }),
      Code.FailedPrecondition,
      new RegExp(
        `owns no deployment; create one with CreateDeployment first \\(leasehold deployment create --lease ${leaseId} --spec <file>\\)$`,
      ),
    );
    await leases().commitLease({ leaseId });
    await expectStatus(
      resources().createDeployment({ leaseId, spec: { containers: [node("x", "")] } }),
      Code.FailedPrecondition,
      /cannot create a deployment in it: lease .* is COMMITTED/,
    );
    const waiting = async () => {
      for await (const _ of leases().waitLease({ leaseId })) {
        // nothing arrives: the call fails first
      }
    };
    await expectStatus(
      waiting(),
      Code.FailedPrecondition,
      /cannot wait for it: lease .* is COMMITTED; it must be open$/,
    );
  });
});
