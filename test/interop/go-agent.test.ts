import { type ChildProcess, execFile, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from "vitest";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { collectLines } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

// The Go client (clients/go) against a real server: the example agent built from
// source runs actions, survives its peer's death, self-fences, and its error
// decoding is checked on a real refusal. The wire does not depend on the
// database, so this runs once per CI run, in the PGlite pass.

const run = promisify(execFile);
const GO_CLIENT = fileURLToPath(new URL("../../clients/go", import.meta.url));
/** Debian's Go libraries live in this GOPATH tree. */
const DEBIAN_GOCODE = "/usr/share/gocode";
/** Our code builds in GOPATH mode, with clients/go as the first GOPATH entry (see clients/go/README.md). */
const GO_ENV = {
  ...process.env,
  GO111MODULE: "off",
  GOPATH: `${GO_CLIENT}:${DEBIAN_GOCODE}`,
  GOFLAGS: "",
};
const APT_INSTALL =
  "apt-get install -y --no-install-recommends golang-go golang-google-grpc-dev golang-google-protobuf-dev " +
  "golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev";

/** What is missing to build the Go client, or undefined when everything is there. */
function missingGo(): string | undefined {
  try {
    execFileSync("go", ["version"], { stdio: "ignore" });
  } catch {
    return "`go` is not on PATH";
  }
  const libraries = [
    "google.golang.org/grpc",
    "google.golang.org/protobuf",
    "google.golang.org/genproto/googleapis/rpc/errdetails",
    "github.com/golang/protobuf",
  ];
  const absent = libraries.filter((l) => !existsSync(join(DEBIAN_GOCODE, "src", l)));
  if (absent.length > 0) return `the Go libraries ${absent.join(", ")} are not in ${DEBIAN_GOCODE}`;
  // golang/protobuf 1.3 (Debian's default alternative) predates google.golang.org/protobuf.
  const goMod = join(DEBIAN_GOCODE, "src/github.com/golang/protobuf/go.mod");
  if (!existsSync(goMod) || !readFileSync(goMod, "utf8").includes("google.golang.org/protobuf")) {
    return "github.com/golang/protobuf is older than 1.5 (golang-github-golang-protobuf-1-3-dev is installed)";
  }
  return undefined;
}

const onPglite = inject("driver") === "pglite";
const missing = onPglite ? missingGo() : undefined;
// On a developer's machine a missing toolchain skips, and says so; CI must have it.
const skipReason = missing !== undefined && !process.env.CI ? missing : undefined;
if (skipReason !== undefined) {
  console.warn(`test/interop/go-agent.test.ts skipped: ${skipReason}. To run it: ${APT_INSTALL}`);
}

/** A Go example agent process and its JSON event lines. */
interface GoAgent {
  readonly child: ChildProcess;
  readonly lines: Record<string, unknown>[];
  waitFor(test: (line: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
  readonly exited: Promise<number | string>;
}

// In CI a missing toolchain is a failure, not a skip (declared only then, so
// that other runs do not count a skipped test for it).
if (onPglite && missing !== undefined && skipReason === undefined) {
  describe("the Go client in CI", () => {
    it("has the Go toolchain and libraries it is built with", () => {
      expect.fail(`${missing}: CI must install them: ${APT_INSTALL}`);
    });
  });
}

describe.runIf(onPglite && missing === undefined)("the Go client against a real server", () => {
  let bin = "";
  const children: ChildProcess[] = [];
  const servers: TestServer[] = [];
  // A failing beforeAll only skips the tests (and vitest then exits 0), so the
  // build's error is kept and every test throws it.
  let buildError: Error | undefined;

  beforeAll(async () => {
    bin = mkdtempSync(join(tmpdir(), "leasehold-go-"));
    buildError = await run(
      "go",
      [
        "build",
        "-o",
        `${bin}/`,
        "leasehold.dev/client/cmd/example-agent",
        "leasehold.dev/client/cmd/submit-actions",
      ],
      { env: GO_ENV, cwd: GO_CLIENT },
    ).then(
      () => undefined,
      (error: { stderr?: string }) => new Error(`go build failed:\n${error.stderr ?? String(error)}`),
    );
  }, 600_000);

  /** Throws the build's error, if any. */
  function built(): void {
    if (buildError) throw buildError;
  }

  afterEach(async () => {
    for (const child of children.splice(0)) child.kill("SIGKILL");
    for (const server of servers.splice(0)) await server[Symbol.asyncDispose]();
  });

  afterAll(() => {
    if (bin) rmSync(bin, { recursive: true, force: true });
  });

  async function server(gracePeriod = "2s", heartbeatInterval = "500ms"): Promise<TestServer> {
    built();
    const t = await startTestServer({ config: { gracePeriod, heartbeatInterval } });
    servers.push(t);
    return t;
  }

  function goAgent(address: string, workerId: string, capacity: number): GoAgent {
    const child = spawn(
      join(bin, "example-agent"),
      ["-server", address, "-cluster", "east", "-worker-id", workerId, "-capacity", String(capacity)],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    children.push(child);
    const exited = new Promise<number | string>((resolve) =>
      child.once("exit", (code, signal) => resolve(code ?? signal ?? -1)),
    );
    return { child, exited, ...collectLines(child) };
  }

  it("runs 100 submitted actions, each succeeding with its doubled n, and says goodbye on SIGTERM", async () => {
    const t = await server();
    const agent = goAgent(t.address, "go-worker", 8);
    await agent.waitFor((l) => l.event === "welcome");

    const api = t.client(ActionService);
    const submitted = await api.submitActions({
      actions: Array.from({ length: 100 }, (_, n) => ({ cluster: "east", payload: { sleep_ms: 20, n } })),
    });
    const ids = submitted.results.map((r) => r.action?.id ?? "");
    expect(ids).toHaveLength(100);
    // One waiter for all of them: the predicate sees every line, and crosses off each accepted completion.
    const unfinished = new Set(ids);
    await agent.waitFor((l) => {
      if (l.event === "completed" && l.accepted === true) unfinished.delete(String(l.actionId));
      return unfinished.size === 0;
    });

    for (const [n, id] of ids.entries()) {
      const { action } = await api.getAction({ actionId: id });
      expect(action).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n, output: { doubled: 2 * n } });
    }

    agent.child.kill("SIGTERM");
    await agent.waitFor((l) => l.event === "closed");
    expect(await agent.exited).toBe(0);
    expect(agent.lines.find((l) => l.event === "closed")).toEqual({ event: "closed" });
    expect(t.logs).toContainEqual(
      expect.objectContaining({ workerId: "go-worker", msg: "worker said goodbye" }),
    );
  }, 180_000);

  it("re-grants the actions of a killed Go agent with epoch 2 to another Go agent after the grace period", async () => {
    // A guarantee of a few seconds: at 2 s, a busy machine made the survivor self-fence (CI),
    // and its work ran a third time.
    const t = await server("5s", "1s");
    const doomed = goAgent(t.address, "go-doomed", 3);
    await doomed.waitFor((l) => l.event === "welcome");

    const api = t.client(ActionService);
    // Long enough that the doomed agent cannot finish before it is killed.
    const submitted = await api.submitActions({
      actions: [1, 2, 3].map((n) => ({ cluster: "east", payload: { sleep_ms: 3000, n } })),
    });
    const ids = submitted.results.map((r) => r.action?.id ?? "");
    await Promise.all(ids.map((id) => doomed.waitFor((l) => l.event === "grant" && l.actionId === id)));
    doomed.child.kill("SIGKILL");
    await doomed.exited;

    // Started after the kill, so nothing could be granted to it before the expiry.
    const survivor = goAgent(t.address, "go-survivor", 3);
    for (const id of ids) {
      const grant = await survivor.waitFor((l) => l.event === "grant" && l.actionId === id);
      expect(grant).toMatchObject({ epoch: 2, attempt: 2 });
      await survivor.waitFor((l) => l.event === "completed" && l.actionId === id && l.accepted === true);
    }

    for (const [i, id] of ids.entries()) {
      const got = await api.getAction({ actionId: id });
      expect(got.action).toMatchObject({
        state: ActionState.SUCCEEDED,
        epoch: 2n,
        output: { doubled: 2 * (i + 1) },
      });
      expect(got.attempts.map((a) => [a.workerId, a.epoch, a.outcome])).toEqual([
        ["go-doomed", 1n, AttemptOutcome.LEASE_EXPIRED],
        ["go-survivor", 2n, AttemptOutcome.SUCCEEDED],
      ]);
    }
  }, 120_000);

  it("self-fences: a Go agent cut off from the server stops its handler and never reports it done", async () => {
    const t = await server();
    const agent = goAgent(t.address, "go-cut-off", 1);
    await agent.waitFor((l) => l.event === "welcome");
    const { action } = await t.client(ActionService).submitAction({
      cluster: "east",
      payload: { sleep_ms: 120_000, n: 1 },
    });
    const id = action?.id ?? "";
    await agent.waitFor((l) => l.event === "started" && l.actionId === id);

    // The server goes away and stays away: no ack renews the guarantee.
    await t.stop();
    const fenced = await agent.waitFor((l) => l.event === "self_fenced");
    expect(fenced.actionIds).toEqual([id]);
    await agent.waitFor((l) => l.event === "handler_stopped" && l.actionId === id);
    expect(agent.lines.find((l) => l.event === "handler_stopped")).toMatchObject({ reason: "self_fenced" });
    expect(agent.lines.filter((l) => l.event === "completed")).toEqual([]);
  }, 60_000);

  it("decodes a refused call's BadRequest field violation in Go", async () => {
    const t = await server();
    const refused = await run(
      join(bin, "submit-actions"),
      ["-server", t.address, "-cluster", "not a cluster!", "-payload", '{"n": 1}'],
      { timeout: 60_000 },
    ).then(
      () => undefined,
      (error: { code?: number; stdout?: string }) => error,
    );
    expect(refused?.code).toBe(1);
    const { error } = JSON.parse(refused?.stdout ?? "{}");
    expect(error).toMatchObject({
      code: "INVALID_ARGUMENT",
      fieldViolations: [
        { field: "actions[0].cluster", description: expect.stringContaining("letters, digits") },
      ],
    });
    expect(error.text).toContain("(field actions[0].cluster: ");
  }, 60_000);
});
