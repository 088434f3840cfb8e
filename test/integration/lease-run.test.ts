import { type ChildProcess, spawn } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SAME_SIGNAL_MS } from "../../src/cli/signals.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { CloseReason, LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { Ownership, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freePort } from "../helpers/ports.js";
import { BIN, collectLines, type LeaseholdProcess, runReferenceAgent } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

const EXAMPLE = fileURLToPath(new URL("../../examples/http-smoke", import.meta.url));
/** The port the example manifest uses; each test swaps in a free one. */
const EXAMPLE_PORT = "8765";
/** The example's runtime: the agent of this file serves it. */
const RUNTIME = "local";

type Event = Record<string, unknown> & { event: string; time: string };

/** A `leasehold` process: stdout as parsed lines, stderr as text, and how it ended. */
interface Cli {
  readonly child: ChildProcess;
  readonly events: Event[];
  waitFor(test: (e: Event) => boolean): Promise<Event>;
  /** Exit code, or 128 + signal number when killed by a signal. */
  readonly exited: Promise<number>;
  stderr(): string;
}

/**
 * `leasehold lease run --test`, and the commands it is built from, run for
 * real: a server, a `leasehold agent` process that runs the deployments, and
 * the CLI as a child process, as a user or CI would run them.
 */
describe("leasehold lease run --test", () => {
  let t: TestServer;
  let agent: LeaseholdProcess;
  let workDir: string;
  let scratch: string;
  const leases = () => t.client(LeaseService);
  const resources = () => t.client(ResourceService);

  beforeAll(async () => {
    t = await startTestServer();
    workDir = mkdtempSync(join(tmpdir(), "leasehold-run-agent-"));
    scratch = mkdtempSync(join(tmpdir(), "leasehold-run-manifests-"));
    agent = await runReferenceAgent({ server: t.address, cluster: RUNTIME, workerId: "run-agent", workDir });
  });
  afterAll(async () => {
    agent?.child.kill("SIGKILL");
    await t?.[Symbol.asyncDispose]();
    rmSync(workDir, { recursive: true, force: true });
    rmSync(scratch, { recursive: true, force: true });
  });

  /** Runs `leasehold --server <server> <args>`, by default against the test server. */
  function cli(args: string[], server = t.address): Cli {
    const child = spawn(process.execPath, [BIN, "--server", server, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    const { lines, waitFor } = collectLines(child);
    let stderr = "";
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    const exited = new Promise<number>((resolve) =>
      child.once("close", (code, signal) =>
        resolve(code ?? 128 + (signal === "SIGINT" ? 2 : signal === "SIGTERM" ? 15 : 9)),
      ),
    );
    return {
      child,
      events: lines as Event[],
      waitFor: waitFor as Cli["waitFor"],
      exited,
      stderr: () => stderr,
    };
  }

  /** The example directory copied to a fresh place, its port swapped for a free one. */
  async function exampleCopy(): Promise<{ manifest: string; port: number }> {
    const dir = mkdtempSync(join(scratch, "http-smoke-"));
    cpSync(EXAMPLE, dir, { recursive: true });
    const port = await freePort();
    const manifest = join(dir, "manifest.yaml");
    writeFileSync(manifest, readFileSync(manifest, "utf8").replaceAll(EXAMPLE_PORT, String(port)));
    return { manifest, port };
  }

  /** Writes a manifest into its own directory and returns its path. */
  function manifestFile(text: string): string {
    const dir = mkdtempSync(join(scratch, "manifest-"));
    writeFileSync(join(dir, "manifest.yaml"), text);
    return join(dir, "manifest.yaml");
  }

  /** `leasehold lease run --test` of a manifest with this text, by default against the test server. */
  const runManifest = (text: string, server = t.address) =>
    cli(["lease", "run", "--test", manifestFile(text)], server);

  /**
   * A deployment of one Node container that runs `script` (in its work directory, then idles),
   * ready once `test <ready>` holds there, saving its outputs from out/.
   */
  const nodeDeployment = (script: string, ready: string) => `deployment:
  containers:
    - name: node
      argv: [${process.execPath}, -e, '${script}; setInterval(() => {}, 1000)']
  readiness: {exec: {argv: [test, ${ready}]}, period: 100ms}
  outputs_dir: out
`;

  /** A deployment of the example's server on `port`, with its fixtures. */
  const exampleDeployment = (port: number) => `
fixtures:
  - path: ${join(EXAMPLE, "fixtures/server.mjs")}
  - path: ${join(EXAMPLE, "fixtures/hello.txt")}
deployment:
  containers:
    - name: web
      argv: [${process.execPath}, server.mjs]
      env: {PORT: ${port}}
  readiness: {tcp: ${port}, period: 100ms}
  outputs_dir: out
  ready_timeout: 30s
`;

  const names = (events: readonly Event[]) =>
    events.map((e) => e.event).filter((name) => name !== "deployment_phase");

  async function download(fileId: string): Promise<string> {
    const chunks: Uint8Array[] = [];
    for await (const m of resources().downloadFile({ resourceId: fileId })) chunks.push(m.chunk);
    return Buffer.concat(chunks).toString();
  }

  /** The lease is closed by rollback and owns nothing any more. */
  async function expectRolledBack(leaseId: string) {
    const { lease } = await leases().getLease({ leaseId });
    expect(lease?.state).toBe(LeaseState.ROLLED_BACK);
    expect(lease?.ownedResources).toBe(0);
    const { resources: left } = await resources().listResources({ leaseId });
    expect(left.filter((r) => r.ownership !== Ownership.WORKSPACE)).toEqual([]);
    return lease;
  }

  it("runs the README example: ready, every check passes, the result is recorded, the output outlives the rollback", async () => {
    const { manifest } = await exampleCopy();
    const run = cli(["lease", "run", `--test=${manifest}`]);
    expect(await run.exited).toBe(0);
    const events = run.events;
    expect(names(events)).toEqual([
      "lease_created",
      "fixture_uploaded",
      "fixture_uploaded",
      "fixture_uploaded",
      "deployment_created",
      "deployment_ready",
      "check_passed",
      "check_passed",
      "check_passed",
      "check_passed",
      "outputs_collected",
      "output_promoted",
      "result_recorded",
      "lease_rolled_back",
      "done",
    ]);
    for (const e of events) expect(new Date(e.time).toISOString()).toBe(e.time);

    // The phases WaitLease streamed sit between the deployment's creation and its readiness.
    const created = events.findIndex((e) => e.event === "deployment_created");
    const ready = events.findIndex((e) => e.event === "deployment_ready");
    const phases = events.filter((e) => e.event === "deployment_phase");
    expect(phases.length).toBeGreaterThan(0);
    expect(events.indexOf(phases[0] as Event)).toBeGreaterThan(created);
    expect(phases.at(-1)).toMatchObject({ phase: "READY", containers: [{ name: "web", state: "running" }] });
    expect(events.indexOf(phases.at(-1) as Event)).toBe(ready - 1);

    const leaseId = events[0]?.lease_id as string;
    expect(events[0]).toMatchObject({ runtime: RUNTIME, label: "http-smoke" });
    expect(events.filter((e) => e.event === "fixture_uploaded").map((e) => [e.name, e.mount])).toEqual([
      ["server.mjs", "server.mjs"],
      ["hello.txt", "hello.txt"],
      ["config.json", "config.json"],
    ]);
    expect(events.filter((e) => e.event === "check_passed").map((e) => e.name)).toEqual([
      "serves a fixture file",
      "answers 404 for a missing file",
      "port is open",
      "inline fixture is served as JSON",
    ]);
    const promoted = events.find((e) => e.event === "output_promoted");
    expect(promoted).toMatchObject({ name: "requests.log" });
    expect(events.at(-1)).toMatchObject({ event: "done", passed: true, exit_code: 0, lease_id: leaseId });

    const lease = await expectRolledBack(leaseId);
    expect(lease?.result).toMatchObject({
      passed: true,
      checks: [
        { name: "serves a fixture file", passed: true },
        { name: "answers 404 for a missing file", passed: true },
        { name: "port is open", passed: true },
        { name: "inline fixture is served as JSON", passed: true },
      ],
      deployment: { ready: true, phase: "READY" },
      outputs: [{ name: "requests.log", file_id: promoted?.file_id }],
    });
    // The promoted output survived the rollback, with what the container wrote while the checks ran.
    const { resource } = await resources().getResource({ resourceId: promoted?.file_id as string });
    expect(resource?.ownership).toBe(Ownership.WORKSPACE);
    expect(resource?.body.case === "file" && resource.body.value.name).toBe("requests.log");
    expect((await download(promoted?.file_id as string)).split("\n")).toEqual([
      "GET /hello.txt 200",
      "GET /missing.txt 404",
      "GET /config.json 200",
      "",
    ]);
  });

  it("a failing check fails the run (exit 1): the result says which and why, and the lease is rolled back", async () => {
    const port = await freePort();
    const run = cli([
      "lease",
      "run",
      "--test",
      manifestFile(`runtime: ${RUNTIME}
label: failing-check
${exampleDeployment(port)}
checks:
  - name: serves hello
    http: {url: "http://127.0.0.1:${port}/hello.txt"}
  - name: says goodbye
    http: {url: "http://127.0.0.1:${port}/hello.txt", body_contains: goodbye}
  - name: exits 0
    exec: {argv: [${process.execPath}, -e, "process.exit(4)"]}
`),
    ]);
    expect(await run.exited).toBe(1);
    expect(names(run.events)).toEqual([
      "lease_created",
      "fixture_uploaded",
      "fixture_uploaded",
      "deployment_created",
      "deployment_ready",
      "check_passed",
      "check_failed",
      "check_failed",
      "outputs_collected",
      "result_recorded",
      "lease_rolled_back",
      "done",
    ]);
    const failed = run.events.filter((e) => e.event === "check_failed");
    expect(failed.map((e) => [e.name, e.message])).toEqual([
      [
        "says goodbye",
        `GET http://127.0.0.1:${port}/hello.txt answered 200 but the body does not contain "goodbye" (body: "hello from a fixture")`,
      ],
      ["exits 0", "exited 4, expected 0"],
    ]);
    expect(run.events.at(-1)).toMatchObject({ event: "done", passed: false, exit_code: 1 });
    const lease = await expectRolledBack(run.events[0]?.lease_id as string);
    expect(lease?.result).toMatchObject({
      passed: false,
      checks: [
        { name: "serves hello", passed: true },
        { name: "says goodbye", passed: false },
        { name: "exits 0", passed: false, message: "exited 4, expected 0" },
      ],
    });
  });

  it("an output the manifest names but the deployment did not write fails the run even when every check passed", async () => {
    const port = await freePort();
    const run = cli([
      "lease",
      "run",
      "--test",
      manifestFile(`runtime: ${RUNTIME}
${exampleDeployment(port)}
checks:
  - http: {url: "http://127.0.0.1:${port}/hello.txt"}
outputs:
  promote: [requests.log, report.html]
`),
    ]);
    expect(await run.exited).toBe(1);
    expect(names(run.events)).toEqual([
      "lease_created",
      "fixture_uploaded",
      "fixture_uploaded",
      "deployment_created",
      "deployment_ready",
      "check_passed",
      "outputs_collected",
      "output_promoted",
      "output_missing",
      "result_recorded",
      "lease_rolled_back",
      "done",
    ]);
    expect(run.events.find((e) => e.event === "output_missing")).toMatchObject({
      name: "report.html",
      message: 'the deployment saved no file "report.html" in out',
    });
    const lease = await expectRolledBack(run.events[0]?.lease_id as string);
    expect(lease?.result).toMatchObject({ passed: false, missing_outputs: ["report.html"] });
  });

  it("an output the deployment wrote but its agent did not save is missing with the reason, not as never written", async () => {
    const run = runManifest(`runtime: ${RUNTIME}
${nodeDeployment('require("fs").symlinkSync("/etc/hostname", "out/report.html")', "-L, out/report.html")}
outputs:
  promote: [report.html]
`);
    expect(await run.exited).toBe(1);
    const reason = "a symbolic link: only regular files are saved";
    expect(run.events.find((e) => e.event === "outputs_collected")).toMatchObject({
      files: [],
      skipped: [{ name: "report.html", size_bytes: 0, reason }],
    });
    expect(run.events.find((e) => e.event === "output_missing")).toMatchObject({
      name: "report.html",
      message: `the deployment did not save "report.html" in out: ${reason}`,
    });
    await expectRolledBack(run.events[0]?.lease_id as string);
  });

  it("an output of a collect that failed is missing because it was not collected, not as never saved", async () => {
    // It wrote the file, then ignores SIGTERM: it does not stop within the collect's timeout.
    const run = runManifest(`runtime: ${RUNTIME}
${nodeDeployment('require("fs").writeFileSync("out/report.txt", "R"); process.on("SIGTERM", () => {})', "-f, out/report.txt")}
outputs:
  promote: [report.txt]
  collect_timeout: 1s
`);
    expect(await run.exited).toBe(1);
    const failed = run.events.find((e) => e.event === "outputs_collect_failed");
    expect(failed?.message).toMatch(/did not save their outputs within 1s/);
    expect(run.events.find((e) => e.event === "output_missing")).toMatchObject({
      name: "report.txt",
      message: `the outputs were not collected, so "report.txt" is not among them: ${failed?.message}`,
    });
    await expectRolledBack(run.events[0]?.lease_id as string);
  });

  it("a deployment that fails skips the checks, still records the result and keeps its outputs, then rolls back", async () => {
    const run = cli([
      "lease",
      "run",
      "--test",
      manifestFile(`runtime: ${RUNTIME}
deployment:
  containers:
    - name: crash
      argv:
        - ${process.execPath}
        - -e
        - 'require("fs").writeFileSync("out/why.txt", "no config"); console.error("boom: no config"); process.exit(3)'
  readiness: {tcp: 1}
  outputs_dir: out
checks:
  - tcp: {port: 1}
outputs:
  promote: [why.txt]
`),
    ]);
    expect(await run.exited).toBe(1);
    expect(names(run.events)).toEqual([
      "lease_created",
      "deployment_created",
      "deployment_failed",
      "check_failed",
      "outputs_collected",
      "output_promoted",
      "result_recorded",
      "lease_rolled_back",
      "done",
    ]);
    expect(run.events.find((e) => e.event === "deployment_failed")).toMatchObject({
      phase: "FAILED",
      timed_out: false,
      message: expect.stringContaining("boom: no config"),
    });
    expect(run.events.find((e) => e.event === "check_failed")).toMatchObject({ skipped: true });
    const lease = await expectRolledBack(run.events[0]?.lease_id as string);
    expect(lease?.result).toMatchObject({
      passed: false,
      deployment: { ready: false, phase: "FAILED" },
      checks: [{ name: "tcp 127.0.0.1:1", passed: false }],
    });
    const promoted = run.events.find((e) => e.event === "output_promoted");
    expect(await download(promoted?.file_id as string)).toBe("no config");
  });

  it("a deployment whose container exits with an error after it was ready fails the run", async () => {
    // Without a readiness probe it is ready as soon as it starts; it crashes while the check runs.
    const marker = join(mkdtempSync(join(tmpdir(), "leasehold-crash-")), "exiting");
    const run = cli([
      "lease",
      "run",
      "--test",
      manifestFile(`runtime: ${RUNTIME}
deployment:
  containers:
    - name: crash
      argv: [${process.execPath}, -e, 'console.error("boom"); require("fs").writeFileSync(${JSON.stringify(marker)}, ""); process.exit(3)']
checks:
  - name: until it exits
    exec: {argv: [${process.execPath}, -e, 'const t = setInterval(() => require("fs").existsSync(${JSON.stringify(marker)}) && clearInterval(t), 20)']}
`),
    ]);
    expect(await run.exited).toBe(1);
    rmSync(join(marker, ".."), { recursive: true, force: true });
    expect(run.events.find((e) => e.event === "deployment_ready")).toBeDefined();
    expect(run.events.find((e) => e.event === "deployment_failed")).toMatchObject({
      phase: "FAILED",
      message: expect.stringContaining("exited 3"),
    });
    const lease = await expectRolledBack(run.events[0]?.lease_id as string);
    expect(lease?.result).toMatchObject({
      passed: false,
      checks: [{ name: "until it exits", passed: true }],
      deployment: { phase: "FAILED" },
    });
  });

  it("a deployment whose run is lost and started again while the checks run fails the run, naming the run it checked", async () => {
    const runtime = "restarted";
    const worker = await connectWorker(t.address, { workerId: "flaky", cluster: runtime, capacity: 1 });
    const ready = (grant: { actionId: string; epoch: bigint }) =>
      worker.send({
        message: {
          case: "progress",
          value: {
            reportId: grant.epoch * 100n,
            actionId: grant.actionId,
            epoch: grant.epoch,
            phase: "ready",
          },
        },
      });
    // The check's command connects here; while it runs, the run it checks is given back and the
    // deployment starts again (epoch 2). Then the check ends, and passes.
    const trigger = createServer((socket) => {
      socket.on("error", () => {});
      (async () => {
        await worker.release(first);
        ready(await worker.next("grant", (g) => g.epoch === first.epoch + 1n));
      })().finally(() => socket.end());
    });
    await new Promise<void>((resolve) => trigger.listen(0, "127.0.0.1", resolve));
    const triggerPort = (trigger.address() as { port: number }).port;
    const run = runManifest(`runtime: ${runtime}
deployment:
  containers:
    - name: idle
      argv: [idle]
  outputs_dir: out
checks:
  - name: while it restarts
    exec: {argv: [${process.execPath}, -e, 'require("net").connect(${triggerPort}, "127.0.0.1").on("close", () => process.exit(0))']}
    timeout: 60s
`);
    const first = await worker.next("grant");
    ready(first);
    try {
      // The collect stops the second run, which saves nothing.
      const second = await worker.next("revoke", (r) => r.epoch === first.epoch + 1n);
      await worker.complete(second, { output: { containers: [], outputFileIds: [], skipped: [] } });
      expect(await run.exited).toBe(1);
      expect(run.events.find((e) => e.event === "check_passed")).toBeDefined();
      const restarted = run.events.find((e) => e.event === "deployment_restarted");
      expect(restarted).toMatchObject({
        checked_epoch: Number(first.epoch),
        epoch: Number(first.epoch) + 1,
        message: expect.stringContaining(`was lost after it got ready, and the deployment was started again`),
      });
      expect(run.events.find((e) => e.event === "result_recorded")).toMatchObject({ passed: false });
      const lease = await expectRolledBack(run.events[0]?.lease_id as string);
      expect(lease?.result).toMatchObject({
        passed: false,
        checks: [{ name: "while it restarts", passed: true }],
        deployment: { restarted: true, message: restarted?.message },
      });
    } finally {
      trigger.close();
      worker.drop();
    }
  }, 60_000);

  it("lease collect-outputs cut off in flight says its outcome is unknown, not that the server may not run", async () => {
    const runtime = "cut-collect";
    const worker = await connectWorker(t.address, { workerId: "saving", cluster: runtime, capacity: 1 });
    const [host, port] = t.address.split(":");
    const proxy = await cuttableProxy(host as string, Number(port));
    try {
      const leaseId = (await leases().createLease({ runtime })).lease?.id ?? "";
      await resources().createDeployment({
        leaseId,
        spec: { containers: [{ name: "c", command: { argv: ["idle"] } }], outputsDir: "out" },
      });
      const grant = await worker.next("grant");
      const collect = cli(["lease", "collect-outputs", leaseId], `127.0.0.1:${proxy.port}`);
      // The server has the request: it asks the agent to save. Then the connection breaks.
      await worker.next("revoke", (r) => r.actionId === grant.actionId);
      proxy.cut();
      expect(await collect.exited).toBe(3);
      expect(collect.stderr()).toContain(
        "after the request was sent: the outcome of a change it asked for is unknown",
      );
      expect(collect.stderr()).not.toContain("is it running?");
    } finally {
      proxy.close();
      worker.drop();
    }
  });

  it("a bad manifest exits 2 naming every field to fix, before any lease exists", async () => {
    const before = (await leases().listLeases({ pageSize: 1000 })).leases.length;
    const run = cli([
      "lease",
      "run",
      "--test",
      manifestFile(`runtime: ${RUNTIME}
deployment:
  containers: [{name: web, argv: [sleep, 60], image: busybox}]
checks:
  - tcp: {port: 80}
  - http: {status: 200}
`),
    ]);
    expect(await run.exited).toBe(2);
    expect(run.stderr()).toContain("deployment.containers[0].image: unknown key");
    expect(run.stderr()).toContain("checks[1].http.url: is required");
    expect(run.events.map((e) => e.event)).toEqual(["manifest_invalid", "done"]);
    expect(run.events[0]?.problems).toHaveLength(2);
    expect(run.events[1]).toMatchObject({ passed: false, exit_code: 2 });
    expect((await leases().listLeases({ pageSize: 1000 })).leases).toHaveLength(before);
  });

  it("a server that cannot be reached exits 3 and says so", async () => {
    const unused = await freePort();
    const { manifest } = await exampleCopy();
    const run = cli(["lease", "run", "--test", manifest], `127.0.0.1:${unused}`);
    expect(await run.exited).toBe(3);
    expect(run.events.map((e) => e.event)).toEqual(["error", "done"]);
    expect(run.events[0]).toMatchObject({ step: "create_lease" });
    expect(run.stderr()).toContain(`cannot reach the server at 127.0.0.1:${unused}`);
  });

  it("rides through a server that goes away as the checks end: outputs collected, result recorded, lease rolled back", async () => {
    // The CLI reaches the server through a proxy; the agent does not, so only the CLI loses it.
    const [host, port] = t.address.split(":");
    const proxy = await cuttableProxy(host as string, Number(port));
    // The check's command connects here and ends once the connection is closed: by then the
    // server is gone for the CLI, so the next call (the collect) finds it away.
    const trigger = createServer((socket) => {
      proxy.cut();
      socket.end();
    });
    await new Promise<void>((resolve) => trigger.listen(0, "127.0.0.1", resolve));
    const triggerPort = (trigger.address() as { port: number }).port;
    try {
      const run = runManifest(
        `runtime: ${RUNTIME}
label: server-away
${nodeDeployment('require("fs").writeFileSync("out/report.txt", "R")', "-f, out/report.txt")}
checks:
  - name: the server goes away
    exec: {argv: [${process.execPath}, -e, 'require("net").connect(${triggerPort}, "127.0.0.1").on("close", () => process.exit(0))']}
outputs:
  promote: [report.txt]
`,
        `127.0.0.1:${proxy.port}`,
      );
      // Back once the run has noticed (a run that gave up at once says outputs_collect_failed).
      await run.waitFor((e) => e.event === "server_unavailable" || e.event === "outputs_collect_failed");
      proxy.restore();
      expect(await run.exited).toBe(0);
      expect(names(run.events)).toEqual([
        "lease_created",
        "deployment_created",
        "deployment_ready",
        "check_passed",
        "server_unavailable",
        "outputs_collected",
        "output_promoted",
        "result_recorded",
        "lease_rolled_back",
        "done",
      ]);
      expect(run.events.find((e) => e.event === "server_unavailable")).toMatchObject({
        step: "collect_outputs",
        message: expect.stringContaining(`the server at 127.0.0.1:${proxy.port} is unavailable`),
      });
      const lease = await expectRolledBack(run.events[0]?.lease_id as string);
      expect(lease?.result).toMatchObject({ passed: true });
      const promoted = run.events.find((e) => e.event === "output_promoted");
      expect(await download(promoted?.file_id as string)).toBe("R");
    } finally {
      proxy.close();
      trigger.close();
    }
  });

  it("a lease whose TTL passes during the run fails it saying so, and its rollback counts as done", async () => {
    let run: Cli | undefined;
    // The check's command connects here and ends once the server has rolled the lease back at its
    // TTL: the check passes, against a deployment that is gone.
    const trigger = createServer((socket) => {
      (async () => {
        const created = await run?.waitFor((e) => e.event === "lease_created");
        const watch = t.client(EventService).watchEvents({
          kind: EventKind.SCOPE_LEASE_ROLLED_BACK,
          afterSequence: 0n,
        });
        for await (const m of watch) if (m.event?.leaseId === created?.lease_id) break;
      })()
        .catch(() => {})
        .finally(() => socket.end());
      socket.on("error", () => {});
    });
    await new Promise<void>((resolve) => trigger.listen(0, "127.0.0.1", resolve));
    const triggerPort = (trigger.address() as { port: number }).port;
    try {
      run = runManifest(`runtime: ${RUNTIME}
label: ttl-passes
ttl: 3s
deployment:
  containers:
    - name: idle
      argv: [${process.execPath}, -e, "setInterval(() => {}, 1000)"]
  outputs_dir: out
checks:
  - name: outlives the lease
    exec: {argv: [${process.execPath}, -e, 'require("net").connect(${triggerPort}, "127.0.0.1").on("close", () => process.exit(0))']}
    timeout: 60s
`);
      expect(await run.exited).toBe(1);
      // Said once, plainly; nothing claims a pass, and the rollback the TTL did is no failure.
      // (On a machine slow enough that the TTL passes before the deployment is ready, the checks
      // are skipped instead; the end is the same.)
      // The result that says so is recorded, and said to be.
      expect(names(run.events).slice(-4)).toEqual([
        "lease_expired",
        "result_recorded",
        "lease_rolled_back",
        "done",
      ]);
      expect(run.events.find((e) => e.event === "result_recorded")).toMatchObject({ passed: false });
      for (const name of ["outputs_collect_failed", "rollback_failed", "error"])
        expect(names(run.events)).not.toContain(name);
      const leaseId = run.events[0]?.lease_id as string;
      expect(run.events.find((e) => e.event === "lease_expired")).toMatchObject({
        lease_id: leaseId,
        message: expect.stringMatching(
          /^the lease's TTL \(3s\) passed during the run, at .*give the manifest a longer ttl$/,
        ),
      });
      expect(run.events.find((e) => e.event === "lease_rolled_back")).toMatchObject({
        destroyed_resources: 0,
        already: true,
        close_reason: "EXPIRED",
      });
      expect(run.events.at(-1)).toMatchObject({ passed: false, exit_code: 1, lease_id: leaseId });
      expect(run.stderr()).toContain("the lease's TTL (3s) passed during the run");
      const lease = await expectRolledBack(leaseId);
      expect(lease?.closeReason).toBe(CloseReason.EXPIRED);
      expect(lease?.result).toMatchObject({
        passed: false,
        error: expect.stringContaining("TTL (3s) passed"),
      });
    } finally {
      trigger.close();
    }
  });

  it.each([
    ["SIGINT", 130],
    ["SIGTERM", 143],
  ] as const)(
    "%s while waiting for the deployment rolls the lease back and exits %i",
    async (signal, code) => {
      const run = cli([
        "lease",
        "run",
        "--test",
        manifestFile(`runtime: ${RUNTIME}
deployment:
  containers:
    - name: idle
      argv: [${process.execPath}, -e, "setInterval(() => {}, 1000)"]
  readiness: {tcp: 1}
checks:
  - tcp: {port: 1}
`),
      ]);
      await run.waitFor((e) => e.event === "deployment_phase");
      run.child.kill(signal);
      expect(await run.exited).toBe(code);
      expect(names(run.events).slice(-3)).toEqual(["interrupted", "lease_rolled_back", "done"]);
      expect(run.events.find((e) => e.event === "interrupted")).toMatchObject({ signal });
      expect(run.events.at(-1)).toMatchObject({ passed: false, exit_code: code });
      await expectRolledBack(run.events[0]?.lease_id as string);
    },
  );

  it("a second Ctrl-C while the rollback waits for the server exits at once, with done and the lease left open named", async () => {
    const [host, port] = t.address.split(":");
    const proxy = await cuttableProxy(host as string, Number(port));
    try {
      const run = runManifest(
        `runtime: ${RUNTIME}
deployment:
  containers:
    - name: idle
      argv: [${process.execPath}, -e, "setInterval(() => {}, 1000)"]
  readiness: {tcp: 1}
`,
        `127.0.0.1:${proxy.port}`,
      );
      await run.waitFor((e) => e.event === "deployment_phase");
      proxy.cut();
      run.child.kill("SIGINT");
      await run.waitFor((e) => e.event === "server_unavailable" && e.step === "rollback");
      expect(run.stderr()).toContain("SIGINT: rolling the lease back before exiting");
      // Past the window in which a signal is the first one delivered twice (npm forwards Ctrl-C).
      await new Promise((resolve) => setTimeout(resolve, SAME_SIGNAL_MS + 100));
      run.child.kill("SIGINT");
      expect(await run.exited).toBe(130);
      const leaseId = run.events[0]?.lease_id as string;
      expect(run.events.at(-1)).toMatchObject({
        event: "done",
        passed: false,
        exit_code: 130,
        lease_id: leaseId,
      });
      expect(run.stderr()).toContain(
        `interrupted again: exiting without waiting for the rollback; lease ${leaseId} may be left open until its TTL rolls it back`,
      );
      expect(run.stderr()).toContain(`leasehold lease rollback ${leaseId}`);
      expect((await leases().getLease({ leaseId })).lease?.state).toBe(LeaseState.OPEN);
      await leases().rollbackLease({ leaseId });
    } finally {
      proxy.close();
    }
  });

  it("--keep-lease leaves the lease open with everything in it, and says so", async () => {
    const port = await freePort();
    const run = cli([
      "lease",
      "run",
      "--keep-lease",
      "--test",
      manifestFile(`runtime: ${RUNTIME}
${exampleDeployment(port)}
checks:
  - tcp: {port: ${port}}
`),
    ]);
    expect(await run.exited).toBe(0);
    expect(names(run.events).slice(-2)).toEqual(["lease_kept", "done"]);
    const leaseId = run.events[0]?.lease_id as string;
    const { lease } = await leases().getLease({ leaseId });
    expect(lease?.state).toBe(LeaseState.OPEN);
    expect(lease?.ownedResources).toBeGreaterThan(0);
    expect(run.events.find((e) => e.event === "lease_kept")?.expire_time).toBe(
      new Date(
        Number(lease?.expireTime?.seconds) * 1000 + (lease?.expireTime?.nanos ?? 0) / 1e6,
      ).toISOString(),
    );
    await leases().rollbackLease({ leaseId });
  });

  it("lease wait shows a container's stderr line with its escape sequences escaped, not acted on", async () => {
    const { lease } = await leases().createLease({ runtime: RUNTIME, label: "escapes" });
    const leaseId = lease?.id ?? "";
    const script = 'process.stderr.write("\\u001b[2J\\u001b[31mERROR colored\\u001b[0m\\n"); process.exit(1)';
    await resources().createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: [process.execPath, "-e", script] } }] },
    });
    const wait = cli(["lease", "wait", leaseId, "--timeout", "30s"]);
    expect(await wait.exited).toBe(1);
    const text = wait.events.map((e) => String(e.text)).join("\n");
    expect(text).not.toContain("\u001b");
    expect(wait.events.at(-1)?.text).toBe(
      "not ready: the deployment is FAILED: failed (not retryable): container c exited 1: " +
        "\\x1b[2J\\x1b[31mERROR colored\\x1b[0m",
    );
    await leases().rollbackLease({ leaseId });
  });

  it("names the command and the flags to fix, not the API's calls and fields", async () => {
    const { lease } = await leases().createLease({ runtime: RUNTIME, label: "cli-words" });
    const leaseId = lease?.id ?? "";
    const wait = cli(["lease", "wait", leaseId, "--timeout", "5s"]);
    expect(await wait.exited).toBe(1);
    expect(wait.stderr()).toContain(
      `owns no deployment; create one with CreateDeployment first (leasehold deployment create --lease ${leaseId} --spec <file>)`,
    );
    const spec = join(mkdtempSync(join(scratch, "spec-")), "spec.yaml");
    writeFileSync(spec, `containers: [{name: c, command: {argv: [${process.execPath}]}}]\n`);
    const nowhere = cli(["deployment", "create", "--spec", spec]);
    expect(await nowhere.exited).toBe(2);
    expect(nowhere.stderr()).toBe(
      "leasehold: give --lease <id> (it runs on the lease's runtime) or --runtime <cluster> (without a lease)\n",
    );
    const both = cli(["deployment", "create", "--spec", spec, "--lease", leaseId, "--runtime", RUNTIME]);
    expect(await both.exited).toBe(2);
    expect(both.stderr()).toBe(
      "leasehold: give either --lease or --runtime, not both: in a lease it runs on the lease's runtime\n",
    );
    const long = cli(["lease", "create", "--runtime", RUNTIME, "--ttl", "48h"]);
    expect(await long.exited).toBe(2);
    expect(long.stderr()).toBe(
      "leasehold: --ttl: 48h is longer than the server's maximum, 24h; ask for less, or raise the maximum " +
        "with the server's --lease-max-ttl (leasehold serve --lease-max-ttl <duration>)\n",
    );
    const short = cli(["lease", "create", "--runtime", RUNTIME, "--ttl", "500ms"]);
    expect(await short.exited).toBe(2);
    expect(short.stderr()).toBe("leasehold: --ttl: must be at least 1s\n");
    await leases().rollbackLease({ leaseId });
  });

  it("lease collect-outputs says when no output file was saved, and --json still lists none", async () => {
    const port = await freePort();
    const { lease } = await leases().createLease({ runtime: RUNTIME, label: "no-outputs" });
    const leaseId = lease?.id ?? "";
    await resources().createDeployment({
      leaseId,
      spec: {
        containers: [
          {
            name: "idle",
            command: {
              argv: [process.execPath, "-e", `require("net").createServer().listen(${port}, "127.0.0.1")`],
            },
          },
        ],
        readinessProbe: { check: { case: "tcpPort", value: port } },
        outputsDir: "out",
      },
    });
    expect(await cli(["lease", "wait", leaseId, "--timeout", "30s"]).exited).toBe(0);
    const collected = cli(["lease", "collect-outputs", leaseId]);
    expect(await collected.exited).toBe(0);
    expect(collected.events.map((e) => e.text)).toEqual(["no output files were saved"]);
    const json = cli(["--json", "lease", "collect-outputs", leaseId]);
    expect(await json.exited).toBe(0);
    expect(json.events).toEqual([{ fileIds: [], skipped: [] }]);
    await leases().rollbackLease({ leaseId });
  });

  it("deployment create, lease wait and lease collect-outputs do the same steps one at a time", async () => {
    const port = await freePort();
    const { lease } = await leases().createLease({ runtime: RUNTIME, label: "by-hand" });
    const leaseId = lease?.id ?? "";
    const dir = mkdtempSync(join(scratch, "spec-"));
    const spec = join(dir, "spec.yaml");
    writeFileSync(
      spec,
      `containers:
  - name: web
    command:
      argv: [${process.execPath}, -e, 'require("fs").writeFileSync("out/a.txt", "A"); require("fs").symlinkSync("a.txt", "out/b.txt"); require("net").createServer().listen(${port}, "127.0.0.1")']
readiness_probe: {tcp_port: ${port}, period: 0.1s}
outputs_dir: out
`,
    );
    const created = cli(["--json", "deployment", "create", "--lease", leaseId, "--spec", spec]);
    expect(await created.exited).toBe(0);
    expect(created.events[0]).toMatchObject({
      kind: "deployment",
      leaseId,
      deployment: { spec: { outputsDir: "out" } },
    });
    // The answer shows the phase when it was read: the connected agent may have started it already.
    expect(["DEPLOYMENT_PHASE_PENDING", "DEPLOYMENT_PHASE_STARTING"]).toContain(
      (created.events[0]?.deployment as { phase?: string } | undefined)?.phase,
    );

    const wait = cli(["--json", "lease", "wait", leaseId, "--timeout", "30s"]);
    expect(await wait.exited).toBe(0);
    expect(wait.events.at(-1)).toMatchObject({
      done: true,
      deployment: { phase: "DEPLOYMENT_PHASE_READY", containers: [{ name: "web", state: "running" }] },
    });
    expect(wait.events.slice(0, -1).every((e) => e.done === undefined)).toBe(true);
    // --timeout 0 asks once, as kubectl wait --timeout=0: ready now, so exit 0 with the verdict.
    const once = cli(["--json", "lease", "wait", leaseId, "--timeout", "0"]);
    expect(await once.exited).toBe(0);
    expect(once.events.at(-1)).toMatchObject({ done: true, deployment: { phase: "DEPLOYMENT_PHASE_READY" } });

    const collected = cli(["--json", "lease", "collect-outputs", leaseId]);
    expect(await collected.exited).toBe(0);
    const fileIds = collected.events[0]?.fileIds as string[];
    expect(fileIds).toHaveLength(1);
    expect(await download(fileIds[0] as string)).toBe("A");
    expect(collected.events[0]?.skipped).toEqual([
      { path: "b.txt", reason: "a symbolic link: only regular files are saved" },
    ]);
    // A second collect answers the same; for people, what was not saved is a table of its own.
    const again = cli(["lease", "collect-outputs", leaseId]);
    expect(await again.exited).toBe(0);
    expect(again.events.map((e) => e.text)).toEqual([
      expect.stringMatching(/^FILE +NAME +SIZE$/),
      expect.stringMatching(new RegExp(`^${fileIds[0]} +a\\.txt +1 B$`)),
      "",
      expect.stringMatching(/^NOT SAVED +SIZE +WHY$/),
      expect.stringMatching(/^b\.txt +0 B +a symbolic link: only regular files are saved$/),
    ]);

    // Stopped now: waiting again reports it and fails.
    const waitAgain = cli(["lease", "wait", leaseId, "--timeout", "5s"]);
    expect(await waitAgain.exited).toBe(1);
    expect(waitAgain.events.at(-1)?.text).toMatch(/^not ready: the deployment is STOPPED/);

    const badSpec = join(dir, "bad.yaml");
    writeFileSync(badSpec, "containers: [{name: web, command: {argv: ls}}]\n");
    const bad = cli(["deployment", "create", "--lease", leaseId, "--spec", badSpec]);
    expect(await bad.exited).toBe(2);
    expect(bad.stderr()).toContain("leasehold.v1.Command.argv");
    await leases().rollbackLease({ leaseId });
  });
});
