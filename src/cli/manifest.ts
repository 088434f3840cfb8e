import { readFileSync } from "node:fs";
import { basename, dirname, isAbsolute, resolve } from "node:path";
import {
  create,
  type DescMessage,
  fromJson,
  type JsonValue,
  type MessageInitShape,
} from "@bufbuild/protobuf";
import { parseDocument } from "yaml";
import { DEFAULTS, MAX_DURATION_MS, parseDuration } from "../config.js";
import { CreateLeaseRequestSchema } from "../gen/leasehold/v1/lease_pb.js";
import {
  CommandSchema,
  type DeploymentSpec,
  DeploymentSpecSchema,
  FileMountSchema,
  ReadinessProbeSchema,
} from "../gen/leasehold/v1/resource_pb.js";
import { charactersOver } from "../rpc/limits.js";
import { requestValidator } from "../rpc/request-validator.js";
import { probeUrlRefusal } from "../scope/probe-url.js";

/*
 * The live-test manifest of `leasehold lease run --test=<manifest.yaml>`, read
 * and checked by hand so that every problem is reported at once with its field
 * path (`checks[1].http.url: is required`). The format is documented in the
 * README ("Live tests") and by examples/http-smoke/manifest.yaml.
 */

/** Defaults of the optional manifest fields. */
export const MANIFEST_DEFAULTS = {
  /** The lease rolls back by itself after this long: a crashed run leaves nothing behind for longer. */
  ttlMs: 15 * 60_000,
  /** How long to wait for the deployment to become ready. */
  readyTimeoutMs: 5 * 60_000,
  /** How long one check may take. */
  checkTimeoutMs: 10_000,
  /** How long the deployment may take to save its outputs. */
  collectTimeoutMs: 60_000,
  /** Host of a tcp check. */
  tcpHost: "127.0.0.1",
  /** Expected HTTP status of an http check. */
  httpStatus: 200,
  /** Expected exit code of an exec check. */
  exitCode: 0,
} as const;

/**
 * The server's limits, checked here too so that a manifest fails before any
 * lease exists; the limits of every field the server checks on any request
 * (lengths, counts, NUL characters: `rpc/limits.ts`) are checked with the
 * server's own validator, see {@link serverLimits}.
 */
const LIMITS = {
  /** Runtime and container names: letters, digits, '.', '_', '-', ':'. */
  name: /^[A-Za-z0-9._:-]+$/,
  runtimeLength: 128,
  containerNameLength: 63,
  labelLength: 128,
  containers: 32,
  /** Readiness period and timeout. */
  probeMinMs: 100,
  probeMaxMs: 10 * 60_000,
  /** WaitLease's timeout. */
  readyTimeoutMaxMs: 24 * 3_600_000,
  /** CollectOutputs' timeout. */
  collectTimeoutMaxMs: 3_600_000,
  /** A check's timeout: a day is more than any check needs, and Node's timers go no further than 24.8. */
  checkTimeoutMaxMs: 24 * 3_600_000,
} as const;

/** A file uploaded into the lease and placed in the deployment's work directory. */
export interface Fixture {
  /** The file resource's name. */
  readonly name: string;
  /** Where the agent puts it, relative to the deployment's work directory. */
  readonly mount: string;
  /** The bytes to upload. */
  readonly content: Uint8Array;
}

/** How the agent decides the deployment is ready (one of http, tcp, exec). */
export type Readiness = (
  | { readonly kind: "http"; readonly url: string }
  | { readonly kind: "tcp"; readonly port: number }
  | { readonly kind: "exec"; readonly command: CommandSpec }
) & {
  /** Time between probes; unset means the agent's default (1s). */
  readonly periodMs?: number;
  /** How long one probe may take; unset means the agent's default (5s). */
  readonly timeoutMs?: number;
};

/** A command: program and arguments, extra environment, working directory ("" for the default). */
export interface CommandSpec {
  readonly argv: readonly string[];
  readonly env: Readonly<Record<string, string>>;
  readonly cwd: string;
}

/** One container of the deployment. */
export interface ContainerPlan extends CommandSpec {
  readonly name: string;
}

/** What the deployment runs. */
export interface DeploymentPlan {
  readonly containers: readonly ContainerPlan[];
  readonly readiness: Readiness | undefined;
  /** Directory (in the work directory) whose files become outputs; "" for none. */
  readonly outputsDir: string;
  readonly readyTimeoutMs: number;
}

/** What a check tests: an HTTP answer, a TCP port, or a command's exit code and output. */
export type CheckBody =
  | { readonly kind: "http"; readonly url: string; readonly status: number; readonly bodyContains?: string }
  | { readonly kind: "tcp"; readonly host: string; readonly port: number }
  | {
      readonly kind: "exec";
      /** `cwd` is resolved against the manifest's directory. */
      readonly command: CommandSpec;
      readonly exitCode: number;
      readonly stdoutContains?: string;
    };

/** A check run from the CLI's machine once the deployment is ready. */
export type Check = CheckBody & {
  /** Unique within the manifest; defaults to a description of the check. */
  readonly name: string;
  readonly timeoutMs: number;
};

/** A validated manifest. */
export interface Manifest {
  /** Directory of the manifest file: fixture paths and exec checks' cwd are relative to it. */
  readonly dir: string;
  readonly runtime: string;
  /** "" for none. */
  readonly label: string;
  readonly ttlMs: number;
  readonly fixtures: readonly Fixture[];
  readonly deployment: DeploymentPlan;
  readonly checks: readonly Check[];
  /** Output file names (relative to outputs_dir) to promote, so they survive the rollback. */
  readonly promote: readonly string[];
  readonly collectTimeoutMs: number;
}

/** A manifest (or spec file) that cannot be used; `problems` lists every one, each naming its field. */
export class ManifestError extends Error {
  constructor(
    readonly file: string,
    readonly problems: readonly string[],
  ) {
    super(
      `${file}: invalid (${problems.length} ${problems.length === 1 ? "problem" : "problems"}):\n${problems
        .map((p) => `  ${p}`)
        .join("\n")}`,
    );
    this.name = "ManifestError";
  }
}

/** Options of {@link parseManifest}. */
export interface ParseManifestOptions {
  /** Name used in messages. */
  readonly file: string;
  /** Directory relative paths are resolved against. */
  readonly dir: string;
  /** Reads a fixture file; default `readFileSync`. */
  readonly readFile?: (path: string) => Uint8Array;
}

/** Reads and validates the manifest at `path`. Throws {@link ManifestError}. */
export function loadManifest(path: string): Manifest {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new ManifestError(path, [`cannot read the manifest: ${errorText(error)}`]);
  }
  return parseManifest(text, { file: path, dir: dirname(resolve(path)) });
}

/** Validates a manifest's YAML text. Throws {@link ManifestError} listing every problem. */
export function parseManifest(text: string, options: ParseManifestOptions): Manifest {
  const root = parseYaml(text, options.file);
  const p = new Problems();
  const top = mapping(p, "", root, [
    "runtime",
    "label",
    "ttl",
    "fixtures",
    "deployment",
    "checks",
    "outputs",
  ]);
  if (!top) throw new ManifestError(options.file, p.list);
  const runtime = requiredString(p, "runtime", top.runtime);
  if (runtime !== "") checkName(p, "runtime", runtime, LIMITS.runtimeLength);
  const label = optionalString(p, "label", top.label) ?? "";
  if (charactersOver(label, LIMITS.labelLength) !== undefined)
    p.add("label", `must be at most ${LIMITS.labelLength} characters`);
  // The server keeps a TTL in whole milliseconds: a finer one is refused, not rounded. Its maximum is
  // the server's setting; past the longest duration a request carries, no server takes it.
  const ttlMs =
    duration(p, "ttl", top.ttl, 1000, Number.POSITIVE_INFINITY, {
      wholeMs: true,
      overMax: `is longer than any server takes: a lease's TTL is at most the server's --lease-max-ttl, ${DEFAULTS.leaseMaxTtl} by default`,
    }) ?? MANIFEST_DEFAULTS.ttlMs;
  serverLimits(p, "", CreateLeaseRequestSchema, { runtime, label });
  const fixtures = readFixtures(p, top.fixtures, options);
  const deployment = readDeployment(p, top.deployment);
  // Each fixture is an input of the deployment: their number is bounded too (the elements are
  // checked with each fixture).
  serverLimits(p, "", DeploymentSpecSchema, { inputs: fixtures.map(() => ({})) }, { inputs: "fixtures" });
  const checks = readChecks(p, top.checks);
  const outputs = mapping(p, "outputs", top.outputs, ["promote", "collect_timeout"]) ?? {};
  const promote = stringList(p, "outputs.promote", outputs.promote, { allowEmpty: true }) ?? [];
  duplicates(
    p,
    "outputs.promote",
    promote.map((name, i): Indexed => [i, name]),
  );
  if (promote.length > 0 && deployment && deployment.outputsDir === "") {
    p.add("outputs.promote", "needs deployment.outputs_dir (the directory the outputs are saved from)");
  }
  const collectTimeoutMs =
    duration(p, "outputs.collect_timeout", outputs.collect_timeout, 1000, LIMITS.collectTimeoutMaxMs) ??
    MANIFEST_DEFAULTS.collectTimeoutMs;
  if (p.list.length > 0 || !deployment) throw new ManifestError(options.file, p.list);
  return {
    dir: options.dir,
    runtime,
    label,
    ttlMs,
    fixtures,
    deployment,
    checks,
    promote,
    collectTimeoutMs,
  };
}

/**
 * Reads a DeploymentSpec file for `leasehold deployment create --spec`, in
 * JSON or YAML: the proto3 JSON mapping of leasehold.v1.DeploymentSpec, or
 * the shape of a manifest's `deployment:` (containers[].argv, readiness,
 * outputs_dir), which `fromPlan` turns into the message, as `lease run`
 * does: people write one after reading the other. Throws
 * {@link ManifestError} naming the field.
 */
export function loadDeploymentSpec(
  path: string,
  fromPlan: (plan: DeploymentPlan) => MessageInitShape<typeof DeploymentSpecSchema>,
): DeploymentSpec {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new ManifestError(path, [`cannot read the spec: ${errorText(error)}`]);
  }
  const value = parseYaml(text, path);
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ManifestError(path, [`must be a DeploymentSpec object (got ${describe(value)})`]);
  }
  if (inManifestShape(value as Record<string, unknown>)) {
    const p = new Problems();
    const plan = readDeployment(p, value);
    if (p.list.length > 0 || !plan) throw new ManifestError(path, p.list);
    return create(DeploymentSpecSchema, fromPlan(plan));
  }
  try {
    return fromJson(DeploymentSpecSchema, value as JsonValue);
  } catch (error) {
    // protobuf-es names the message and field: "cannot decode field leasehold.v1.Command.argv from JSON: …".
    throw new ManifestError(path, [
      `${errorText(error)}; write the spec as a DeploymentSpec (containers[].command.argv, readinessProbe, ` +
        "outputsDir) or as a manifest's deployment (containers[].argv, readiness, outputs_dir)",
    ]);
  }
}

/**
 * Whether a spec is written as a manifest's deployment: keys a
 * DeploymentSpec does not have (a container's own argv, env or cwd;
 * readiness, ready_timeout). outputs_dir is in both (proto3 JSON takes the
 * field's own name too).
 */
function inManifestShape(value: Record<string, unknown>): boolean {
  if ("readiness" in value || "ready_timeout" in value) return true;
  const containers = value.containers;
  return (
    Array.isArray(containers) &&
    containers.some((c) => typeof c === "object" && c !== null && ("argv" in c || "env" in c || "cwd" in c))
  );
}

/** YAML (a superset of JSON) into plain values; syntax errors are reported with line and column. */
function parseYaml(text: string, file: string): unknown {
  const doc = parseDocument(text, { uniqueKeys: true });
  if (doc.errors.length > 0) {
    // The first line of each message says what and where; the rest is a code excerpt.
    throw new ManifestError(
      file,
      doc.errors.map((e) => `YAML: ${(e.message.split("\n")[0] ?? e.message).replace(/:$/, "")}`),
    );
  }
  try {
    return doc.toJS({ maxAliasCount: 100 });
  } catch (error) {
    throw new ManifestError(file, [`YAML: ${errorText(error)}`]);
  }
}

function readFixtures(p: Problems, value: unknown, options: ParseManifestOptions): Fixture[] {
  const fixtures: Fixture[] = [];
  const names: Indexed[] = [];
  const mounts: Indexed[] = [];
  (sequence(p, "fixtures", value) ?? []).forEach((item, i) => {
    const at = `fixtures[${i}]`;
    const f = mapping(p, at, item, ["name", "path", "content", "mount"]);
    if (!f) return;
    const path = optionalString(p, `${at}.path`, f.path);
    const inline = optionalString(p, `${at}.content`, f.content, { allowEmpty: true });
    if (absent(f.path) === absent(f.content)) {
      p.add(at, "needs exactly one of path (a file, relative to the manifest) or content (inline text)");
    }
    if (absent(f.name) && !absent(f.content)) p.add(`${at}.name`, "is required with content");
    const name = optionalString(p, `${at}.name`, f.name) ?? (path === undefined ? undefined : basename(path));
    if (name !== undefined && charactersOver(name, 512) !== undefined)
      p.add(`${at}.name`, "must be at most 512 characters");
    const mount = optionalString(p, `${at}.mount`, f.mount) ?? name;
    if (mount !== undefined) {
      relativePath(p, absent(f.mount) ? `${at}.name` : `${at}.mount`, mount);
      serverLimits(p, at, FileMountSchema, { path: mount }, { path: absent(f.mount) ? "name" : "mount" });
    }
    let content: Uint8Array | undefined;
    if (inline !== undefined) content = new TextEncoder().encode(inline);
    else if (path !== undefined) {
      const file = resolve(options.dir, path);
      try {
        content = (options.readFile ?? readFileSync)(file);
      } catch (error) {
        p.add(`${at}.path`, `cannot read ${file}: ${errorText(error)}`);
      }
    }
    // Counted for the duplicate checks even when this fixture has problems of its own: every
    // problem is reported at once.
    if (name !== undefined) names.push([i, name]);
    if (mount !== undefined) mounts.push([i, mount]);
    if (name === undefined || mount === undefined || content === undefined) return;
    fixtures.push({ name, mount, content });
  });
  duplicates(p, "fixtures", names, "name");
  duplicates(p, "fixtures", mounts, "mount");
  return fixtures;
}

function readDeployment(p: Problems, value: unknown): DeploymentPlan | undefined {
  if (value === undefined || value === null) {
    p.add("deployment", "is required");
    return undefined;
  }
  const d = mapping(p, "deployment", value, ["containers", "readiness", "outputs_dir", "ready_timeout"]);
  if (!d) return undefined;
  const containers: ContainerPlan[] = [];
  const names: Indexed[] = [];
  const list = sequence(p, "deployment.containers", d.containers);
  if (list === undefined) p.add("deployment.containers", "is required (at least one container)");
  else if (list.length === 0) p.add("deployment.containers", "needs at least one container");
  else if (list.length > LIMITS.containers)
    p.add("deployment.containers", `must list at most ${LIMITS.containers} containers`);
  (list ?? []).forEach((item, i) => {
    const at = `deployment.containers[${i}]`;
    const c = mapping(p, at, item, ["name", "argv", "env", "cwd"]);
    if (!c) return;
    const name = requiredString(p, `${at}.name`, c.name);
    if (name !== "") checkName(p, `${at}.name`, name, LIMITS.containerNameLength);
    const command = readCommand(p, at, c, { workDir: true });
    if (command) containers.push({ name, ...command });
    if (name !== "") names.push([i, name]);
  });
  duplicates(p, "deployment.containers", names, "name");
  const outputsDir = optionalString(p, "deployment.outputs_dir", d.outputs_dir) ?? "";
  if (outputsDir !== "") relativePath(p, "deployment.outputs_dir", outputsDir);
  serverLimits(p, "deployment", DeploymentSpecSchema, { outputsDir });
  return {
    containers,
    readiness: readReadiness(p, d.readiness),
    outputsDir,
    readyTimeoutMs:
      duration(p, "deployment.ready_timeout", d.ready_timeout, 1000, LIMITS.readyTimeoutMaxMs) ??
      MANIFEST_DEFAULTS.readyTimeoutMs,
  };
}

function readReadiness(p: Problems, value: unknown): Readiness | undefined {
  const at = "deployment.readiness";
  const r = mapping(p, at, value, ["http", "tcp", "exec", "period", "timeout"]);
  if (!r) return undefined;
  const timing = {
    ...optional("periodMs", duration(p, `${at}.period`, r.period, LIMITS.probeMinMs, LIMITS.probeMaxMs)),
    ...optional("timeoutMs", duration(p, `${at}.timeout`, r.timeout, LIMITS.probeMinMs, LIMITS.probeMaxMs)),
  };
  switch (exactlyOne(p, at, r, ["http", "tcp", "exec"])) {
    case "http": {
      const url = httpUrl(p, `${at}.http`, r.http);
      // The agent probes its own host only (the server refuses any other): said before a lease exists.
      const refusal = url === undefined ? undefined : probeUrlRefusal(url);
      if (refusal !== undefined) p.add(`${at}.http`, refusal);
      else if (url !== undefined)
        serverLimits(
          p,
          at,
          ReadinessProbeSchema,
          { check: { case: "httpGet", value: url } },
          { http_get: "http" },
        );
      return url === undefined ? undefined : { kind: "http", url, ...timing };
    }
    case "tcp": {
      const port = integer(p, `${at}.tcp`, r.tcp, 1, 65535, "a port number");
      return port === undefined ? undefined : { kind: "tcp", port, ...timing };
    }
    case "exec": {
      const e = mapping(p, `${at}.exec`, r.exec, ["argv", "env", "cwd"]);
      const command = e && readCommand(p, `${at}.exec`, e, { workDir: true });
      return command ? { kind: "exec", command, ...timing } : undefined;
    }
    default:
      return undefined;
  }
}

function readChecks(p: Problems, value: unknown): Check[] {
  const checks: Check[] = [];
  const names: Indexed[] = [];
  (sequence(p, "checks", value) ?? []).forEach((item, i) => {
    const at = `checks[${i}]`;
    const c = mapping(p, at, item, ["name", "timeout", "http", "tcp", "exec"]);
    if (!c) return;
    const named = optionalString(p, `${at}.name`, c.name);
    const timeoutMs =
      duration(p, `${at}.timeout`, c.timeout, 1, LIMITS.checkTimeoutMaxMs) ??
      MANIFEST_DEFAULTS.checkTimeoutMs;
    const check = readCheck(p, at, c);
    // A named check with problems of its own still counts for the duplicate check.
    if (!check) {
      if (named !== undefined) names.push([i, named]);
      return;
    }
    const name = named ?? defaultCheckName(check);
    checks.push({ ...check, name, timeoutMs });
    names.push([i, name]);
  });
  duplicates(p, "checks", names, "name");
  return checks;
}

function readCheck(p: Problems, at: string, c: Record<string, unknown>): CheckBody | undefined {
  switch (exactlyOne(p, at, c, ["http", "tcp", "exec"])) {
    case "http": {
      const h = mapping(p, `${at}.http`, c.http, ["url", "status", "body_contains"]);
      if (!h) return undefined;
      if (h.url === undefined || h.url === null) p.add(`${at}.http.url`, "is required");
      const url = h.url === undefined || h.url === null ? undefined : httpUrl(p, `${at}.http.url`, h.url);
      const status =
        integer(p, `${at}.http.status`, h.status, 100, 599, "an HTTP status code") ??
        MANIFEST_DEFAULTS.httpStatus;
      const bodyContains = optionalString(p, `${at}.http.body_contains`, h.body_contains);
      return url === undefined
        ? undefined
        : { kind: "http", url, status, ...optional("bodyContains", bodyContains) };
    }
    case "tcp": {
      const t = mapping(p, `${at}.tcp`, c.tcp, ["host", "port"]);
      if (!t) return undefined;
      const host = optionalString(p, `${at}.tcp.host`, t.host) ?? MANIFEST_DEFAULTS.tcpHost;
      if (t.port === undefined || t.port === null) p.add(`${at}.tcp.port`, "is required");
      const port =
        t.port === undefined || t.port === null
          ? undefined
          : integer(p, `${at}.tcp.port`, t.port, 1, 65535, "a port number");
      return port === undefined ? undefined : { kind: "tcp", host, port };
    }
    case "exec": {
      const e = mapping(p, `${at}.exec`, c.exec, ["argv", "env", "cwd", "exit_code", "stdout_contains"]);
      if (!e) return undefined;
      const command = readCommand(p, `${at}.exec`, e, { workDir: false });
      const exitCode =
        integer(p, `${at}.exec.exit_code`, e.exit_code, 0, 255, "an exit code") ?? MANIFEST_DEFAULTS.exitCode;
      const stdoutContains = optionalString(p, `${at}.exec.stdout_contains`, e.stdout_contains);
      return command
        ? { kind: "exec", command, exitCode, ...optional("stdoutContains", stdoutContains) }
        : undefined;
    }
    default:
      return undefined;
  }
}

function defaultCheckName(c: CheckBody): string {
  switch (c.kind) {
    case "http":
      return `GET ${c.url}`;
    case "tcp":
      return `tcp ${c.host}:${c.port}`;
    case "exec":
      return c.command.argv.join(" ");
  }
}

/**
 * `argv` (required), `env`, `cwd` of a mapping that holds a command. With
 * `workDir` it runs on the agent, where `cwd` must stay inside the deployment's
 * work directory.
 */
function readCommand(
  p: Problems,
  at: string,
  m: Record<string, unknown>,
  options: { workDir: boolean },
): CommandSpec | undefined {
  if (m.argv === undefined || m.argv === null) {
    p.add(`${at}.argv`, "is required (the program and its arguments)");
    return undefined;
  }
  const argv = stringList(p, `${at}.argv`, m.argv, { allowEmpty: false, scalars: true });
  if (argv?.[0] === "") p.add(`${at}.argv[0]`, "must not be empty (it is the program to run)");
  const env = stringMap(p, `${at}.env`, m.env);
  for (const key of Object.keys(env)) {
    if (key === "" || key.includes("=")) p.add(`${at}.env`, `${JSON.stringify(key)} is not a variable name`);
  }
  const cwd = optionalString(p, `${at}.cwd`, m.cwd) ?? "";
  if (options.workDir && cwd !== "") relativePath(p, `${at}.cwd`, cwd);
  // A command run by the agent goes to the server; a check's runs here.
  if (options.workDir && argv) serverLimits(p, at, CommandSchema, { argv, env, cwd });
  return argv ? { argv, env, cwd } : undefined;
}

function checkName(p: Problems, at: string, value: string, max: number): void {
  if (charactersOver(value, max) !== undefined) p.add(at, `must be at most ${max} characters`);
  else if (!LIMITS.name.test(value)) p.add(at, "may contain only letters, digits, '.', '_', '-' and ':'");
}

/** Problems found so far, each `path: what is wrong`. */
class Problems {
  readonly list: string[] = [];
  readonly #paths = new Set<string>();
  add(path: string, message: string): void {
    this.#paths.add(path);
    this.list.push(path === "" ? message : `${path}: ${message}`);
  }
  /** Whether a problem at `path` was reported already. */
  has(path: string): boolean {
    return this.#paths.has(path);
  }
}

/**
 * Checks `init`, a part of a request the manifest becomes, with the server's
 * own request validator (`rpc/request-validator.ts`, limits in
 * `rpc/limits.ts`), so that a manifest the server would refuse is refused
 * before anything is created. Each violation is reported at its manifest
 * path: `at`, then the proto field path with its first field renamed by
 * `rename` (`argv[1]`, `env["PATH"]`; `http_get` → `http`). A field the
 * manifest's own checks reported already is not reported twice.
 */
function serverLimits<D extends DescMessage>(
  p: Problems,
  at: string,
  schema: D,
  init: MessageInitShape<D>,
  rename: Readonly<Record<string, string>> = {},
): void {
  const refused = requestValidator(schema)(create(schema, init));
  for (const v of refused?.fieldViolations ?? []) {
    const head = /^[a-z_]+/.exec(v.field)?.[0] ?? "";
    const path = child(at, (rename[head] ?? head) + v.field.slice(head.length));
    if (!p.has(path)) p.add(path, v.description);
  }
}

const child = (path: string, key: string) => (path === "" ? key : `${path}.${key}`);
const absent = (value: unknown): value is undefined | null => value === undefined || value === null;
const optional = <K extends string, V>(key: K, value: V | undefined): { [P in K]?: V } =>
  (value === undefined ? {} : { [key]: value }) as { [P in K]?: V };

function describe(value: unknown): string {
  if (value === null || value === undefined) return "nothing";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "a mapping";
  return `${typeof value} ${JSON.stringify(value)}`;
}

/** A mapping with only `keys`; absent (undefined/null) gives undefined without a problem. */
function mapping(
  p: Problems,
  at: string,
  value: unknown,
  keys: readonly string[],
): Record<string, unknown> | undefined {
  if (absent(value)) {
    if (at === "")
      p.add("", "the manifest is empty (it must be a mapping with at least runtime and deployment)");
    return undefined;
  }
  if (typeof value !== "object" || Array.isArray(value)) {
    p.add(at, `must be a mapping (got ${describe(value)})`);
    return undefined;
  }
  const record = value as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!keys.includes(key)) p.add(child(at, key), `unknown key (expected one of ${keys.join(", ")})`);
  }
  return record;
}

function sequence(p: Problems, at: string, value: unknown): unknown[] | undefined {
  if (absent(value)) return undefined;
  if (!Array.isArray(value)) {
    p.add(at, `must be a list (got ${describe(value)})`);
    return undefined;
  }
  return value;
}

function requiredString(p: Problems, at: string, value: unknown): string {
  if (absent(value)) {
    p.add(at, "is required");
    return "";
  }
  return optionalString(p, at, value) ?? "";
}

function optionalString(
  p: Problems,
  at: string,
  value: unknown,
  options: { allowEmpty?: boolean } = {},
): string | undefined {
  if (absent(value)) return undefined;
  if (typeof value !== "string") {
    p.add(at, `must be a string (got ${describe(value)})`);
    return undefined;
  }
  if (value === "" && !options.allowEmpty) {
    p.add(at, "must not be empty");
    return undefined;
  }
  return value;
}

/**
 * A list of strings. With `scalars`, numbers and booleans are taken as their
 * text, so `argv: [node, server.mjs, 8080]` means what it says.
 */
function stringList(
  p: Problems,
  at: string,
  value: unknown,
  options: { allowEmpty: boolean; scalars?: boolean },
): string[] | undefined {
  const list = sequence(p, at, value);
  if (!list) return undefined;
  if (list.length === 0 && !options.allowEmpty) {
    p.add(at, "must not be empty");
    return undefined;
  }
  const out: string[] = [];
  list.forEach((item, i) => {
    if (typeof item === "string") out.push(item);
    else if (options.scalars && typeof item === "number" && !Number.isFinite(item))
      p.add(`${at}[${i}]`, outOfRange(item));
    else if (options.scalars && (typeof item === "number" || typeof item === "boolean"))
      out.push(String(item));
    else p.add(`${at}[${i}]`, `must be a string (got ${describe(item)})`);
  });
  return out.length === list.length ? out : undefined;
}

/** A mapping of names to strings; numbers and booleans are taken as their text (`PORT: 8080`). */
function stringMap(p: Problems, at: string, value: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (absent(value)) return out;
  if (typeof value !== "object" || Array.isArray(value)) {
    p.add(at, `must be a mapping of names to strings (got ${describe(value)})`);
    return out;
  }
  for (const [key, v] of Object.entries(value)) {
    if (typeof v === "number" && !Number.isFinite(v)) p.add(child(at, key), outOfRange(v));
    else if (typeof v === "string" || typeof v === "number" || typeof v === "boolean") out[key] = String(v);
    else p.add(child(at, key), `must be a string (got ${describe(v)})`);
  }
  return out;
}

/** What to say of a YAML number too large for a double (`1e400`), which would become "Infinity". */
const outOfRange = (n: number) =>
  `is a number too large to write as text (${n < 0 ? "-" : ""}Infinity); quote it to pass it as it is written`;

/**
 * A duration: `500ms`, `10s`, `2m`, `1h`, or a number of seconds; from
 * `minMs` to `maxMs`, and never past the longest duration a request carries
 * ({@link MAX_DURATION_MS}); `overMax` says what is wrong past that instead.
 */
function duration(
  p: Problems,
  at: string,
  value: unknown,
  minMs: number,
  maxMs = Number.POSITIVE_INFINITY,
  options: { wholeMs?: boolean; overMax?: string } = {},
): number | undefined {
  if (absent(value)) return undefined;
  const ms =
    typeof value === "number" && Number.isFinite(value) && value >= 0
      ? value * 1000 > MAX_DURATION_MS
        ? Number.POSITIVE_INFINITY
        : Math.round(value * 1000)
      : typeof value === "string"
        ? tryParseDuration(value)
        : undefined;
  if (ms === undefined) {
    p.add(at, `must be a duration like 500ms, 10s, 2m or 1h (got ${describe(value)})`);
    return undefined;
  }
  const max = Math.min(maxMs, MAX_DURATION_MS);
  if (ms > max) {
    p.add(
      at,
      max === maxMs || options.overMax === undefined
        ? `must be at most ${formatMs(max)}`
        : `${options.overMax} (got ${describe(value)})`,
    );
    return undefined;
  }
  if (options.wholeMs && !wholeMilliseconds(value as number | string)) {
    p.add(at, `must be a whole number of milliseconds (got ${describe(value)})`);
    return undefined;
  }
  if (ms < minMs) {
    p.add(at, `must be at least ${formatMs(minMs)}`);
    return undefined;
  }
  return ms;
}

const formatMs = (ms: number) =>
  ms % 3_600_000 === 0
    ? `${ms / 3_600_000}h`
    : ms % 60_000 === 0
      ? `${ms / 60_000}m`
      : ms % 1000 === 0
        ? `${ms / 1000}s`
        : `${ms}ms`;

/**
 * Whether a duration (a number of seconds, or a string like `1.5s`) is a
 * whole number of milliseconds, in decimal and exactly: 0.9995 times 1000
 * is 999.4999999999999 as a float.
 */
function wholeMilliseconds(value: number | string): boolean {
  if (typeof value === "string") return tryParseDuration(value, true) !== undefined;
  const text = String(value);
  // 1e+21, 1e-7: no decimal digits to go by, and far from a millisecond's precision anyway.
  return /e/i.test(text) ? Number.isInteger(value * 1000) : tryParseDuration(text, true) !== undefined;
}

/** Milliseconds; +Infinity for a well-formed duration too long to use; undefined if malformed. */
function tryParseDuration(text: string, wholeMs = false): number | undefined {
  try {
    return parseDuration("", text, { wholeMs });
  } catch {
    // The one other thing parseDuration refuses without wholeMs is a duration too long.
    return !wholeMs && DURATION_TEXT.test(text.trim()) ? Number.POSITIVE_INFINITY : undefined;
  }
}

/** What {@link parseDuration} reads. */
const DURATION_TEXT = /^\d+(\.\d+)?(ms|s|m|h|d)?$/;

function integer(
  p: Problems,
  at: string,
  value: unknown,
  min: number,
  max: number,
  what: string,
): number | undefined {
  if (absent(value)) return undefined;
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    p.add(at, `must be ${what}, a whole number from ${min} to ${max} (got ${describe(value)})`);
    return undefined;
  }
  return value;
}

function httpUrl(p: Problems, at: string, value: unknown): string | undefined {
  const text = optionalString(p, at, value);
  if (text === undefined) return undefined;
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    p.add(at, `must be an http:// or https:// URL (got ${JSON.stringify(text)})`);
    return undefined;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    p.add(at, `must be an http:// or https:// URL (got ${JSON.stringify(text)})`);
    return undefined;
  }
  return text;
}

/** The one key of `keys` present in `m`; a problem when none or several are. */
function exactlyOne<K extends string>(
  p: Problems,
  at: string,
  m: Record<string, unknown>,
  keys: readonly K[],
): K | undefined {
  const present = keys.filter((k) => !absent(m[k]));
  if (present.length === 1) return present[0];
  p.add(
    at,
    `needs exactly one of ${keys.join(", ")} (got ${present.length === 0 ? "none" : present.join(" and ")})`,
  );
  return undefined;
}

/** A path relative to the deployment's work directory: not absolute, no `..`. */
function relativePath(p: Problems, at: string, path: string): void {
  if (isAbsolute(path) || path.split(/[\\/]/).includes("..")) {
    p.add(at, `must be a relative path inside the work directory, without .. (got ${JSON.stringify(path)})`);
  }
}

/** A value with its index in the manifest's list. */
type Indexed = [index: number, value: string];

/** Reports each value used again, at its own index, naming the first use. */
function duplicates(p: Problems, at: string, values: readonly Indexed[], field?: string): void {
  const seen = new Map<string, number>();
  for (const [i, v] of values) {
    const first = seen.get(v);
    if (first === undefined) seen.set(v, i);
    else
      p.add(
        field ? `${at}[${i}].${field}` : `${at}[${i}]`,
        `${JSON.stringify(v)} is already used by ${field ? `${at}[${first}].${field}` : `${at}[${first}]`}`,
      );
  }
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
