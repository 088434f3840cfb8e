import { spawn } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { BIN, runLeasehold } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/** Each test starts `leasehold` processes (tsx): seconds each on a busy machine. */
const PROCESS_TIMEOUT_MS = 120_000;

describe("leasehold serve with its stdout closed", { timeout: PROCESS_TIMEOUT_MS }, () => {
  it("still exits on SIGTERM after the reader of its logs went away", async () => {
    const server = runLeasehold(
      ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir", "memory://"],
      undefined,
    );
    try {
      await server.waitForLog((l) => l.msg === "leasehold serving");
      // As when `leasehold serve | tee log` loses its tee: the next log line meets EPIPE.
      server.child.stdout?.destroy();
      server.child.kill("SIGTERM");
      expect(await server.exited).toBe(0);
    } finally {
      server.child.kill("SIGKILL");
    }
  });
});

describe("a command whose output pipe is closed", { timeout: PROCESS_TIMEOUT_MS }, () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer();
    const api = t.client(ActionService);
    for (let i = 0; i < 3; i++) await api.submitAction({ cluster: "pipe" });
  });
  afterAll(async () => {
    await t?.stop();
    await t?.store.drop();
  });

  /** Runs `leasehold <args>` with its stdout's read end closed before it writes; resolves with its exit and stderr. */
  function runIntoClosedPipe(args: string[]): Promise<{ code: number | string; stderr: string }> {
    const child = spawn(process.execPath, [BIN, "--server", t.address, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout.destroy();
    let stderr = "";
    child.stderr.on("data", (d) => {
      stderr += d;
    });
    return new Promise((resolve) =>
      child.once("close", (code, signal) => resolve({ code: code ?? signal ?? -1, stderr })),
    );
  }

  it("exits 0 without a stack trace, like `leasehold events | head -1`", async () => {
    expect(await runIntoClosedPipe(["events"])).toEqual({ code: 0, stderr: "" });
  });

  it("ends a followed stream quietly too", async () => {
    expect(await runIntoClosedPipe(["--json", "events", "--follow"])).toEqual({ code: 0, stderr: "" });
  });
});
