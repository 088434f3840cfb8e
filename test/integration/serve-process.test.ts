import { describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService, WorkerState } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { freshPgliteDirectory, freshStore } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { runLeasehold } from "../helpers/process.js";
import { expectStatus } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

/** Each test starts `leasehold` processes (tsx, PGlite): seconds each on a busy machine. */
const PROCESS_TIMEOUT_MS = 120_000;

describe("leasehold serve as a process", { timeout: PROCESS_TIMEOUT_MS }, () => {
  it("serves, then on SIGTERM ends open streams with UNAVAILABLE and exits 0", async () => {
    await using store = await freshStore();
    const server = runLeasehold(
      ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", store.dataDir],
      store.url,
    );
    try {
      const ready = await server.waitForLog((l) => l.msg === "leasehold serving");
      const address = `127.0.0.1:${ready.port}`;
      const health = healthClient(address);
      expect(await health.check()).toBe("SERVING");
      health.close();

      const api = createClient(ActionService, address);
      const { action } = await api.submitAction({ cluster: "sig" });
      const stream = api.watchAction({ actionId: action?.id ?? "" });
      const iterator = stream[Symbol.asyncIterator]();
      expect((await iterator.next()).value?.action?.id).toBe(action?.id);

      server.child.kill("SIGTERM");
      await expectStatus(() => iterator.next(), Code.Unavailable, /shutting down/);
      expect(await server.exited).toBe(0);
      expect(server.logs.map((l) => l.msg)).toEqual(
        expect.arrayContaining(["shutting down", "leasehold stopped"]),
      );
      // Every line names the process that wrote it, the signal's and the shutdown's too.
      expect(ready.serverId).toEqual(expect.any(String));
      expect(server.logs.filter((l) => l.serverId !== ready.serverId)).toEqual([]);
      api.close();
    } finally {
      server.child.kill("SIGKILL");
    }
  });

  it("refuses to listen beyond loopback without --insecure, naming the option", async () => {
    const server = runLeasehold(["serve", "--listen", "0.0.0.0:0", "--data-dir", "memory://"], undefined);
    let stderr = "";
    server.child.stderr?.on("data", (d) => {
      stderr += d;
    });
    expect(await server.exited).toBe(2);
    expect(stderr).toMatch(/--listen: 0\.0\.0\.0 accepts connections from other machines.*--insecure/);
  });

  it("reads LEASEHOLD_INSECURE=off as off, and refuses a value that is neither on nor off", async () => {
    const stderrOf = async (value: string) => {
      const server = runLeasehold(["serve", "--data-dir", "memory://"], undefined, {
        env: { LEASEHOLD_LISTEN: "0.0.0.0:0", LEASEHOLD_INSECURE: value },
      });
      let stderr = "";
      server.child.stderr?.on("data", (d) => {
        stderr += d;
      });
      expect(await server.exited).toBe(2);
      return stderr;
    };
    expect(await stderrOf("off")).toMatch(/LEASEHOLD_LISTEN \(--listen\): 0\.0\.0\.0 accepts connections/);
    expect(await stderrOf("nope")).toContain('LEASEHOLD_INSECURE: "nope" is neither on nor off');
  });
});

describe("the embedded PGlite data directory", { timeout: PROCESS_TIMEOUT_MS }, () => {
  it("is refused to a second server while the first one runs", async () => {
    await using store = freshPgliteDirectory();
    const first = runLeasehold(
      ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", store.dataDir],
      undefined,
    );
    try {
      await first.waitForLog((l) => l.msg === "leasehold serving");
      const second = runLeasehold(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", store.dataDir],
        undefined,
      );
      let stderr = "";
      second.child.stderr?.on("data", (d) => {
        stderr += d;
      });
      expect(await second.exited).toBe(1);
      expect(stderr).toMatch(/data directory .* is in use by process \d+/);
    } finally {
      first.child.kill("SIGTERM");
      await first.exited;
    }
  });

  it("is taken back after a kill -9, and the killed server's workers are shown in grace, not connected", async () => {
    await using store = freshPgliteDirectory();
    const args = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir", store.dataDir];
    const first = runLeasehold(args, undefined);
    let address: string;
    try {
      address = `127.0.0.1:${(await first.waitForLog((l) => l.msg === "leasehold serving")).port}`;
      const worker = await connectWorker(address, {
        workerId: "crashed-with-it",
        cluster: "east",
        capacity: 1,
      });
      first.child.kill("SIGKILL");
      await worker.ended;
    } finally {
      first.child.kill("SIGKILL");
    }
    await first.exited;
    // At once: the pid file names a process that is gone.
    const second = runLeasehold(args, undefined);
    try {
      const ready = await second.waitForLog((l) => l.msg === "leasehold serving");
      const { workers } = await createClient(ClusterService, `127.0.0.1:${ready.port}`).listWorkers({
        cluster: "east",
      });
      // Its stream died with the process before: the only process on this data directory knows it.
      expect(workers.map((w) => [w.workerId, w.state])).toEqual([["crashed-with-it", WorkerState.IN_GRACE]]);
    } finally {
      second.child.kill("SIGTERM");
      await second.exited;
    }
  });
});
