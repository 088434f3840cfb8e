import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { SAME_SIGNAL_MS } from "../../src/cli/output.js";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { type LeaseholdProcess, runReferenceAgent } from "../helpers/process.js";
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
    let agent: LeaseholdProcess | undefined;
    /** The commands' process groups, killed after each test whatever the agent did. */
    const groups: number[] = [];

    beforeAll(async () => {
      t = await startTestServer({ config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
      dir = await mkdtemp(join(tmpdir(), "leasehold-signals-"));
    });
    afterEach(() => {
      agent?.child.kill("SIGKILL");
      agent = undefined;
      for (const pid of groups.splice(0)) {
        try {
          process.kill(-pid, "SIGKILL");
        } catch {
          // Gone already, as it should be.
        }
      }
    });
    afterAll(async () => {
      await t?.[Symbol.asyncDispose]();
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    /** Starts an agent of `cluster`, submits `script` (sh, which writes its pid first) and waits for its pid. */
    async function holding(cluster: string, script: string) {
      agent = await runReferenceAgent({
        server: t.address,
        cluster,
        workerId: cluster,
        workDir: join(dir, cluster),
      });
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
      groups.push(pid);
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

    it("stops the held command on a second Ctrl-C, gives its lease back, and exits 130", async () => {
      const { actionId, pid, agent } = await holding("twice", "exec sleep 300");
      // One Ctrl-C under npm arrives twice at once, from the terminal and from npm: one signal.
      agent.child.kill("SIGINT");
      agent.child.kill("SIGINT");
      await agent.waitForLog((l) => l.type === "draining");
      await afterSameSignalWindow();
      // A drain waits for the command: it is still running.
      expect(alive(pid)).toBe(true);
      agent.child.kill("SIGINT");
      // Stopping, not killing: the pair above counted once.
      expect(await agent.waitForLog((l) => l.type === "stopping" || l.type === "killed")).toMatchObject({
        type: "stopping",
        running: 1,
      });
      expect(await agent.exited).toBe(130);
      // The agent waits for its command's exit before it reports: the process is gone.
      expect(alive(pid)).toBe(false);
      const got = await t.client(ActionService).getAction({ actionId });
      expect(got.action?.state).toBe(ActionState.QUEUED);
      expect(got.attempts.map((a) => a.outcome)).toEqual([AttemptOutcome.RELEASED]);
    });

    it("kills a command that ignores SIGTERM on a third Ctrl-C and exits at once", async () => {
      const { pid, agent } = await holding("thrice", "trap '' TERM; while :; do sleep 1; done");
      agent.child.kill("SIGINT");
      await agent.waitForLog((l) => l.type === "draining");
      await afterSameSignalWindow();
      agent.child.kill("SIGTERM");
      await agent.waitForLog((l) => l.type === "stopping");
      await afterSameSignalWindow();
      agent.child.kill("SIGINT");
      expect(await agent.waitForLog((l) => l.type === "killed")).toMatchObject({ count: 1 });
      expect(await agent.exited).toBe(130);
      // SIGKILL was sent to its group; the exit of a process we are not the parent of cannot be awaited.
      for (let i = 0; i < 1200 && alive(pid); i++) await new Promise((r) => setTimeout(r, 25));
      expect(alive(pid)).toBe(false);
    });
  },
);
