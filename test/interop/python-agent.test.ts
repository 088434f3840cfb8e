import { type ChildProcess, execFile, spawn, spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { describe, expect, inject, it } from "vitest";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { freshStore } from "../helpers/database.js";
import { freePort } from "../helpers/ports.js";
import { runLeasehold } from "../helpers/process.js";
import { startTestServer } from "../helpers/server.js";

/**
 * The Python client (clients/python) against a real server: its example agent
 * runs actions, fails over after a SIGKILL and self-fences when its server
 * freezes; its ActionService helper decodes error details. Packaging does not
 * depend on the database, so this runs once per CI run, on the PGlite pass.
 */

const PYTHON = "/usr/bin/python3";
const CLIENT_DIR = fileURLToPath(new URL("../../clients/python/", import.meta.url));
const INSTALL = "apt-get install python3-grpcio python3-protobuf";
/**
 * A failover within seconds. A Python agent self-fences when no ack comes for
 * about grace - interval - 0.5 s: 4 s leaves it 2.5 s, which a busy machine
 * does not eat up (at 2 s, half a second of stall would fence it).
 */
const FAST = { gracePeriod: "4s", heartbeatInterval: "500ms" } as const;

/** Why the Python client cannot run on this machine, or undefined when it can. */
function pythonMissing(): string | undefined {
  const probe = spawnSync(PYTHON, ["-c", "import grpc, google.protobuf"], { encoding: "utf8" });
  if (probe.error) return `${PYTHON} cannot be run (${probe.error.message})`;
  if (probe.status !== 0) {
    return `${PYTHON} cannot import grpc and protobuf (${probe.stderr.trim().split("\n").at(-1)})`;
  }
  return undefined;
}

type Line = Record<string, unknown>;

/** A Python child process with its stdout JSON lines. */
interface PythonProcess extends AsyncDisposable {
  readonly child: ChildProcess;
  readonly lines: Line[];
  /** Resolves with the lines once `done(lines)` holds; rejects, with stderr, if the process exits first. */
  until(what: string, done: (lines: Line[]) => boolean): Promise<Line[]>;
  readonly exited: Promise<number | string>;
}

/** Runs `python3 <args>` in clients/python; disposing it kills it with SIGKILL. */
function runPython(args: string[]): PythonProcess {
  const child = spawn(PYTHON, args, { cwd: CLIENT_DIR, stdio: ["ignore", "pipe", "pipe"] });
  const lines: Line[] = [];
  const waiters = new Set<() => void>();
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString("utf8")).slice(-4000);
  });
  createInterface({ input: child.stdout as NodeJS.ReadableStream }).on("line", (text) => {
    lines.push(JSON.parse(text) as Line);
    for (const w of [...waiters]) w();
  });
  const exited = new Promise<number | string>((resolve) =>
    child.once("exit", (code, signal) => resolve(code ?? signal ?? -1)),
  );
  return {
    child,
    lines,
    exited,
    until(what, done) {
      return new Promise((resolve, reject) => {
        const look = () => {
          if (!done(lines)) return;
          waiters.delete(look);
          resolve(lines);
        };
        waiters.add(look);
        exited.then((code) => {
          if (!waiters.delete(look)) return;
          reject(new Error(`python ${args[0]} exited (${code}) before ${what}; stderr:\n${stderr}`));
        });
        look();
      });
    },
    async [Symbol.asyncDispose]() {
      child.kill("SIGKILL");
      await exited;
    },
  };
}

const execFileAsync = promisify(execFile);

/** Runs a Python program given as lines, in clients/python (so `leasehold` imports); its stdout. */
async function pythonSnippet(lines: string[], ...args: string[]): Promise<string> {
  const { stdout } = await execFileAsync(PYTHON, ["-c", lines.join("\n"), ...args], { cwd: CLIENT_DIR });
  return stdout;
}

/** The example agent: `example_agent.py <address> <cluster> <worker-id> <capacity>`. */
const exampleAgent = (address: string, cluster: string, workerId: string, capacity: number) =>
  runPython(["example_agent.py", address, cluster, workerId, String(capacity)]);

const welcomed = (lines: Line[]) => lines.some((l) => l.event === "welcome");
/** Whether the agent printed that the server accepted a success of action `id` (at `epoch`, if given). */
const succeeded = (lines: Line[], id: string, epoch?: number) =>
  lines.some(
    (l) =>
      l.event === "completed" &&
      l.action_id === id &&
      l.outcome === "succeeded" &&
      l.accepted === true &&
      (epoch === undefined || l.epoch === epoch),
  );

const missing = pythonMissing();
const onCi = Boolean(process.env.CI);
const onPglite = inject("driver") === "pglite";
if (missing !== undefined && !onCi && onPglite) {
  console.warn(`skipping the Python client interop tests: ${missing}; to run them: ${INSTALL}`);
}

describe.runIf(onPglite)("the Python client (clients/python)", () => {
  it.runIf(missing !== undefined && onCi)("has /usr/bin/python3 with grpc on CI", () => {
    throw new Error(`${missing}: CI must install them: ${INSTALL}`);
  });

  describe.skipIf(missing !== undefined)("against a real server", () => {
    // Each module in a process of its own, four at a time: they spend nearly all of their time
    // waiting (scripted gRPC servers, heartbeat intervals, an agent's bounded goodbye wait, hung
    // servers left by their health checks), about 45 s one after another. Four at a time leaves
    // the two cores to the files running beside this one.
    it("passes its own unit tests", { timeout: 120_000 }, async () => {
      const modules = readdirSync(`${CLIENT_DIR}tests`).filter((name) => /^test_.*\.py$/.test(name));
      expect(modules.length).toBeGreaterThan(10);
      const failures: string[] = [];
      const queue = [...modules];
      const runNext = async (): Promise<void> => {
        for (let module = queue.shift(); module !== undefined; module = queue.shift()) {
          const run = await execFileAsync(
            PYTHON,
            ["-m", "unittest", "discover", "-s", "tests", "-p", module],
            {
              cwd: CLIENT_DIR,
            },
          ).catch((error: { stderr?: string }) => ({ stderr: `${error.stderr ?? error}`, failed: true }));
          if ("failed" in run || !/\nOK\n$/.test(run.stderr)) failures.push(`${module}:\n${run.stderr}`);
        }
      };
      await Promise.all([runNext(), runNext(), runNext(), runNext()]);
      expect(failures, failures.join("\n")).toEqual([]);
    });

    it("runs 100 actions on the example agent and reports each output, integers as integers", async () => {
      await using t = await startTestServer({ config: FAST });
      await using agent = exampleAgent(t.address, "py-batch", "py-batch-1", 8);
      await agent.until("its welcome", welcomed);
      const api = t.client(ActionService);
      const { results } = await api.submitActions({
        actions: Array.from({ length: 100 }, (_, n) => ({
          cluster: "py-batch",
          payload: { n, sleep_ms: (n % 4) * 5 },
        })),
      });
      const ids = results.map((r) => r.action?.id ?? "");
      await agent.until("100 accepted completions", (lines) => ids.every((id) => succeeded(lines, id)));

      const { actions } = await api.listActions({ cluster: "py-batch", pageSize: 1000 });
      expect(actions).toHaveLength(100);
      for (const action of actions) {
        const n = ids.indexOf(action.id);
        expect(action).toMatchObject({ state: ActionState.SUCCEEDED, output: { doubled: 2 * n } });
      }

      // The Python ActionClient submits one more and waits for it; Struct numbers come back as ints.
      const stdout = await pythonSnippet(
        [
          "import json, sys",
          "from leasehold import ActionClient, struct_to_python",
          "with ActionClient(sys.argv[1]) as client:",
          "    done = client.wait(client.submit('py-batch', {'n': 21}).id)",
          "print(json.dumps(struct_to_python(done.output)))",
        ],
        t.address,
      );
      expect(stdout).toBe('{"doubled": 42}\n');
    }, 120_000);

    it("decodes INVALID_ARGUMENT with its BadRequest field from a submit to an invalid cluster", async () => {
      await using t = await startTestServer({ config: FAST });
      const stdout = await pythonSnippet(
        [
          "import json, sys",
          "from leasehold import ActionClient, LeaseholdError",
          "with ActionClient(sys.argv[1]) as client:",
          "    try:",
          "        client.submit('not a cluster!', {'n': 1})",
          "    except LeaseholdError as error:",
          "        fields = [v.field for v in error.field_violations]",
          "        print(json.dumps({'code': error.code.name, 'reason': error.reason, 'fields': fields}))",
          "    else:",
          "        print('null')",
        ],
        t.address,
      );
      expect(JSON.parse(stdout)).toEqual({
        code: "INVALID_ARGUMENT",
        reason: "INVALID_ARGUMENT",
        fields: ["cluster"],
      });
    }, 60_000);

    it("re-grants a killed agent's actions to another agent with epoch 2 after the grace period", async () => {
      await using t = await startTestServer({ config: FAST });
      await using doomed = exampleAgent(t.address, "py-failover", "py-doomed", 4);
      await doomed.until("its welcome", welcomed);
      const api = t.client(ActionService);
      // An hour on the first worker; at once when retried.
      const { results } = await api.submitActions({
        actions: [1, 2, 3].map((n) => ({
          cluster: "py-failover",
          payload: { n, sleep_ms: 3_600_000, retry_sleep_ms: 0 },
        })),
      });
      const ids = results.map((r) => r.action?.id ?? "");
      await doomed.until("the three grants", (lines) =>
        ids.every((id) => lines.some((l) => l.event === "grant" && l.action_id === id && l.epoch === 1)),
      );
      await using survivor = exampleAgent(t.address, "py-failover", "py-survivor", 4);
      await survivor.until("its welcome", welcomed);

      doomed.child.kill("SIGKILL");
      await doomed.exited;
      await survivor.until("the three completions at epoch 2", (lines) =>
        ids.every((id) => succeeded(lines, id, 2)),
      );

      for (const [i, id] of ids.entries()) {
        const got = await api.getAction({ actionId: id });
        expect(got.action).toMatchObject({
          state: ActionState.SUCCEEDED,
          epoch: 2n,
          attemptCount: 2,
          output: { doubled: 2 * (i + 1) },
        });
        expect(got.attempts.map((a) => [a.workerId, a.epoch, a.outcome])).toEqual([
          ["py-doomed", 1n, AttemptOutcome.LEASE_EXPIRED],
          ["py-survivor", 2n, AttemptOutcome.SUCCEEDED],
        ]);
      }
      const regrants = survivor.lines.filter((l) => l.event === "grant");
      expect(regrants.map((l) => [l.epoch, l.attempt])).toEqual([
        [2, 2],
        [2, 2],
        [2, 2],
      ]);
    }, 120_000);

    it("self-fences a running handler while its server is frozen and never reports that attempt done", async () => {
      await using store = await freshStore();
      const address = `127.0.0.1:${await freePort()}`;
      const server = runLeasehold(
        [
          "serve",
          "--listen",
          address,
          "--metrics-listen",
          "off",
          "--data-dir",
          store.dataDir,
          "--grace-period",
          "3s",
          "--heartbeat-interval",
          "500ms",
        ],
        store.url,
      );
      const api = createClient(ActionService, address);
      try {
        await server.waitForLog((l) => l.msg === "leasehold serving");
        await using agent = exampleAgent(address, "py-fence", "py-fenced", 1);
        await agent.until("its welcome", welcomed);
        const { action } = await api.submitAction({
          cluster: "py-fence",
          payload: { n: 5, sleep_ms: 3_600_000, retry_sleep_ms: 0 },
        });
        const id = action?.id ?? "";
        await agent.until("the grant", (lines) =>
          lines.some((l) => l.event === "grant" && l.action_id === id && l.epoch === 1),
        );

        server.child.kill("SIGSTOP");
        await agent.until("the self-fence", (lines) =>
          lines.some((l) => l.event === "self_fenced" && (l.action_ids as string[]).includes(id)),
        );
        server.child.kill("SIGCONT");
        await agent.until("a later attempt's completion", (lines) => succeeded(lines, id));

        const reports = agent.lines.filter((l) => l.event === "completed" && l.action_id === id);
        expect(reports.filter((l) => l.epoch === 1).map((l) => l.outcome)).not.toContain("succeeded");
        const got = await api.getAction({ actionId: id });
        expect(got.action).toMatchObject({ state: ActionState.SUCCEEDED, output: { doubled: 10 } });
        expect(got.attempts[0]?.outcome).toBeOneOf([AttemptOutcome.RELEASED, AttemptOutcome.LEASE_EXPIRED]);
        expect(got.attempts.at(-1)?.outcome).toBe(AttemptOutcome.SUCCEEDED);
      } finally {
        api.close();
        server.child.kill("SIGCONT");
        server.child.kill("SIGKILL");
        await server.exited;
      }
    }, 120_000);
  });
});
