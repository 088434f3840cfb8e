import { chmod, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type ActionContext, ActionFailure } from "../../src/agent/agent.js";
import { commandHandler } from "../../src/agent/command-handler.js";
import {
  type CommandPolicy,
  type CommandRequest,
  commandPolicy,
  GUARDED_ENV,
  hasDotDotSegment,
  isCommandAllowed,
  isEnvNameAllowed,
  requireAllowedCommand,
  resolveProgram,
} from "../../src/agent/command-policy.js";
import type { JsonObject } from "../../src/work/action.js";

/** An executable shell script at `path` printing `text`. */
async function script(path: string, text: string): Promise<void> {
  await writeFile(path, `#!/bin/sh\necho ${text}\n`);
  await chmod(path, 0o755);
}

/** The refusal `fn` throws: a non-retryable ActionFailure; its message. */
function refusal(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ActionFailure);
    expect((error as ActionFailure).retryable).toBe(false);
    return (error as ActionFailure).message;
  }
  throw new Error("expected a refusal, but it was allowed");
}

/** A context for one handler call that nothing aborts. */
function context(payload: JsonObject): ActionContext {
  return {
    actionId: "a1",
    epoch: 1,
    attempt: 1,
    payload,
    runId: "r1",
    checkpoint: undefined,
    signal: new AbortController().signal,
    stopRequested: new AbortController().signal,
    progress: () => {},
  };
}

describe("the reference agent's command policy", () => {
  let bin: string; // the agent's PATH in these tests: one directory with `hello` in it
  let evil: string; // a directory a payload would like its PATH to be
  let path: string;

  beforeAll(async () => {
    const root = await mkdtemp(join(tmpdir(), "leasehold-policy-"));
    bin = join(root, "bin");
    evil = join(root, "evil");
    await mkdir(bin);
    await mkdir(evil);
    await script(join(bin, "hello"), "agent-hello");
    await script(join(evil, "hello"), "payload-hello");
    await writeFile(join(bin, "not-executable"), "");
    path = `relative/dir::${bin}`;
  });
  afterAll(async () => {
    if (bin) await rm(join(bin, ".."), { recursive: true, force: true });
  });

  const list = (policy: Partial<CommandPolicy>): CommandPolicy => ({
    commands: ["*"],
    env: [],
    cwd: [],
    ...policy,
  });

  describe("environment variables under an allow-list", () => {
    const cases: {
      name: string;
      env: Record<string, string>;
      allowEnv: string[];
      refused?: RegExp;
    }[] = [
      {
        name: "none are allowed by default",
        env: { APP_MODE: "x" },
        allowEnv: [],
        refused:
          /environment variable "APP_MODE" is not allowed on this agent \(allowed: none; see --allow-env, or the SDK's CommandPolicy\.env\)/,
      },
      {
        name: "a glob allows the names it matches",
        env: { APP_MODE: "x", APP_LEVEL: "2" },
        allowEnv: ["APP_*"],
      },
      {
        name: "a glob refuses the names it does not match",
        env: { APP_MODE: "x", OTHER: "y" },
        allowEnv: ["APP_*"],
        refused:
          /"OTHER" is not allowed on this agent \(allowed: "APP_\*"; see --allow-env, or the SDK's CommandPolicy\.env\)/,
      },
      {
        name: "'*' does not let LD_PRELOAD through",
        env: { LD_PRELOAD: "/tmp/evil.so" },
        allowEnv: ["*"],
        refused:
          /environment variable "LD_PRELOAD" is not allowed on this agent: it can change what code runs, so only its exact name in --allow-env \(the SDK's CommandPolicy\.env\) allows it/,
      },
      {
        name: "a prefix glob does not let LD_LIBRARY_PATH through",
        env: { LD_LIBRARY_PATH: "." },
        allowEnv: ["LD_*"],
        refused: /"LD_LIBRARY_PATH" .*exact name/,
      },
      {
        name: "'*' does not let BASH_ENV through",
        env: { BASH_ENV: "$(id)" },
        allowEnv: ["*"],
        refused: /"BASH_ENV"/,
      },
      { name: "'*' does not let PATH through", env: { PATH: "/tmp" }, allowEnv: ["*"], refused: /"PATH"/ },
      {
        name: "'*' does not let an exported bash function through",
        env: { "BASH_FUNC_echo%%": "() { id; }" },
        allowEnv: ["*"],
        refused: /"BASH_FUNC_echo%%"/,
      },
      {
        name: "'P*' does not let PYTHONPATH through",
        env: { PYTHONPATH: "." },
        allowEnv: ["P*"],
        refused: /PYTHONPATH/,
      },
      {
        name: "'*' does not let GIT_SSH_COMMAND through",
        env: { GIT_SSH_COMMAND: "id" },
        allowEnv: ["*"],
        refused: /GIT_/,
      },
      {
        name: "'*' does not let NODE_OPTIONS through",
        env: { NODE_OPTIONS: "-r x" },
        allowEnv: ["*"],
        refused: /NODE/,
      },
      {
        name: "LD_PRELOAD named exactly is allowed",
        env: { LD_PRELOAD: "/opt/lib/ok.so" },
        allowEnv: ["LD_PRELOAD"],
      },
      { name: "PATH named exactly is allowed", env: { PATH: "/usr/bin" }, allowEnv: ["PATH", "APP_*"] },
      {
        name: "naming one guarded variable exactly allows no other",
        env: { LD_PRELOAD: "a.so", LD_AUDIT: "b.so" },
        allowEnv: ["LD_PRELOAD", "*"],
        refused: /"LD_AUDIT"/,
      },
      { name: "'*' allows ordinary names", env: { TZ: "UTC", LANG: "C" }, allowEnv: ["*"] },
      {
        name: "a name with '=' is refused (it would set another variable)",
        env: { "LD_PRELOAD=/tmp/evil.so": "" },
        allowEnv: ["*"],
        refused: /environment variable name "LD_PRELOAD=\/tmp\/evil.so" is not valid/,
      },
      {
        name: "names are case-sensitive",
        env: { app_mode: "x" },
        allowEnv: ["APP_*"],
        refused: /"app_mode"/,
      },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const request: CommandRequest = { argv: ["/bin/echo", "hi"], env: c.env };
        const policy = list({ commands: ["/bin/echo *"], env: c.allowEnv });
        if (c.refused) expect(refusal(() => requireAllowedCommand(request, policy, path))).toMatch(c.refused);
        else expect(requireAllowedCommand(request, policy, path).program).toBe("/bin/echo");
      });
    }

    it("every guarded pattern needs the exact name, and --allow-any-command allows them all", () => {
      for (const guarded of GUARDED_ENV) {
        const name = guarded.replace("*", "X");
        expect(isEnvNameAllowed(name, ["*"])).toBe(false);
        expect(isEnvNameAllowed(name, [name])).toBe(true);
        const request = { argv: ["/bin/echo"], env: { [name]: "x" }, cwd: "/anywhere/../else" };
        expect(requireAllowedCommand(request, "any", path).program).toBe("/bin/echo");
      }
    });

    it("a bare command list (the SDK's older shape) allows no variables and no cwd", () => {
      expect(commandPolicy(["/bin/echo *"])).toEqual({ commands: ["/bin/echo *"], env: [], cwd: [] });
      expect(commandPolicy(undefined).commands).toBe("any");
      expect(
        refusal(() =>
          requireAllowedCommand({ argv: ["/bin/echo", "x"], env: { TZ: "UTC" } }, ["/bin/echo *"]),
        ),
      ).toMatch(/"TZ" is not allowed/);
    });
  });

  describe("working directories under an allow-list", () => {
    const cases: { name: string; cwd: string; allowCwd: string[]; refused?: RegExp }[] = [
      {
        name: "none are allowed by default",
        cwd: "/tmp",
        allowCwd: [],
        refused:
          /working directory "\/tmp" is not allowed on this agent \(allowed: none; see --allow-cwd, or the SDK's CommandPolicy\.cwd\)/,
      },
      { name: "a matching glob allows it", cwd: "/srv/builds/42", allowCwd: ["/srv/builds/*"] },
      {
        name: "a glob matches as written",
        cwd: "builds/42",
        allowCwd: ["/srv/builds/*"],
        refused: /"builds\/42"/,
      },
      { name: "an empty cwd is a cwd too", cwd: "", allowCwd: ["/srv/*"], refused: /working directory ""/ },
      {
        name: "a '..' segment is refused though '*' covers it",
        cwd: "/srv/builds/../../etc",
        allowCwd: ["/srv/builds/*"],
        refused:
          /working directory "\/srv\/builds\/..\/..\/etc" is not allowed on this agent: it has a "\.\." segment/,
      },
    ];
    for (const c of cases) {
      it(c.name, () => {
        const request = { argv: ["/bin/echo"], cwd: c.cwd };
        const policy = list({ cwd: c.allowCwd });
        if (c.refused) expect(refusal(() => requireAllowedCommand(request, policy, path))).toMatch(c.refused);
        else expect(requireAllowedCommand(request, policy, path).program).toBe("/bin/echo");
      });
    }
  });

  describe("'..' segments in argv under an allow-list", () => {
    const cases: { argv: string[]; allowed: boolean }[] = [
      { argv: ["python3", "/opt/jobs/report.py", "--day", "1"], allowed: true },
      { argv: ["python3", "/opt/jobs/../../tmp/x.py"], allowed: false },
      { argv: ["python3", "/opt/jobs/sub/.."], allowed: false },
      { argv: ["python3", "/opt/jobs/x.py", "../secret"], allowed: false },
      { argv: ["python3", "/opt/jobs/x.py", ".."], allowed: false },
      { argv: ["python3", "/opt/jobs/x.py", "--out=../x"], allowed: false },
      { argv: ["python3", "/opt/jobs/x.py", "a..b", "..."], allowed: true }, // not segments
      { argv: ["python3", "/opt/jobs/...py"], allowed: true },
      { argv: ["python3", "/opt/other/x.py"], allowed: false },
      { argv: ["python3 /opt/jobs/x.py"], allowed: false }, // one relative program path, not python3 and a script
    ];
    for (const c of cases) {
      it(`${c.allowed ? "allows" : "refuses"} ${JSON.stringify(c.argv)} under 'python3 /opt/jobs/*'`, () => {
        expect(isCommandAllowed(c.argv, ["python3 /opt/jobs/*"])).toBe(c.allowed);
        expect(isCommandAllowed(c.argv, "any")).toBe(true);
      });
    }

    it("says which argument has the segment", () => {
      const message = refusal(() =>
        requireAllowedCommand(
          { argv: ["python3", "/opt/jobs/../../tmp/x.py"] },
          ["python3 /opt/jobs/*"],
          path,
        ),
      );
      expect(message).toBe(
        'command "python3 /opt/jobs/../../tmp/x.py" is not allowed on this agent: its argument "/opt/jobs/../../tmp/x.py" ' +
          'has a ".." segment, which no allow-list allows; name the path without ".."',
      );
    });

    it("finds segments, not dots", () => {
      for (const v of ["..", "../x", "a/../b", "a/..", "--dir=..", "--dir=../x"])
        expect(hasDotDotSegment(v)).toBe(true);
      for (const v of ["a..b", "...", ".../x", "x/...", ".hidden", "v1..v2", "a.."])
        expect(hasDotDotSegment(v)).toBe(false);
    });
  });

  describe("argv[0] under an allow-list", () => {
    it("a bare name is matched as written and runs as the agent's PATH resolves it", () => {
      const allowed = requireAllowedCommand({ argv: ["hello", "x"] }, list({ commands: ["hello *"] }), path);
      expect(allowed).toEqual({ program: join(bin, "hello"), args: ["x"], argv0: "hello" });
    });

    it("the glob sees the name as written, not the resolved path", () => {
      const byPath = list({ commands: [`${join(bin, "hello")} *`] });
      expect(refusal(() => requireAllowedCommand({ argv: ["hello", "x"] }, byPath, path))).toMatch(
        /command "hello x" is not allowed on this agent/,
      );
      // A path is matched and run as written: nothing to resolve.
      const absolute = requireAllowedCommand({ argv: [join(bin, "hello"), "x"] }, byPath, path);
      expect(absolute.program).toBe(join(bin, "hello"));
    });

    it("a name not on the agent's PATH fails, though the payload's PATH has it", () => {
      const policy = list({ commands: ["nowhere *"], env: ["PATH"] });
      const message = refusal(() =>
        requireAllowedCommand({ argv: ["nowhere", "x"], env: { PATH: evil } }, policy, path),
      );
      expect(message).toBe(
        `command "nowhere" is not on this agent's PATH (${JSON.stringify(path)}): install it there, or name it by its path`,
      );
    });

    it("skips files that are not executable, and relative or empty PATH entries", () => {
      expect(resolveProgram("hello", path)).toBe(join(bin, "hello"));
      expect(resolveProgram("not-executable", path)).toBeUndefined();
      expect(resolveProgram("hello", `.:${evil.slice(1)}`)).toBeUndefined();
      expect(resolveProgram("sub/hello", bin)).toBeUndefined();
    });

    it("under --allow-any-command nothing is resolved: argv[0] is spawned as written", () => {
      expect(requireAllowedCommand({ argv: ["nowhere"] }, "any", path)).toEqual({
        program: "nowhere",
        args: [],
        argv0: "nowhere",
      });
    });
  });

  describe("commandHandler", () => {
    it("refuses LD_PRELOAD under '*' before running anything", async () => {
      const policy = list({ commands: ["/bin/echo *"], env: ["*"] });
      const run = commandHandler(
        context({ argv: ["/bin/echo", "hi"], env: { LD_PRELOAD: "/tmp/evil.so" } }),
        {
          allow: policy,
        },
      );
      await expect(run).rejects.toMatchObject({
        retryable: false,
        message: expect.stringMatching(/"LD_PRELOAD" is not allowed on this agent/),
      });
    });

    it("runs the agent's program for a bare name even when the payload may set PATH", async () => {
      const agentPath = process.env.PATH;
      process.env.PATH = `${bin}:${agentPath}`;
      try {
        const policy = list({ commands: ["hello"], env: ["PATH"] });
        const result = await commandHandler(
          context({ argv: ["hello"], env: { PATH: `${evil}:/usr/bin:/bin` } }),
          {
            allow: policy,
          },
        );
        expect(result).toMatchObject({ exitCode: 0, stdoutTail: "agent-hello\n" });
        // Without a policy it behaves as before: the child's PATH picks the program.
        const any = await commandHandler(
          context({ argv: ["hello"], env: { PATH: `${evil}:/usr/bin:/bin` } }),
        );
        expect(any).toMatchObject({ exitCode: 0, stdoutTail: "payload-hello\n" });
      } finally {
        process.env.PATH = agentPath;
      }
    });

    it("passes an allowed variable and an allowed cwd to the command", async () => {
      const policy = list({ commands: ["/bin/sh -c *"], env: ["APP_*"], cwd: [`${bin}*`] });
      const result = await commandHandler(
        context({ argv: ["/bin/sh", "-c", 'echo "$APP_MODE $(pwd)"'], env: { APP_MODE: "fast" }, cwd: bin }),
        { allow: policy },
      );
      expect(result).toMatchObject({ exitCode: 0, stdoutTail: `fast ${bin}\n` });
    });
  });
});
