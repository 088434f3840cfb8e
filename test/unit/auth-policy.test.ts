import { describe, expect, it } from "vitest";
import { accessOf, matchesGlob, OPEN_ACCESS, RIGHTS, ROLE_RIGHTS } from "../../src/auth/access.js";
import { parsePolicy } from "../../src/auth/policy.js";
import { Code, LeaseholdError } from "../../src/errors.js";

const POLICY = `
bindings:
  - principals: ["spiffe://example.org/agent/*"]
    role: agent
    clusters: ["gpu-*"]
    worker_ids: "gpu-*"
  - principals: [ci-bot]
    role: submitter
    clusters: [staging]
  - principals: [auditor]
    role: reader
    clusters: ["*"]
  - principals: [alice, "ops-*"]
    role: operator
    clusters: ["*"]
`;

function denied(fn: () => void): LeaseholdError {
  try {
    fn();
  } catch (error) {
    if (error instanceof LeaseholdError && error.code === Code.PermissionDenied) return error;
    throw error;
  }
  throw new Error("expected PERMISSION_DENIED");
}

describe("auth policy", () => {
  const policy = parsePolicy(POLICY);
  const access = (principal: string) => accessOf(principal, policy.bindingsOf(principal));

  it("globs match whole principals, * across slashes", () => {
    expect(matchesGlob("spiffe://example.org/agent/*", "spiffe://example.org/agent/a/b")).toBe(true);
    expect(matchesGlob("ops-?", "ops-1")).toBe(true);
    expect(matchesGlob("ops-?", "ops-12")).toBe(false);
    expect(matchesGlob("a.b", "axb")).toBe(false);
  });

  it("a principal no binding names may do nothing", () => {
    const nobody = access("mallory");
    for (const right of RIGHTS) expect(nobody.holdsAnywhere(right)).toBe(false);
    expect(denied(() => nobody.require("action.read", "staging")).reason).toBe("PERMISSION_DENIED");
  });

  it("an agent runs workers only in its clusters with matching ids", () => {
    const agent = access("spiffe://example.org/agent/a1");
    expect(agent.mayRunWorker("gpu-east", "gpu-7")).toBe(true);
    expect(agent.mayRunWorker("gpu-east", "cpu-7")).toBe(false);
    expect(agent.mayRunWorker("cpu", "gpu-7")).toBe(false);
    expect(agent.holdsAnywhere("action.submit")).toBe(false);
  });

  it("a submitter cancels its own actions only; an operator cancels anyone's", () => {
    const bot = access("ci-bot");
    bot.requireOwned("action.cancel", "staging", "ci-bot");
    const error = denied(() => bot.requireOwned("action.cancel", "staging", "alice"));
    expect(error.message).toContain("action.cancel.any");
    expect(error.metadata).toMatchObject({ principal: "ci-bot", right: "action.cancel.any", owner: "alice" });
    denied(() => bot.requireOwned("action.cancel", "prod", "ci-bot"));
    access("ops-eu").requireOwned("action.cancel", "prod", "ci-bot");
  });

  it("a scoped caller must name a cluster it may list; an unscoped one need not", () => {
    const bot = access("ci-bot");
    expect(denied(() => bot.requireListScope("action.read", "")).message).toContain("filter");
    bot.requireListScope("action.read", "staging");
    denied(() => bot.requireListScope("action.read", "prod"));
    access("auditor").requireListScope("event.read", "");
  });

  it("roles nest: reader within submitter within operator", () => {
    for (const right of ROLE_RIGHTS.reader) expect(ROLE_RIGHTS.submitter).toContain(right);
    for (const right of ROLE_RIGHTS.submitter) expect(ROLE_RIGHTS.operator).toContain(right);
    expect(OPEN_ACCESS.can("lease.delete", "x")).toBe(true);
  });

  it("a bad policy names every field to fix", () => {
    const bad = `
bindings:
  - principals: []
    role: admin
    colour: blue
  - principals: [x]
    role: reader
    worker_ids: "a-*"
`;
    expect(() => parsePolicy(bad)).toThrow(
      /bindings\[0\]\.colour: unknown field.*bindings\[0\]\.principals.*bindings\[0\]\.role: must be one of agent, reader, submitter, operator \(got "admin"\).*bindings\[1\]\.worker_ids/s,
    );
    expect(() => parsePolicy("rules: []")).toThrow(/rules: unknown field/);
  });

  it("a binding without clusters is refused, saying what to write", () => {
    // What a file cut short after op-a's role line reads like: it must not make op-a an operator everywhere.
    const cut = `
bindings:
  - principals: [op-a]
    role: operator
`;
    expect(() => parsePolicy(cut, "policy.yaml")).toThrow(
      'policy.yaml: bindings[0].clusters: missing; write clusters: ["*"] for every cluster, or the clusters it applies to, e.g. clusters: [staging, "eu-*"]',
    );
    expect(
      parsePolicy('bindings:\n  - principals: [op-a]\n    role: operator\n    clusters: ["*"]\n').bindingsOf(
        "op-a",
      ),
    ).toMatchObject([{ role: "operator", clusters: ["*"] }]);
    expect(() => parsePolicy("bindings: [")).toThrow(/not valid YAML/);
  });
});
