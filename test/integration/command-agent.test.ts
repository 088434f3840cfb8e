import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseCommandPayload } from "../../src/agent/command-handler.js";
import {
  type ActionContext,
  type Agent,
  type AgentEvent,
  commandHandler,
  createAgent,
  LeaseLost,
} from "../../src/agent/index.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import type { Client } from "../../src/rpc/client.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/** Whether a process is running: it exists and is not a zombie (dead, waiting to be reaped by init). */
const alive = (pid: number) => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
};

describe("the reference command agent", () => {
  let t: TestServer;
  let agent: Agent;
  let api: Client<(typeof ActionService)["method"]>;
  const events: AgentEvent[] = [];
  const dir = mkdtempSync(join(tmpdir(), "leasehold-cmd-"));

  beforeAll(async () => {
    t = await startTestServer({ config: { gracePeriod: "3s", heartbeatInterval: "500ms" } });
    api = t.client(ActionService);
    agent = createAgent({
      address: t.address,
      cluster: "cmd",
      workerId: "cmd-agent",
      capacity: 4,
      handler: commandHandler,
      onEvent: (e) => events.push(e),
    });
  });
  afterAll(async () => {
    await agent?.close({ timeoutMs: 1000 });
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Submits a payload and follows the action until it finishes. */
  async function run(payload: Record<string, unknown>, maxAttempts = 1) {
    const { action } = await api.submitAction({
      cluster: "cmd",
      payload: payload as never,
      retryPolicy: { maxAttempts },
    });
    let last = action;
    for await (const m of api.watchAction({ actionId: action?.id ?? "" })) last = m.action;
    return last;
  }

  it("returns the exit code and the tails of stdout and stderr of a command that succeeds", async () => {
    const done = await run({ argv: ["sh", "-c", "echo out; echo err >&2"], env: { GREETING: "hi" } });
    expect(done).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { exitCode: 0, stdoutTail: "out\n", stderrTail: "err\n" },
    });
  });

  it("passes env and cwd to the command", async () => {
    const done = await run({
      argv: ["sh", "-c", 'echo "$GREETING from $(pwd)"'],
      env: { GREETING: "hello" },
      cwd: dir,
    });
    expect(done?.output).toMatchObject({ stdoutTail: `hello from ${dir}\n` });
  });

  it("fails with the exit code when the command exits non-zero", async () => {
    const done = await run({ argv: ["sh", "-c", "echo broken >&2; exit 7"], retryable: false });
    expect(done).toMatchObject({
      state: ActionState.FAILED,
      failureReason: "failed (not retryable): command exited with code 7",
      lastError: { retryable: false, details: { exitCode: 7, stderrTail: "broken\n" } },
    });
  });

  it("kills a command that runs past its timeout and fails the attempt", async () => {
    const done = await run({ argv: ["sleep", "30"], timeout: 0.5 });
    expect(done?.state).toBe(ActionState.FAILED);
    expect(done?.failureReason).toMatch(/command stopped: timed out after 0\.5s/);
  });

  it("finishes when the command exits even if a background child still holds its output, and kills that child", async () => {
    const pidFile = join(dir, "bg.pid");
    const done = await run({ argv: ["sh", "-c", `sleep 300 & echo $! > ${pidFile}; echo started`] });
    expect(done).toMatchObject({
      state: ActionState.SUCCEEDED,
      output: { exitCode: 0, stdoutTail: "started\n" },
    });
    expect(alive(Number(readFileSync(pidFile, "utf8")))).toBe(false);
  });

  it("refuses a timeout its timers cannot hold, which would kill the command at once", () => {
    expect(() => parseCommandPayload({ argv: ["true"], timeout: 3_000_000 })).toThrow(
      "payload.timeout: must be at most 2147483 seconds (24 days)",
    );
    expect(parseCommandPayload({ argv: ["true"], timeout: 2_147_483 }).timeoutSeconds).toBe(2_147_483);
  });

  it("refuses a payload without argv, naming the field", async () => {
    const done = await run({ cmd: "ls" });
    expect(done).toMatchObject({
      state: ActionState.FAILED,
      failureReason: expect.stringMatching(/payload\.argv: must be a non-empty list/),
    });
  });

  it("kills the whole process group when the lease is revoked, leaving no orphans", async () => {
    const pids = join(dir, "pids");
    const script = `sleep 300 & echo $! > ${pids}.1; sleep 300 & echo $! > ${pids}.2; echo $$ > ${pids}.0; wait`;
    const { action } = await api.submitAction({
      cluster: "cmd",
      payload: { argv: ["sh", "-c", script] } as never,
    });
    const id = action?.id ?? "";
    const read = () =>
      [0, 1, 2].map((i) => (existsSync(`${pids}.${i}`) ? Number(readFileSync(`${pids}.${i}`, "utf8")) : 0));
    // The pid files are the command's own doing; wait for all three.
    while (!read().every((p) => p > 0)) await new Promise((r) => setTimeout(r, 20));
    const processes = read();
    expect(processes.every(alive)).toBe(true);
    await api.cancelAction({ actionId: id, reason: "stop it" });
    let last: Awaited<ReturnType<typeof run>>;
    for await (const m of api.watchAction({ actionId: id })) last = m.action;
    expect(last?.state).toBe(ActionState.CANCELLED);
    expect(processes.filter(alive)).toEqual([]);
    expect(events.some((e) => e.type === "revoked" && e.actionId === id && e.reason === "cancelled")).toBe(
      true,
    );
  });
});

describe("the reference command handler, on a lease gone or about to be", () => {
  it("kills the command at once with SIGKILL, not after the SIGTERM grace", async () => {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-fenced-"));
    try {
      const pidFile = join(dir, "pid");
      const lost = new AbortController();
      const ctx = {
        actionId: "a1",
        epoch: 1,
        payload: { argv: ["sh", "-c", `trap "" TERM; echo $$ > "$0"; while :; do sleep 0.1; done`, pidFile] },
        signal: lost.signal,
        progress: () => {},
      } as unknown as ActionContext;
      // A command that ignores SIGTERM, and a SIGTERM grace longer than the test.
      const ran = commandHandler(ctx, { killGraceMs: 600_000 });
      while (!existsSync(pidFile) || readFileSync(pidFile, "utf8") === "")
        await new Promise((r) => setTimeout(r, 20));
      const pid = Number(readFileSync(pidFile, "utf8"));
      lost.abort(new LeaseLost("self_fenced", "no heartbeat ack before the guarantee ran out"));
      await expect(ran).rejects.toThrow(/command stopped: no heartbeat ack/);
      expect(alive(pid)).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
