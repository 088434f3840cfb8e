import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import {
  addStaticToken,
  generateToken,
  hashToken,
  loadStaticTokens,
  type StaticTokens,
} from "../../src/auth/static-tokens.js";
import { Code, LeaseholdError } from "../../src/errors.js";

const dir = mkdtempSync(join(tmpdir(), "leasehold-tokens-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const fileName = () => join(dir, `tokens-${++n}.yaml`);

const open: StaticTokens[] = [];
afterEach(() => {
  for (const t of open.splice(0)) t.close();
});
function load(path: string, log = pino({ level: "silent" })) {
  const tokens = loadStaticTokens(path, log, { pollMs: 0 });
  open.push(tokens);
  return tokens;
}

function loadError(yaml: string): LeaseholdError {
  const path = fileName();
  writeFileSync(path, yaml);
  try {
    load(path);
  } catch (error) {
    expect(error).toBeInstanceOf(LeaseholdError);
    expect((error as LeaseholdError).code).toBe(Code.InvalidArgument);
    return error as LeaseholdError;
  }
  throw new Error("the file was accepted");
}

describe("static tokens", () => {
  it("generate 256-bit tokens and hash them as SHA-256 hex", () => {
    const token = generateToken();
    expect(token).toMatch(/^lh_[A-Za-z0-9_-]{43}$/);
    expect(generateToken()).not.toBe(token);
    expect(hashToken("test")).toBe("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
  });

  it("create the file with mode 0600, store only the hash, and verify the token", () => {
    const path = fileName();
    const token = addStaticToken(path, {
      principal: "ci-bot",
      bindings: [{ role: "submitter", clusters: ["cluster-a"], workerIds: "*" }],
    });
    expect(statSync(path).mode & 0o777).toBe(0o600);
    const text = readFileSync(path, "utf8");
    expect(text).not.toContain(token);
    expect(text).toContain(hashToken(token));
    expect(text).toMatch(/^# Leasehold static tokens: only hashes are stored/);

    const tokens = load(path);
    expect(tokens.verify(token)).toEqual({
      principal: "ci-bot",
      via: "static-token",
      bindings: [{ role: "submitter", clusters: ["cluster-a"], workerIds: "*" }],
    });
    expect(tokens.verify(generateToken())).toBeUndefined();
    expect(tokens.verify("")).toBeUndefined();
  });

  it("read a hand-written file with defaults for clusters and worker ids", () => {
    const path = fileName();
    writeFileSync(
      path,
      [
        "tokens:",
        "  - principal: agent-1",
        `    sha256: ${hashToken("secret-1").toUpperCase()}`,
        "    created: 2026-12-02T21:40:00.000Z",
        "    roles:",
        "      - role: agent",
        '        clusters: ["*"]',
        '        worker_ids: "a1-*"',
        "      - role: reader",
        "        clusters: [eu-1]",
        "  - principal: nobody-special",
        `    sha256: ${hashToken("secret-2")}`,
        "",
      ].join("\n"),
    );
    const tokens = load(path);
    expect(tokens.verify("secret-1")).toEqual({
      principal: "agent-1",
      via: "static-token",
      bindings: [
        { role: "agent", clusters: ["*"], workerIds: "a1-*" },
        { role: "reader", clusters: ["eu-1"], workerIds: "*" },
      ],
    });
    expect(tokens.verify("secret-2")).toEqual({
      principal: "nobody-special",
      via: "static-token",
      bindings: [],
    });
  });

  it("refuse bad files with the field path and what is wrong", () => {
    const hash = hashToken("x");
    const entry = (lines: string) => `tokens:\n  - principal: a\n    sha256: ${hash}\n${lines}`;
    expect(loadError(entry("    roles:\n      - role: admin\n")).message).toMatch(
      /^--auth-tokens: .*: tokens\[0\]\.roles\[0\]\.role: must be one of agent, reader, submitter, operator \(got "admin"\)$/,
    );
    expect(
      loadError(
        `tokens:\n  - principal: a\n    sha256: ${hash}\n  - principal: b\n    sha256: ${hashToken("y")}\n  - principal: c\n    sha256: ${hashToken("z")}\n    roles: [{ role: admin }]\n`,
      ).message,
    ).toContain('tokens[2].roles[0].role: must be one of agent, reader, submitter, operator (got "admin")');
    expect(loadError(`tokens:\n  - principal: ""\n    sha256: ${hash}\n`).message).toContain(
      "tokens[0].principal: must be a non-empty string",
    );
    // "anonymous" owns what was made while authentication was off; look-alike names are refused too.
    for (const [principal, problem] of [
      ['"anonymous"', '"anonymous" is reserved: it is the caller when authentication is off'],
      ['" op"', '" op" has leading or trailing whitespace'],
      ['"op\\t"', '"op\\t" has leading or trailing whitespace'],
      ['"o\\u0007p"', '"o\\u0007p" holds a control character'],
    ]) {
      const file = `tokens:\n  - principal: a\n    sha256: ${hashToken("y")}\n  - principal: ${principal}\n    sha256: ${hash}\n`;
      const message = loadError(file).message;
      expect(message).toMatch(/^--auth-tokens: /);
      expect(message).toContain(`: tokens[1].principal: ${problem}`);
    }
    expect(() => addStaticToken(fileName(), { principal: "anonymous", bindings: [] })).toThrow(
      /principal: "anonymous" is reserved/,
    );
    expect(() =>
      addStaticToken(join(dir, "reserved.yaml"), { principal: "anonymous", bindings: [] }),
    ).toThrow(/principal: "anonymous" is reserved/);
    expect(loadError("tokens:\n  - principal: a\n    sha256: abc123\n").message).toContain(
      "tokens[0].sha256: must be the SHA-256 of the token as 64 hex digits",
    );
    expect(loadError(entry("    role: operator\n")).message).toContain("tokens[0].role: unknown field");
    expect(
      loadError(entry('    roles:\n      - role: reader\n        clusters: ["*"]\n        worker_ids: x\n'))
        .message,
    ).toContain("tokens[0].roles[0].worker_ids: applies only to roles that run workers (agent, operator)");
    expect(loadError(entry("    roles:\n      - role: reader\n        clusters: a\n")).message).toContain(
      "tokens[0].roles[0].clusters: must be a non-empty list of cluster globs",
    );
    // No default: a file cut short after a role line must not grant the role everywhere.
    expect(loadError(entry("    roles:\n      - role: operator\n")).message).toContain(
      'tokens[0].roles[0].clusters: missing; write clusters: ["*"] for every cluster, or the clusters it applies to',
    );
    expect(loadError(`${entry("")}  - principal: b\n    sha256: ${hash}\n`).message).toContain(
      "tokens[1].sha256: the same token as tokens[0]",
    );
    expect(loadError("tokens: {}\n").message).toContain("tokens: must be a list of entries");
    expect(loadError("tokens:\n  - principal: [\n").message).toContain("(yaml)");
    const missing = join(dir, "missing.yaml");
    expect(() => load(missing)).toThrow(/^--auth-tokens: cannot read .*missing\.yaml/);
  });

  it("apply a token added while loaded, and keep the old set when the file turns bad", async () => {
    const path = fileName();
    const first = addStaticToken(path, { principal: "first", bindings: [] });
    const logged: { level: number; msg: string }[] = [];
    const tokens = load(
      path,
      pino({ level: "info" }, { write: (line: string) => logged.push(JSON.parse(line)) }),
    );
    expect(await tokens.reload()).toBe("unchanged");
    const second = addStaticToken(path, {
      principal: "second",
      bindings: [{ role: "agent", clusters: ["eu-*", "us-1"], workerIds: "w-*" }],
    });
    expect(tokens.verify(second)).toBeUndefined();
    // The first look finds the change; the next one, finding it as it was, applies it.
    expect(await tokens.reload()).toBe("pending");
    expect(await tokens.reload()).toBe("applied");
    expect(tokens.verify(second)?.bindings).toEqual([
      { role: "agent", clusters: ["eu-*", "us-1"], workerIds: "w-*" },
    ]);
    expect(tokens.verify(first)?.principal).toBe("first");

    const good = readFileSync(path, "utf8");
    writeFileSync(path, `${good}  - principal: third\n    sha256: nope\n`);
    expect(await tokens.reload()).toBe("pending");
    expect(await tokens.reload()).toBe("rejected");
    expect(logged.find((l) => l.level === 40)?.msg).toContain("tokens[2].sha256");
    expect(tokens.verify(second)?.principal).toBe("second");
    // A bad file is not appended to.
    expect(() => addStaticToken(path, { principal: "fourth", bindings: [] })).toThrow(/tokens\[2\]\.sha256/);
  });

  it("pick up a change by polling", async () => {
    const path = fileName();
    addStaticToken(path, { principal: "first", bindings: [] });
    let reloaded: () => void = () => {};
    const sawReload = new Promise<void>((resolve) => {
      reloaded = resolve;
    });
    const log = pino(
      { level: "info" },
      {
        write: (line: string) => (JSON.parse(line).msg === "static tokens reloaded" ? reloaded() : undefined),
      },
    );
    const tokens = loadStaticTokens(path, log, { pollMs: 10 });
    open.push(tokens);
    const second = addStaticToken(path, { principal: "second", bindings: [] });
    await sawReload;
    expect(tokens.verify(second)?.principal).toBe("second");
  });

  it("keep comments and the mode of an existing file when adding", () => {
    const path = fileName();
    writeFileSync(path, `# ours\ntokens:\n  - principal: a # the first\n    sha256: ${hashToken("a")}\n`, {
      mode: 0o640,
    });
    const token = addStaticToken(path, { principal: "b", bindings: [] });
    const text = readFileSync(path, "utf8");
    expect(text).toContain("# ours");
    expect(text).toContain("# the first");
    expect(statSync(path).mode & 0o777).toBe(0o640);
    expect(load(path).verify(token)?.principal).toBe("b");
  });
});
