import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, watch, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { freshStore, type TestStore } from "../helpers/database.js";
import { freePort } from "../helpers/ports.js";
import { type LeaseholdProcess, runLeasehold, runReferenceAgent } from "../helpers/process.js";

/**
 * SPEC rule 11 with real processes: the reference agent (`leasehold agent`)
 * runs a command while its server is frozen, thawed, killed and restarted.
 * Each command appends its epoch ($LEASEHOLD_EPOCH) to a file when it starts,
 * so the test sees every start of the work, not just every grant.
 */
describe("the reference agent across server freezes and restarts", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  /** A directory removed after the test. */
  function tempDir(): string {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-fencing-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    return dir;
  }

  /** `leasehold serve` on `port` with `grace` and 500 ms heartbeats, once it is serving. */
  async function serve(port: number, store: TestStore, grace: string): Promise<LeaseholdProcess> {
    const server = runLeasehold(
      [
        "serve",
        "--listen",
        `127.0.0.1:${port}`,
        "--metrics-listen",
        "off",
        "--data-dir",
        store.dataDir,
        "--grace-period",
        grace,
        "--heartbeat-interval",
        "500ms",
      ],
      store.url,
    );
    cleanups.push(() => {
      server.child.kill("SIGCONT");
      server.child.kill("SIGKILL");
      return server.exited;
    });
    await server.waitForLog((l) => l.msg === "leasehold serving");
    return server;
  }

  /** The reference agent with one slot, connected. */
  async function agent(address: string, workerId: string, workDir = tempDir()): Promise<LeaseholdProcess> {
    const a = await runReferenceAgent({
      server: address,
      cluster: "east",
      workerId,
      workDir,
      slots: 1,
    });
    cleanups.push(() => {
      a.child.kill("SIGKILL");
      return a.exited;
    });
    return a;
  }

  /**
   * A command that appends its epoch to `starts` and then runs until `done`
   * exists. Its last process is a `sleep` with a unique argument, so whatever a
   * killed agent left behind is found and stopped after the test.
   */
  function command(starts: string, done: string): string[] {
    const tick = `0.1${Math.floor(Math.random() * 1e9)}`;
    cleanups.push(() => {
      // Ends the loop of a command an agent killed with SIGKILL left behind, then its last sleep.
      writeFileSync(done, "");
      return new Promise((r) => execFile("pkill", ["-f", `^sleep ${tick}$`], () => r(undefined)));
    });
    return [
      "sh",
      "-c",
      `echo "$LEASEHOLD_EPOCH" >> "$0"; while [ ! -e "$1" ]; do sleep ${tick}; done`,
      starts,
      done,
    ];
  }

  /** The epochs written to `file` so far, one per start of the command. */
  const startsIn = (file: string) =>
    existsSync(file) ? readFileSync(file, "utf8").split("\n").filter(Boolean).map(Number) : [];

  /** Resolves once `file` holds at least `count` starts (watching its directory, not polling). */
  function started(file: string, count: number): Promise<number[]> {
    return new Promise((resolve) => {
      const look = () => {
        const epochs = startsIn(file);
        if (epochs.length < count) return;
        watcher.close();
        resolve(epochs);
      };
      const watcher = watch(join(file, ".."), look);
      cleanups.push(() => watcher.close());
      look();
    });
  }

  /** Resolves once `file` exists (watching its directory). */
  function appeared(file: string): Promise<void> {
    return new Promise((resolve) => {
      const look = () => {
        if (!existsSync(file)) return;
        watcher.close();
        resolve();
      };
      const watcher = watch(join(file, ".."), look);
      cleanups.push(() => watcher.close());
      look();
    });
  }

  /** The index of the first log line at or after `from` that matches `test`, once there is one. */
  async function lineAfter(
    p: LeaseholdProcess,
    from: number,
    test: (l: Record<string, unknown>) => boolean,
  ): Promise<number> {
    await p.waitForLog((l) => p.logs.indexOf(l) >= from && test(l));
    return p.logs.findIndex((l, i) => i >= from && test(l));
  }

  it("self-fences again after a first self-fence and a reconnect", async () => {
    await using store = await freshStore();
    const port = await freePort();
    const address = `127.0.0.1:${port}`;
    const server = await serve(port, store, "3s");
    const worker = await agent(address, "fence-twice");
    const api = createClient(ActionService, address);
    cleanups.push(() => api.close());
    const dir = tempDir();
    const starts = join(dir, "starts");
    const { action } = await api.submitAction({
      cluster: "east",
      payload: { argv: command(starts, join(dir, "done")) } as never,
      retryPolicy: { maxAttempts: 5 },
      maxSystemRetries: 5,
    });
    const id = action?.id ?? "";
    const isFence = (l: Record<string, unknown>) =>
      l.type === "self_fenced" && (l.actionIds as string[]).includes(id);

    /**
     * Waits for the command's `n`th start, freezes the server, and resolves once
     * the agent has fenced that attempt (a fence after its grant; on a busy
     * machine it may come even before the freeze, from an ack that guaranteed
     * too little), then thaws the server.
     */
    async function freezeAndAwaitFence(n: number): Promise<number> {
      const epoch = (await started(starts, n))[n - 1] as number;
      const granted = await lineAfter(
        worker,
        0,
        (l) => l.type === "grant" && l.actionId === id && l.epoch === epoch,
      );
      server.child.kill("SIGSTOP");
      await lineAfter(worker, granted, isFence);
      server.child.kill("SIGCONT");
      return epoch;
    }

    expect(await freezeAndAwaitFence(1)).toBe(1);
    // Thawed: the action is granted again (released by the fence, or expired) and the command
    // starts again; a second freeze must fence that attempt as well.
    expect(await freezeAndAwaitFence(2)).toBeGreaterThan(1);
  }, 120_000);

  it("resumes its lease across a server restart shorter than the grace, without starting the work again", async () => {
    await using store = await freshStore();
    const port = await freePort();
    const address = `127.0.0.1:${port}`;
    // Far longer than a restart takes even on a busy machine: the agent's own guarantee is
    // shorter than the grace by up to two heartbeats and its margin.
    let server = await serve(port, store, "30s");
    const worker = await agent(address, "survivor");
    const dir = tempDir();
    const starts = join(dir, "starts");
    const done = join(dir, "done");
    const submitter = createClient(ActionService, address);
    cleanups.push(() => submitter.close());
    const { action } = await submitter.submitAction({
      cluster: "east",
      payload: { argv: command(starts, done) } as never,
    });
    const id = action?.id ?? "";
    await started(starts, 1);

    // Crash the server and start it again on the same data and port.
    const beforeCrash = worker.logs.length;
    server.child.kill("SIGKILL");
    await server.exited;
    server = await serve(port, store, "30s");
    await lineAfter(
      worker,
      beforeCrash,
      (l) => l.type === "connected" && (l.resumed as string[]).includes(id),
    );

    // Let the command finish: the one attempt that ran all along reports success.
    writeFileSync(done, "");
    const api = createClient(ActionService, address);
    cleanups.push(() => api.close());
    let last = (await api.getAction({ actionId: id })).action;
    for await (const m of api.watchAction({ actionId: id })) last = m.action;
    expect(last).toMatchObject({ state: ActionState.SUCCEEDED, epoch: 1n, attemptCount: 1 });
    expect(startsIn(starts)).toEqual([1]);
    const agentEvents = worker.logs.map((l) => l.type);
    expect(agentEvents).not.toContain("self_fenced");
    expect(agentEvents.filter((t) => t === "grant")).toHaveLength(1);
    expect(server.logs.some((l) => String(l.msg).startsWith("lease expired"))).toBe(false);
  }, 120_000);

  /** Whether process `pid` has ended (gone, or a zombie its stopped parent has not reaped). */
  const ended = (pid: number) => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
    } catch {
      return true;
    }
  };

  /** Starts the reference agent on a command whose group leader writes its pid to a file; its pid. */
  async function runningCommand(workerId: string) {
    const store = await freshStore();
    cleanups.push(() => store.drop());
    const port = await freePort();
    const address = `127.0.0.1:${port}`;
    const server = await serve(port, store, "3s");
    const workDir = tempDir();
    const worker = await agent(address, workerId, workDir);
    const api = createClient(ActionService, address);
    cleanups.push(() => api.close());
    const dir = tempDir();
    const pidFile = join(dir, "pid");
    const done = join(dir, "done");
    cleanups.push(() => writeFileSync(done, ""));
    await api.submitAction({
      cluster: "east",
      payload: {
        argv: [
          "sh",
          "-c",
          `echo $$ > "$0.new"; mv "$0.new" "$0"; while [ ! -e "$1" ]; do sleep 0.1; done`,
          pidFile,
          done,
        ],
      } as never,
    });
    await started(pidFile, 1);
    const pid = startsIn(pidFile)[0] as number;
    expect(ended(pid)).toBe(false);
    // The agent records the group after telling its keeper: once the record is there, both know.
    await appeared(join(workDir, ".processes", workerId, String(pid)));
    return { server, worker, pid };
  }

  it("has its commands killed by the fence keeper when it is paused past its guarantee", async () => {
    const { server, worker, pid } = await runningCommand("paused");
    cleanups.push(() => worker.child.kill("SIGCONT"));
    worker.child.kill("SIGSTOP");
    // The agent cannot fence itself while stopped: its keeper kills the command once the
    // guarantee (3 s grace, less the margin) runs out, before the server reaps the session and
    // may hand the action on.
    await server.waitForLog((l) => String(l.msg).startsWith("lease expired"));
    expect(ended(pid)).toBe(true);
  }, 60_000);

  it("has its commands killed by the fence keeper at once when it is killed", async () => {
    const { worker, pid } = await runningCommand("killed");
    worker.child.kill("SIGKILL");
    await expect.poll(() => ended(pid), { timeout: 30_000, interval: 50 }).toBe(true);
  }, 60_000);
});
