import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { LeaseService, type WaitLeaseResponse } from "../../src/gen/leasehold/v1/lease_pb.js";
import { DeploymentPhase, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { runCli as cli, type LeaseholdProcess, runLeasehold, runReferenceAgent } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/** Runs `leasehold <args>` to completion, without any LEASEHOLD_* variable of the caller. */

/**
 * `leasehold agent` runs only the commands it is told to: a real agent
 * process with `--allow-command '/bin/echo *'` (and `printenv *`, with
 * `--allow-env '*'`) against a real server.
 */
describe("the reference agent's allowed commands", { timeout: 120_000 }, () => {
  let t: TestServer;
  let agent: LeaseholdProcess;
  let workDir: string;

  beforeAll(async () => {
    t = await startTestServer({ config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
    workDir = await mkdtemp(join(tmpdir(), "leasehold-allow-"));
    agent = await runReferenceAgent({
      server: t.address,
      cluster: "allow",
      workerId: "allow-agent",
      workDir,
      allow: ["--allow-command", "/bin/echo *", "--allow-command", "printenv *", "--allow-env", "*"],
    });
  });
  afterAll(async () => {
    agent?.child.kill("SIGKILL");
    await t?.[Symbol.asyncDispose]();
    if (workDir) await rm(workDir, { recursive: true, force: true });
  });

  /** Submits `argv` (up to `maxAttempts` attempts) and follows the action until it finishes. */
  async function run(argv: string[], maxAttempts = 3, env?: Record<string, string>) {
    const api = t.client(ActionService);
    const { action } = await api.submitAction({
      cluster: "allow",
      payload: { argv, ...(env ? { env } : {}) } as never,
      retryPolicy: { maxAttempts },
    });
    let last = action;
    for await (const m of api.watchAction({ actionId: action?.id ?? "" })) last = m.action;
    return last;
  }

  it("runs a command that matches --allow-command", async () => {
    const done = await run(["/bin/echo", "hello", "there"]);
    expect(done).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { exitCode: 0, stdoutTail: "hello there\n" },
    });
  });

  it("fails a command that does not match, once and for all, saying what is allowed", async () => {
    const done = await run(["sh", "-c", "echo pwned"]);
    const message =
      'command "sh -c echo pwned" is not allowed on this agent (allowed: "/bin/echo *", "printenv *"; see --allow-command, or the SDK\'s allow option (CommandPolicy.commands))';
    expect(done).toMatchObject({
      state: ActionState.FAILED,
      attemptCount: 1, // not retried, though three attempts were allowed
      failureReason: `failed (not retryable): ${message}`,
      lastError: { message, retryable: false },
    });
    // `/bin/echo` alone is not `/bin/echo <something>`; `echo x` is not `/bin/echo x`.
    expect((await run(["/bin/echo"]))?.state).toBe(ActionState.FAILED);
    expect((await run(["echo", "x"]))?.state).toBe(ActionState.FAILED);
  });

  it("passes a variable --allow-env allows to a bare name the agent's PATH resolves", async () => {
    const done = await run(["printenv", "APP_MODE"], 3, { APP_MODE: "fast" });
    expect(done).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { exitCode: 0, stdoutTail: "fast\n" },
    });
  });

  it("refuses LD_PRELOAD though --allow-env '*' matches it, once and for all", async () => {
    const done = await run(["/bin/echo", "hi"], 3, { LD_PRELOAD: "/tmp/evil.so" });
    const message =
      'environment variable "LD_PRELOAD" is not allowed on this agent: it can change what code runs, so only its ' +
      'exact name in --allow-env (the SDK\'s CommandPolicy.env) allows it (a glob such as "*" does not)';
    expect(done).toMatchObject({
      state: ActionState.FAILED,
      attemptCount: 1,
      lastError: { message, retryable: false },
    });
    // A container of a deployment is held to the same rule.
    const leases = t.client(LeaseService);
    const { lease } = await leases.createLease({ runtime: "allow", ttl: { seconds: 600n } });
    const leaseId = lease?.id ?? "";
    await t.client(ResourceService).createDeployment({
      leaseId,
      spec: {
        containers: [{ name: "c", command: { argv: ["/bin/echo", "x"], env: { LD_PRELOAD: "./evil.so" } } }],
      },
    });
    let last: WaitLeaseResponse | undefined;
    for await (const u of leases.waitLease({ leaseId, timeout: { seconds: 60n } })) last = u;
    expect(last?.deployment?.phase).toBe(DeploymentPhase.FAILED);
    expect(last?.deployment?.message).toContain(message);
    await leases.rollbackLease({ leaseId });
  });

  it("fails a deployment whose container is not allowed, before starting anything", async () => {
    const leases = t.client(LeaseService);
    const { lease } = await leases.createLease({ runtime: "allow", ttl: { seconds: 600n } });
    const leaseId = lease?.id ?? "";
    await t.client(ResourceService).createDeployment({
      leaseId,
      spec: {
        containers: [
          { name: "ok", command: { argv: ["/bin/echo", "fine"] } },
          { name: "web", command: { argv: ["python3", "-m", "http.server", "8080"] } },
        ],
      },
    });
    let last: WaitLeaseResponse | undefined;
    for await (const u of leases.waitLease({ leaseId, timeout: { seconds: 60n } })) last = u;
    expect(last?.deployment?.phase).toBe(DeploymentPhase.FAILED);
    expect(last?.deployment?.message).toMatch(
      /command "python3 -m http\.server 8080" is not allowed on this agent \(allowed: "\/bin\/echo \*", "printenv \*"; see --allow-command, or the SDK's allow option \(CommandPolicy\.commands\)\)/,
    );
    await leases.rollbackLease({ leaseId });
  });

  it("refuses to start without --allow-command or --allow-any-command (exit 2), or with both", async () => {
    const neither = await cli(["--server", t.address, "agent", "--cluster", "allow"]);
    expect(neither.code).toBe(2);
    expect(neither.stderr).toMatch(/pass --allow-command <glob> \(repeatable\).*or --allow-any-command/);
    const both = await cli([
      "--server",
      t.address,
      "agent",
      "--cluster",
      "allow",
      "--allow-any-command",
      "--allow-command",
      "x",
    ]);
    expect(both.code).toBe(2);
    expect(both.stderr).toMatch(/--allow-any-command and --allow-command exclude each other/);
    const envWithAny = await cli([
      "--server",
      t.address,
      "agent",
      "--cluster",
      "allow",
      "--allow-any-command",
      "--allow-env",
      "APP_*",
    ]);
    expect(envWithAny.code).toBe(2);
    expect(envWithAny.stderr).toMatch(/--allow-env restricts nothing with --allow-any-command/);
  });

  it("refuses a worker id, cluster or label the server would refuse (exit 2), before making its work directory", async () => {
    const workDir = join(await mkdtemp(join(tmpdir(), "leasehold-names-")), "work");
    const run = (...flags: string[]) =>
      cli(["--server", t.address, "agent", "--allow-command", "x", "--work-dir", workDir, ...flags]);
    const cluster = await run("--cluster", "bad cluster");
    expect(cluster.code).toBe(2);
    expect(cluster.stderr).toMatch(/--cluster: may contain only letters, digits, '\.', '_', '-' and ':'/);
    const worker = await run("--cluster", "allow", "--worker-id", "bad id!");
    expect(worker.code).toBe(2);
    expect(worker.stderr).toMatch(/--worker-id: may contain only letters/);
    const label = await run("--cluster", "allow", "--labels", "bad key=v");
    expect(label.code).toBe(2);
    expect(label.stderr).toMatch(/--labels\["bad key"\]: keys must be/);
    // The spelling of action submit is the same option.
    const singular = await run("--cluster", "allow", "--label", "bad key=v");
    expect(singular).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--labels\["bad key"\]: keys must be/),
    });
    await expect(stat(workDir)).rejects.toThrow(/ENOENT/);
  });

  it("refuses to send a token in plaintext beyond loopback (exit 2), and sends it to loopback", async () => {
    const remote = await cli(["--server", "10.0.0.7:50051", "--token", "s3cret", "action", "list"]);
    expect(remote.code).toBe(2);
    expect(remote.stderr).toContain(
      "--token: refusing to send a token in plaintext to 10.0.0.7; use TLS (--tls-ca) or a loopback address",
    );
    const agentToo = await cli([
      "--server",
      "10.0.0.7:50051",
      "--token",
      "s3cret",
      "agent",
      "--cluster",
      "allow",
      "--allow-any-command",
    ]);
    expect(agentToo.code).toBe(2);
    expect(agentToo.stderr).toContain("--token: refusing to send a token in plaintext to 10.0.0.7");
    const local = await cli(["--server", t.address, "--token", "s3cret", "--json", "clusters", "list"]);
    expect(local).toMatchObject({ code: 0 });
    // The agent's stream carries it too (the server here checks nothing; the token must not stop it).
    const withToken = runLeasehold(
      [
        "--server",
        t.address,
        "--token",
        "s3cret",
        "--json",
        "agent",
        "--cluster",
        "allow-token",
        "--worker-id",
        "token-agent",
        "--work-dir",
        workDir,
        "--allow-any-command",
      ],
      undefined,
    );
    try {
      await withToken.waitForLog((l) => l.type === "connected");
    } finally {
      withToken.child.kill("SIGKILL");
    }
  });
});
