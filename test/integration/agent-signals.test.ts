import { readdirSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { createAgent } from "../../src/agent/agent.js";
import { SAME_SIGNAL_MS } from "../../src/cli/signals.js";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { type LeaseholdProcess, runLeasehold, runReferenceAgent } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/**
 * `leasehold agent` and Ctrl-C, as a real agent process with a real command:
 * once drains, twice stops the held actions now and gives their leases back,
 * three times kills what they started and exits at once. Driver-neutral.
 */
describe.runIf(runsDriverNeutralTests())(
  "the reference agent on repeated signals",
  { timeout: 60_000 },
  () => {
    let t: TestServer;
    let dir: string;
    /** The agents of the running test, killed after it whatever they did. */
    const agents: { agent: LeaseholdProcess; workDir: string; workerId: string }[] = [];

    beforeAll(async () => {
      t = await startTestServer({ config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
      dir = await mkdtemp(join(tmpdir(), "leasehold-signals-"));
    });
    afterEach(() => {
      for (const { agent, workDir, workerId } of agents.splice(0)) {
        agent.child.kill("SIGKILL");
        // And every process group it recorded (see process-registry.ts): nothing outlives a failed test.
        const groups = join(workDir, ".processes", workerId);
        for (const pid of (() => {
          try {
            return readdirSync(groups);
          } catch {
            return [];
          }
        })()) {
          try {
            process.kill(-Number(pid), "SIGKILL");
          } catch {
            // Gone already, as it should be.
          }
        }
      }
    });
    afterAll(async () => {
      await t?.[Symbol.asyncDispose]();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    /**
     * Starts an agent named `cluster` (its worker id too) with `flags`, submits `script` to it
     * (sh, which writes its pid first), and waits for that pid.
     */
    async function holding(cluster: string, script: string, flags: readonly string[] = []) {
      const workDir = join(dir, cluster);
      const agent = await runReferenceAgent({
        server: t.address,
        cluster,
        workerId: cluster,
        workDir,
        allow: ["--allow-any-command", ...flags],
      });
      agents.push({ agent, workDir, workerId: cluster });
      const pidFile = join(dir, `${cluster}.pid`);
      const { action } = await t.client(ActionService).submitAction({
        cluster,
        payload: {
          argv: ["sh", "-c", `echo $$ > ${pidFile}.tmp && mv ${pidFile}.tmp ${pidFile}; ${script}`],
        } as never,
      });
      await agent.waitForLog((l) => l.type === "grant");
      let pid = 0;
      for (let i = 0; i < 2400 && pid === 0; i++) {
        pid = Number(await readFile(pidFile, "utf8").catch(() => "0"));
        if (pid === 0) await new Promise((r) => setTimeout(r, 25));
      }
      expect(pid).toBeGreaterThan(0);
      return { actionId: action?.id ?? "", pid, agent };
    }

    /** Lets SAME_SIGNAL_MS pass: a signal sent sooner counts as the one before, by design. */
    const afterSameSignalWindow = () => new Promise((r) => setTimeout(r, SAME_SIGNAL_MS + 100));

    const alive = (pid: number) => {
      try {
        process.kill(pid, 0);
        return true;
      } catch {
        return false;
      }
    };

    /** Waits (bounded) for `pid`, which this process is not the parent of, to be gone. */
    const gone = async (pid: number) => {
      for (let i = 0; i < 1200 && alive(pid); i++) await new Promise((r) => setTimeout(r, 25));
      return !alive(pid);
    };

    /** The action's state and its attempts' outcomes. */
    const outcome = async (actionId: string) => {
      const got = await t.client(ActionService).getAction({ actionId });
      return { state: got.action?.state, attempts: got.attempts.map((a) => a.outcome) };
    };

    it("exits on the first Ctrl-C when it never connected: there is no session to end", async () => {
      // A port that takes connections and cuts each at once: no server, and no other test's on it.
      const holder = createServer((socket) => socket.destroy());
      await new Promise<void>((resolve) => holder.listen(0, "127.0.0.1", resolve));
      const port = (holder.address() as { port: number }).port;
      try {
        const workDir = join(dir, "never");
        const agent = runLeasehold(
          [
            "--server",
            `127.0.0.1:${port}`,
            "--json",
            "agent",
            "--cluster",
            "never-connected",
            "--worker-id",
            "never",
            "--work-dir",
            workDir,
            "--allow-any-command",
          ],
          undefined,
        );
        agents.push({ agent, workDir, workerId: "never" });
        await agent.waitForLog((l) => l.type === "disconnected");
        agent.child.kill("SIGINT");
        await agent.waitForLog((l) => l.type === "interrupt_unconnected");
        expect(await agent.exited).toBe(0);
        expect(agent.logs.filter((l) => l.type === "goodbye_unconfirmed")).toEqual([]);
      } finally {
        holder.close();
      }
    });

    it("says each refusal of its worker id once, stopping nothing it never held, and has nothing to hand back", async () => {
      // Another process holds the session of this worker id: every hello of the agent is refused.
      let holding = () => {};
      const held = new Promise<void>((resolve) => {
        holding = resolve;
      });
      const holder = createAgent({
        address: t.address,
        cluster: "refused",
        workerId: "refused",
        handler: async () => ({}),
        onEvent: (e) => {
          if (e.type === "connected") holding();
        },
      });
      try {
        await held;
        const workDir = join(dir, "refused");
        const agent = runLeasehold(
          [
            "--server",
            t.address,
            "agent",
            "--cluster",
            "refused",
            "--worker-id",
            "refused",
            "--work-dir",
            workDir,
            "--allow-any-command",
          ],
          undefined,
        );
        agents.push({ agent, workDir, workerId: "refused" });
        const refusal =
          /the server refused this agent: another process is connected as worker refused and holds its session \(worker ids must be unique\); trying again in \d+ms$/;
        const refusals = () => agent.logs.filter((l) => refusal.test(String(l.msg)));
        await agent.waitForLog(() => refusals().length >= 2);
        // One line a refusal: no "disconnected" (it never was connected), no actions stopped (it held none).
        const said = agent.logs.map((l) => String(l.msg)).filter((m) => !/ made the work directory /.test(m));
        expect(said).toEqual(refusals().map((l) => String(l.msg)));
        agent.child.kill("SIGTERM");
        await agent.waitForLog((l) =>
          / not connected \(no session with a server\): nothing to hand back; exiting$/.test(String(l.msg)),
        );
        expect(await agent.exited).toBe(0);
        expect(agent.logs.some((l) => /never connected|stopped|disconnected/.test(String(l.msg)))).toBe(
          false,
        );
      } finally {
        await holder.close({ timeoutMs: 100 });
      }
    });

    // The drain alone would wait 30 s for the command: the test's timeout fails it long before.
    it("stops the held command on a second Ctrl-C, gives its lease back, and exits 130", {
      timeout: 20_000,
    }, async () => {
      const { actionId, pid, agent } = await holding("twice", "exec sleep 300");
      agent.child.kill("SIGINT");
      await agent.waitForLog((l) => l.type === "interrupt_drain");
      await afterSameSignalWindow();
      // A drain waits for the command: it is still running.
      expect(alive(pid)).toBe(true);
      agent.child.kill("SIGINT");
      expect(await agent.waitForLog((l) => l.type === "interrupt_stop")).toMatchObject({ running: 1 });
      expect(await agent.exited).toBe(130);
      // The agent waits for its command's exit before it reports: the process is gone.
      expect(alive(pid)).toBe(false);
      expect(await outcome(actionId)).toEqual({
        state: ActionState.QUEUED,
        attempts: [AttemptOutcome.RELEASED],
      });
    });

    it("says which actions its drain stopped at --drain-timeout, gives them back, and exits 0", async () => {
      const { actionId, pid, agent } = await holding("drain-limit", "exec sleep 300", [
        "--drain-timeout",
        "1500ms",
      ]);
      agent.child.kill("SIGTERM");
      await agent.waitForLog((l) => l.type === "interrupt_drain");
      const timedOut = await agent.waitForLog((l) => l.type === "drain_timeout");
      expect(timedOut.stopped).toEqual([{ action_id: actionId, epoch: 1 }]);
      expect(await agent.exited).toBe(0);
      expect(alive(pid)).toBe(false);
      expect(await outcome(actionId)).toEqual({
        state: ActionState.QUEUED,
        attempts: [AttemptOutcome.RELEASED],
      });
    });

    it("kills a command that ignores SIGTERM on a third Ctrl-C and exits at once", async () => {
      // A long --kill-grace: only the third signal can end the command soon.
      const { pid, agent } = await holding("thrice", "trap '' TERM; while :; do sleep 1; done", [
        "--kill-grace",
        "10m",
      ]);
      agent.child.kill("SIGINT");
      await agent.waitForLog((l) => l.type === "interrupt_drain");
      await afterSameSignalWindow();
      agent.child.kill("SIGTERM");
      await agent.waitForLog((l) => l.type === "interrupt_stop");
      await afterSameSignalWindow();
      agent.child.kill("SIGINT");
      expect(await agent.waitForLog((l) => l.type === "interrupt_kill")).toMatchObject({ count: 1 });
      expect(await agent.exited).toBe(130);
      // SIGKILL was sent to its group; the exit of a process we are not the parent of cannot be awaited.
      expect(await gone(pid)).toBe(true);
    });

    it("still drains and stops its command when its stdout was closed (a `| tee` killed by the same Ctrl-C)", {
      timeout: 20_000,
    }, async () => {
      const { actionId, pid, agent } = await holding("piped", "exec sleep 300");
      agent.child.stdout?.destroy();
      agent.child.kill("SIGINT");
      await afterSameSignalWindow();
      // It drains (writing its lines nowhere) instead of exiting on the closed pipe.
      expect(alive(pid)).toBe(true);
      agent.child.kill("SIGINT");
      expect(await agent.exited).toBe(130);
      expect(alive(pid)).toBe(false);
      expect(await outcome(actionId)).toEqual({
        state: ActionState.QUEUED,
        attempts: [AttemptOutcome.RELEASED],
      });
    });
  },
);
