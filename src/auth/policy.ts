import { readFileSync } from "node:fs";
import type { Logger } from "pino";
import { parse } from "yaml";
import { LeaseholdError } from "../errors.js";
import { matchesGlob, ROLES, type Role, type RoleBinding } from "./access.js";
import { createFileReloader, type ReloadOutcome } from "./file-reloader.js";

/**
 * Who may do what: principals (exact, or globs with `*` and `?`) bound to
 * roles in clusters. Loaded from `--auth-policy`:
 *
 * ```yaml
 * bindings:
 *   - principals: ["spiffe://example.org/agent/*"]
 *     role: agent
 *     clusters: ["gpu-*"]       # required; ["*"] is every cluster
 *     worker_ids: "gpu-*"       # agents only; default "*"
 *   - principals: [ci-bot]
 *     role: submitter
 *     clusters: [staging]
 * ```
 *
 * `clusters` has no default: a file cut short after a binding's `role:` line
 * (read while being written, or truncated) must not grant that role in every
 * cluster, so a binding without it is refused and names what to write.
 *
 * A principal no binding names may do nothing (deny by default); one that
 * several bindings name holds the union of their rights.
 */
export interface Policy {
  /** The bindings that apply to `principal`. */
  bindingsOf(principal: string): readonly RoleBinding[];
  /** How many bindings the policy has (for the start-up log line). */
  readonly size: number;
  /** Grows each time a reloaded file is put in force: what was decided under an older one is stale. */
  readonly version: number;
  /** Calls `listener` after each reloaded file put in force, if the policy reloads. Returns its off. */
  onReload?(listener: () => void): () => void;
}

/** A policy read from `--auth-policy` and read again when the file changes. */
export interface ReloadingPolicy extends Policy {
  /** Reads the file now; a bad change keeps the policy in force. */
  reload(): Promise<ReloadOutcome>;
  close(): void;
}

interface PolicyBinding extends RoleBinding {
  readonly principals: readonly string[];
}

/** A policy with no bindings: with credentials configured, nobody may do anything it does not grant. */
export const EMPTY_POLICY: Policy = { bindingsOf: () => [], size: 0, version: 0 };

/** Parses policy YAML (see {@link Policy}). */
export function parsePolicy(text: string, source = "the policy"): Policy {
  let document: unknown;
  try {
    document = parse(text);
  } catch (error) {
    throw policyError(`${source} is not valid YAML: ${(error as Error).message}`);
  }
  const problems: string[] = [];
  const bindings: PolicyBinding[] = [];
  const root = (document ?? {}) as Record<string, unknown>;
  if (typeof root !== "object" || Array.isArray(root))
    problems.push("the file must be a mapping with a bindings list");
  else {
    for (const key of Object.keys(root))
      if (key !== "bindings") problems.push(`${key}: unknown field (expected bindings)`);
    const list = root.bindings ?? [];
    if (!Array.isArray(list)) problems.push("bindings: must be a list");
    else
      list.forEach((item, i) => {
        const binding = parseBinding(item, `bindings[${i}]`, problems);
        if (binding) bindings.push(binding);
      });
  }
  if (problems.length > 0) throw policyError(`${source}: ${problems.join("; ")}`);
  return {
    size: bindings.length,
    version: 0,
    bindingsOf: (principal) => bindings.filter((b) => b.principals.some((p) => matchesGlob(p, principal))),
  };
}

/**
 * Reads and checks a policy file (INVALID_ARGUMENT naming `--auth-policy`
 * and the field to fix), then polls it and puts a changed, valid policy in
 * force (a broken edit is logged and the old policy stays). Calls
 * authenticated after the change are judged by the new policy, and open
 * streams are checked against it (rpc/stream-registry.ts).
 */
export function loadReloadingPolicy(
  path: string,
  log: Logger,
  options: { readonly pollMs?: number } = {},
): ReloadingPolicy {
  let initial: Buffer;
  try {
    initial = readFileSync(path);
  } catch (error) {
    throw policyError(`cannot read ${path}: ${(error as Error).message}`);
  }
  let current = parsePolicy(initial.toString("utf8"), path);
  let version = 0;
  const reloader = createFileReloader({
    files: [path],
    initial: [initial],
    parse: ([content]) => parsePolicy(content?.toString("utf8") ?? "", path),
    apply: (policy) => {
      current = policy;
      version += 1;
      log.info({ file: path, bindings: policy.size }, "auth policy reloaded");
    },
    log,
    what: "auth policy",
    pollMs: options.pollMs,
  });
  return {
    bindingsOf: (principal) => current.bindingsOf(principal),
    get size() {
      return current.size;
    },
    get version() {
      return version;
    },
    reload: () => reloader.reload(),
    onReload: reloader.onApplied,
    close: () => reloader.close(),
  };
}

/**
 * What a binding (or a token's role) without `clusters` is told: there is no
 * default, so that a file cut short after a `role:` line grants nothing.
 */
export const MISSING_CLUSTERS =
  'missing; write clusters: ["*"] for every cluster, or the clusters it applies to, e.g. clusters: [staging, "eu-*"]';

function parseBinding(item: unknown, at: string, problems: string[]): PolicyBinding | undefined {
  if (item === null || typeof item !== "object" || Array.isArray(item)) {
    problems.push(`${at}: must be a mapping with principals, role and clusters`);
    return undefined;
  }
  const b = item as Record<string, unknown>;
  const before = problems.length;
  for (const key of Object.keys(b)) {
    if (!["principals", "role", "clusters", "worker_ids"].includes(key))
      problems.push(`${at}.${key}: unknown field (expected principals, role, clusters, worker_ids)`);
  }
  const principals = stringList(b.principals, `${at}.principals`, problems, false);
  const role = b.role;
  if (typeof role !== "string" || !(ROLES as readonly string[]).includes(role))
    problems.push(`${at}.role: must be one of ${ROLES.join(", ")} (got ${JSON.stringify(role ?? null)})`);
  if (b.clusters === undefined) problems.push(`${at}.clusters: ${MISSING_CLUSTERS}`);
  const clusters = b.clusters === undefined ? [] : stringList(b.clusters, `${at}.clusters`, problems, false);
  const workerIds = b.worker_ids ?? "*";
  if (typeof workerIds !== "string" || workerIds === "")
    problems.push(`${at}.worker_ids: must be a non-empty glob`);
  else if (role !== "agent" && role !== "operator" && workerIds !== "*")
    problems.push(`${at}.worker_ids: applies only to the agent and operator roles`);
  if (problems.length > before) return undefined;
  return { principals, role: role as Role, clusters, workerIds: workerIds as string };
}

function stringList(value: unknown, at: string, problems: string[], emptyOk: boolean): string[] {
  const list = typeof value === "string" ? [value] : value;
  if (!Array.isArray(list) || (!emptyOk && list.length === 0)) {
    problems.push(`${at}: must be a non-empty list of strings`);
    return [];
  }
  list.forEach((v, i) => {
    if (typeof v !== "string" || v === "") problems.push(`${at}[${i}]: must be a non-empty string`);
  });
  return list as string[];
}

function policyError(message: string): LeaseholdError {
  return LeaseholdError.invalidArgument("--auth-policy", message);
}
