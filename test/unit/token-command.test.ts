import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Command, CommanderError } from "commander";
import pino from "pino";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import { hashToken, loadStaticTokens } from "../../src/auth/static-tokens.js";
import { CliError, EXIT } from "../../src/cli/output.js";
import { tokenCommand } from "../../src/cli/token-command.js";

const dir = mkdtempSync(join(tmpdir(), "leasehold-token-cmd-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => vi.restoreAllMocks());
let n = 0;
const fileName = () => join(dir, `tokens-${++n}.yaml`);

/** Runs `leasehold <args>` in-process with the global flags main.ts defines; returns what it wrote. */
async function run(args: string[]) {
  const program = new Command("leasehold")
    .option("--server <host:port>", "", "127.0.0.1:50051")
    .option("--json");
  program.addCommand(tokenCommand());
  const errors: string[] = [];
  const override = (command: Command) => {
    command.exitOverride().configureOutput({ writeErr: (s) => errors.push(s), writeOut: () => {} });
    for (const sub of command.commands) override(sub);
  };
  override(program);
  const stdout: string[] = [];
  const stderr: string[] = [];
  vi.spyOn(process.stdout, "write").mockImplementation((chunk) => {
    stdout.push(String(chunk));
    return true;
  });
  vi.spyOn(process.stderr, "write").mockImplementation((chunk) => {
    stderr.push(String(chunk));
    return true;
  });
  let error: unknown;
  try {
    await program.parseAsync(args, { from: "user" });
  } catch (e) {
    error = e;
  } finally {
    vi.restoreAllMocks();
  }
  return { stdout: stdout.join(""), stderr: stderr.join(""), commanderOutput: errors.join(""), error };
}

describe("leasehold token create", () => {
  it("append the hash of a new token and print the token once", async () => {
    const path = fileName();
    const out = await run([
      "token",
      "create",
      "--principal",
      "ci-bot",
      "--tokens-file",
      path,
      "--role",
      "submitter",
      "--role",
      "reader",
      "--cluster",
      "cluster-a",
      "--cluster",
      "eu-*",
    ]);
    expect(out.error).toBeUndefined();
    const token = out.stdout.trim();
    expect(token).toMatch(/^lh_[A-Za-z0-9_-]{43}$/);
    expect(out.stderr).toMatch(/shown only this once/);
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(readFileSync(path, "utf8")).toContain(hashToken(token));

    const tokens = loadStaticTokens(path, pino({ level: "silent" }), { pollMs: 0 });
    expect(tokens.verify(token)).toEqual({
      principal: "ci-bot",
      via: "static-token",
      bindings: [
        { role: "submitter", clusters: ["cluster-a", "eu-*"], workerIds: "*" },
        { role: "reader", clusters: ["cluster-a", "eu-*"], workerIds: "*" },
      ],
    });
    tokens.close();
  });

  it("print JSON with --json, and give an agent role its worker ids", async () => {
    const path = fileName();
    const out = await run([
      "--json",
      "token",
      "create",
      "--principal",
      "agent-a1",
      "--tokens-file",
      path,
      "--role",
      "agent",
      "--cluster",
      "*",
      "--worker-ids",
      "a1-*",
    ]);
    expect(out.error).toBeUndefined();
    const printed = JSON.parse(out.stdout) as { principal: string; token: string };
    expect(printed.principal).toBe("agent-a1");
    const tokens = loadStaticTokens(path, pino({ level: "silent" }), { pollMs: 0 });
    expect(tokens.verify(printed.token)?.bindings).toEqual([
      { role: "agent", clusters: ["*"], workerIds: "a1-*" },
    ]);
    tokens.close();
  });

  it("refuse a bad role as a usage error, writing nothing", async () => {
    const path = fileName();
    const out = await run(["token", "create", "--principal", "x", "--tokens-file", path, "--role", "admin"]);
    // main.ts turns every CommanderError into exit code 2.
    expect(out.error).toBeInstanceOf(CommanderError);
    expect((out.error as CommanderError).code).toBe("commander.invalidArgument");
    expect(out.commanderOutput).toMatch(
      /'admin' is invalid\. must be one of agent, reader, submitter, operator/,
    );
    expect(() => statSync(path)).toThrow();
  });

  it("refuse flags that make no sense together with exit code 2", async () => {
    const path = fileName();
    const noRole = await run([
      "token",
      "create",
      "--principal",
      "x",
      "--tokens-file",
      path,
      "--cluster",
      "a",
    ]);
    expect(noRole.error).toBeInstanceOf(CliError);
    expect((noRole.error as CliError).exitCode).toBe(EXIT.usage);
    expect((noRole.error as Error).message).toMatch(/apply to the roles given with --role/);
    const workerIds = await run([
      "token",
      "create",
      "--principal",
      "x",
      "--tokens-file",
      path,
      "--role",
      "reader",
      "--worker-ids",
      "w-*",
    ]);
    expect((workerIds.error as CliError).exitCode).toBe(EXIT.usage);
    expect((workerIds.error as Error).message).toMatch(/--worker-ids needs a role that runs workers/);
    // No cluster is never taken as every cluster: a forgotten --cluster would grant them all.
    const noCluster = await run([
      "token",
      "create",
      "--principal",
      "x",
      "--tokens-file",
      path,
      "--role",
      "operator",
    ]);
    expect((noCluster.error as CliError).exitCode).toBe(EXIT.usage);
    expect((noCluster.error as Error).message).toBe(
      "--role needs --cluster: name the clusters its roles apply in, or --cluster '*' for every cluster",
    );
    expect(() => statSync(path)).toThrow();
  });

  it("refuse the reserved principal anonymous, and names with surrounding spaces or control characters", async () => {
    for (const [principal, problem] of [
      ["anonymous", '--principal "anonymous" is reserved: it is the caller when authentication is off'],
      [" op", '--principal " op" has leading or trailing whitespace'],
      ["o\np", '--principal "o\\np" holds a control character'],
    ] as const) {
      const path = fileName();
      const out = await run(["token", "create", "--principal", principal, "--tokens-file", path]);
      expect((out.error as CliError).exitCode).toBe(EXIT.usage);
      expect((out.error as Error).message).toContain(problem);
      expect(out.stdout).toBe("");
      expect(existsSync(path)).toBe(false);
    }
  });

  it("refuse an empty --tokens-file, or one in a directory that does not exist, with exit code 2", async () => {
    const empty = await run(["token", "create", "--principal", "x", "--tokens-file", ""]);
    expect(empty.error).toBeInstanceOf(CliError);
    expect((empty.error as CliError).exitCode).toBe(EXIT.usage);
    expect((empty.error as Error).message).toBe("--tokens-file must not be empty");
    const path = join(dir, "no-such-directory", "tokens.yaml");
    const missing = await run(["token", "create", "--principal", "x", "--tokens-file", path]);
    expect((missing.error as CliError).exitCode).toBe(EXIT.usage);
    expect((missing.error as Error).message).toMatch(
      /^--tokens-file: cannot write .*no-such-directory.*: ENOENT/,
    );
    expect(missing.stdout).toBe("");
  });

  it("refuse to append to a broken tokens file, naming the field", async () => {
    const path = fileName();
    writeFileSync(path, "tokens:\n  - principal: a\n    sha256: nope\n");
    const out = await run(["token", "create", "--principal", "x", "--tokens-file", path]);
    expect((out.error as CliError).exitCode).toBe(EXIT.usage);
    expect((out.error as Error).message).toMatch(
      /^--tokens-file: .*tokens\[0\]\.sha256: must be the SHA-256/,
    );
    expect(readFileSync(path, "utf8")).toBe("tokens:\n  - principal: a\n    sha256: nope\n");
  });
});
