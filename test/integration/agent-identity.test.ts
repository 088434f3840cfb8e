import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ActionService, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { type LeaseholdProcess, runCli, runLeasehold } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/**
 * Who `leasehold agent` is without --worker-id (this machine's hostname, the
 * same on every run), and the work directory it makes. Driver-neutral.
 */
describe.runIf(runsDriverNeutralTests())("the reference agent's identity and work directory", () => {
  let t: TestServer;
  let dir: string;
  const agents: LeaseholdProcess[] = [];

  beforeAll(async () => {
    // A grace period longer than the test's timeout: only the restart can hand the action on in time.
    t = await startTestServer({ config: { gracePeriod: "60s", heartbeatInterval: "1s" } });
    dir = await mkdtemp(join(tmpdir(), "leasehold-identity-"));
  });
  afterEach(() => {
    for (const agent of agents.splice(0)) agent.child.kill("SIGKILL");
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** The arguments of an agent of cluster `identity` with no --worker-id, its work directory `workDir`. */
  const defaultArgs = (workDir: string) => [
    "--server",
    t.address,
    "--json",
    "agent",
    "--cluster",
    "identity",
    "--work-dir",
    workDir,
    "--allow-any-command",
  ];
  const defaultAgent = (workDir: string) => {
    const agent = runLeasehold(defaultArgs(workDir), undefined);
    agents.push(agent);
    return agent;
  };

  it("is its hostname on every run: a restart hands the killed run's lease on at once, not after the grace", async () => {
    const workDir = join(dir, "not", "yet");
    const first = defaultAgent(workDir);
    expect(await first.waitForLog((l) => l.type === "work_dir_created")).toMatchObject({
      directory: workDir,
    });
    await first.waitForLog((l) => l.type === "connected");
    const { workers } = await t.client(ClusterService).listWorkers({ cluster: "identity" });
    expect(workers.map((w) => w.workerId)).toEqual([hostname()]);
    // Which build the agent runs: the version and commit `leasehold --version` prints.
    expect(workers[0]?.agentVersion).toBe(`leasehold-agent ${(await runCli(["--version"])).stdout.trim()}`);

    // A second agent of the same default id and work directory is refused before it connects.
    const twin = await runCli(defaultArgs(workDir));
    expect(twin.code).toBe(2);
    expect(twin.stderr).toContain(`another agent (pid ${first.child.pid}) runs as worker ${hostname()}`);

    const { action } = await t.client(ActionService).submitAction({
      cluster: "identity",
      payload: { argv: ["sleep", "300"] } as never,
    });
    const actionId = action?.id ?? "";
    await first.waitForLog((l) => l.type === "grant");
    first.child.kill("SIGKILL");
    await first.exited;

    // The same id again: it ends the killed run's session, whose lease expires and comes back to it.
    const second = defaultAgent(workDir);
    await second.waitForLog((l) => l.type === "grant" && l.actionId === actionId);
    const got = await t.client(ActionService).getAction({ actionId });
    expect(got.attempts.map((a) => a.outcome)).toEqual([
      AttemptOutcome.LEASE_EXPIRED,
      AttemptOutcome.RUNNING,
    ]);
    expect(got.attempts[1]?.epoch).toBeGreaterThan(got.attempts[0]?.epoch ?? 0n);
  });

  it("says why it cannot make its work directory, and exits", async () => {
    // Node's recursive mkdir loops forever here (ENOENT from /proc with /proc there).
    const bad = await runCli([
      "agent",
      "--cluster",
      "identity",
      "--work-dir",
      "/proc/nope/x",
      "--allow-any-command",
    ]);
    expect(bad).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("cannot make the work directory /proc/nope/x: ENOENT"),
    });
    expect(existsSync("/proc/nope")).toBe(false);
  });
});
