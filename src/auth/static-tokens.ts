import { createHash, randomBytes } from "node:crypto";
import {
  closeSync,
  fchmodSync,
  fsyncSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from "node:fs";
import { basename, dirname, join } from "node:path";
import type { Logger } from "pino";
import { Document, isMap, isSeq, parseDocument, Scalar } from "yaml";
import { LeaseholdError, quote } from "../errors.js";
import {
  type Identity,
  principalProblem,
  ROLE_RIGHTS,
  ROLES,
  type Role,
  type RoleBinding,
} from "./access.js";
import { createFileReloader, type ReloadOutcome, readCredentialFileSync } from "./file-reloader.js";
import { MISSING_CLUSTERS } from "./policy.js";

/** One token of the file: who it is for, the hash of the token, and the roles it brings. */
export interface StaticTokenEntry {
  readonly principal: string;
  /** SHA-256 of the token, lowercase hex. */
  readonly sha256: string;
  /** Roles that come with the token, besides those the policy gives its principal. */
  readonly bindings: readonly RoleBinding[];
  /** When it was created (RFC 3339), or "" when the file does not say. */
  readonly createdAt: string;
}

/** The tokens of a file, kept current with it. */
export interface StaticTokens {
  /** The identity of a token in the file, or undefined if none matches. */
  verify(token: string): Identity | undefined;
  /** Re-reads the file if it changed (a poll does it too). */
  reload(): Promise<ReloadOutcome>;
  /**
   * Grows each time a changed file is put in force: what was decided from
   * an older one (a cached verification) is stale.
   */
  readonly version: number;
  /** Calls `listener` after each change put in force. Returns its off. */
  onReload(listener: () => void): () => void;
  /** Stops watching the file. */
  close(): void;
}

const FLAG = "--auth-tokens";
const HEADER = " Leasehold static tokens: only hashes are stored. Add with `leasehold token create`.";
const SHA256_HEX = /^[0-9a-f]{64}$/i;
const ENTRY_FIELDS = ["principal", "sha256", "created", "roles"];
const ROLE_FIELDS = ["role", "clusters", "worker_ids"];
/** Roles that run workers, the only ones a worker-id pattern applies to. */
const WORKER_ROLES = ROLES.filter((r) => ROLE_RIGHTS[r].includes("worker.connect"));

/** SHA-256 of a token, lowercase hex: what the file stores. */
export function hashToken(token: string): string {
  return createHash("sha256").update(token, "utf8").digest("hex");
}

/** A new token: `lh_` and 32 random bytes in base64url (256 bits, so it cannot be guessed). */
export function generateToken(): string {
  return `lh_${randomBytes(32).toString("base64url")}`;
}

/**
 * Loads a static token file (`serve --auth-tokens`) and follows its changes.
 *
 * A bad file at start throws INVALID_ARGUMENT `--auth-tokens: <field path>:
 * <problem>`; a bad change later is logged and the tokens in force stay.
 *
 * Tokens are looked up by their SHA-256 in a Map. The comparison is not
 * constant-time, and need not be: the tokens are 256-bit random values, so
 * what a timing side channel could reveal (how much of a hash matches) gives
 * no help in finding a token with that hash.
 */
export function loadStaticTokens(path: string, log: Logger, options: { pollMs?: number } = {}): StaticTokens {
  const content = readCredentialFileSync(path, FLAG);
  let byHash = indexEntries(parseTokenFile(content.toString("utf8"), path));
  let version = 0;
  const reloader = createFileReloader({
    files: [path],
    initial: [content],
    what: "static tokens",
    log,
    pollMs: options.pollMs,
    parse: ([next]) => indexEntries(parseTokenFile(next?.toString("utf8") ?? "", path)),
    apply(next) {
      byHash = next;
      version += 1;
      log.info({ file: path, tokens: next.size }, "static tokens reloaded");
    },
  });
  return {
    verify(token) {
      const entry = byHash.get(hashToken(token));
      if (!entry) return undefined;
      return { principal: entry.principal, via: "static-token", bindings: entry.bindings };
    },
    reload: reloader.reload,
    get version() {
      return version;
    },
    onReload: reloader.onApplied,
    close: reloader.close,
  };
}

function indexEntries(entries: readonly StaticTokenEntry[]): Map<string, StaticTokenEntry> {
  return new Map(entries.map((e) => [e.sha256, e]));
}

/**
 * The entries of a token file's text; throws INVALID_ARGUMENT
 * `--auth-tokens: <field path>: <problem>` for the first problem found.
 */
export function parseTokenFile(text: string, path: string): StaticTokenEntry[] {
  const fail = (field: string, problem: string) =>
    LeaseholdError.invalidArgument(FLAG, `${path}: ${field}: ${problem}`);
  const doc = parseDocument(text);
  const syntax = doc.errors[0];
  if (syntax) throw fail("(yaml)", syntax.message.split("\n")[0] ?? "not valid YAML");
  const root: unknown = doc.toJS();
  if (root === null || root === undefined) return [];
  if (!isPlainObject(root)) throw fail("(top level)", "must be a mapping with a tokens list");
  for (const key of Object.keys(root))
    if (key !== "tokens") throw fail(key, `unknown field; the file has only "tokens"`);
  const tokens = root.tokens ?? [];
  if (!Array.isArray(tokens)) throw fail("tokens", "must be a list of entries");

  const seen = new Map<string, number>();
  return tokens.map((item: unknown, i): StaticTokenEntry => {
    const at = `tokens[${i}]`;
    if (!isPlainObject(item)) throw fail(at, "must be a mapping with principal, sha256 and roles");
    for (const key of Object.keys(item))
      if (!ENTRY_FIELDS.includes(key))
        throw fail(`${at}.${key}`, `unknown field; expected one of ${ENTRY_FIELDS.join(", ")}`);
    const { principal, sha256, created, roles } = item;
    if (typeof principal !== "string" || principal.trim() === "")
      throw fail(`${at}.principal`, "must be a non-empty string");
    const problem = principalProblem(principal);
    if (problem) throw fail(`${at}.principal`, `${JSON.stringify(principal)} ${problem}`);
    if (typeof sha256 !== "string" || !SHA256_HEX.test(sha256))
      throw fail(
        `${at}.sha256`,
        "must be the SHA-256 of the token as 64 hex digits (the file never holds tokens themselves)",
      );
    const hash = sha256.toLowerCase();
    const earlier = seen.get(hash);
    if (earlier !== undefined) throw fail(`${at}.sha256`, `the same token as tokens[${earlier}]`);
    seen.set(hash, i);
    let createdAt = "";
    if (created !== undefined) {
      // YAML reads an unquoted timestamp as a Date.
      if (created instanceof Date) createdAt = created.toISOString();
      else if (typeof created === "string" && !Number.isNaN(Date.parse(created))) createdAt = created;
      else throw fail(`${at}.created`, 'must be a time in RFC 3339, e.g. "2026-12-02T21:40:00.000Z"');
    }
    if (roles !== undefined && !Array.isArray(roles)) throw fail(`${at}.roles`, "must be a list");
    const bindings = (roles ?? []).map((r: unknown, j) => parseBinding(r, `${at}.roles[${j}]`, fail));
    return { principal, sha256: hash, bindings, createdAt };
  });
}

function parseBinding(
  value: unknown,
  at: string,
  fail: (field: string, problem: string) => LeaseholdError,
): RoleBinding {
  if (!isPlainObject(value)) throw fail(at, "must be a mapping with a role");
  for (const key of Object.keys(value))
    if (!ROLE_FIELDS.includes(key))
      throw fail(`${at}.${key}`, `unknown field; expected one of ${ROLE_FIELDS.join(", ")}`);
  const { role, clusters, worker_ids: workerIds } = value;
  if (typeof role !== "string" || !(ROLES as readonly string[]).includes(role))
    throw fail(
      `${at}.role`,
      `must be one of ${ROLES.join(", ")} (got ${typeof role === "string" ? quote(role) : String(role)})`,
    );
  if (clusters === undefined) throw fail(`${at}.clusters`, MISSING_CLUSTERS);
  if (
    !(
      Array.isArray(clusters) &&
      clusters.length > 0 &&
      clusters.every((c) => typeof c === "string" && c !== "")
    )
  )
    throw fail(`${at}.clusters`, 'must be a non-empty list of cluster globs, e.g. ["cluster-a", "eu-*"]');
  if (workerIds !== undefined) {
    if (typeof workerIds !== "string" || workerIds === "")
      throw fail(`${at}.worker_ids`, 'must be a worker-id glob, e.g. "ci-*"');
    if (!WORKER_ROLES.includes(role as Role))
      throw fail(`${at}.worker_ids`, `applies only to roles that run workers (${WORKER_ROLES.join(", ")})`);
  }
  return {
    role: role as Role,
    clusters: clusters as string[],
    workerIds: workerIds ?? "*",
  };
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value) && !(value instanceof Date);
}

/**
 * Adds a new token for `principal` to the file at `path` and returns the
 * token (the only time it exists outside the caller: the file keeps its
 * hash). Creates the file (mode 0600) if missing; otherwise checks it first
 * (a broken file is not appended to) and keeps its comments and mode. The
 * file is replaced atomically (a temporary file in the same directory,
 * renamed over it), so a running server never reads half of it.
 *
 * Two concurrent runs against one file can lose one entry (each reads, then
 * replaces): tokens are added by hand, one at a time.
 */
export function addStaticToken(
  path: string,
  entry: { principal: string; bindings: readonly RoleBinding[]; now?: Date },
): string {
  if (entry.principal.trim() === "") throw LeaseholdError.invalidArgument("principal", "must not be empty");
  const problem = principalProblem(entry.principal);
  if (problem)
    throw LeaseholdError.invalidArgument("principal", `${JSON.stringify(entry.principal)} ${problem}`);
  let doc: Document;
  let mode = 0o600;
  let existing: string | undefined;
  try {
    existing = readFileSync(path, "utf8");
    mode = statSync(path).mode & 0o777;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT")
      throw LeaseholdError.invalidArgument(FLAG, `cannot read ${path}: ${(error as Error).message}`);
  }
  if (existing === undefined || existing.trim() === "") {
    doc = new Document({ tokens: [] });
    doc.commentBefore = HEADER;
  } else {
    parseTokenFile(existing, path);
    doc = parseDocument(existing);
    if (!isMap(doc.contents)) doc.contents = doc.createNode({ tokens: [] });
    if (!isSeq(doc.get("tokens"))) doc.set("tokens", doc.createNode([]));
  }
  const token = generateToken();
  const item: Record<string, unknown> = {
    principal: entry.principal,
    sha256: hashToken(token),
    created: quoted((entry.now ?? new Date()).toISOString()),
  };
  if (entry.bindings.length > 0) {
    item.roles = entry.bindings.map((b) => ({
      role: b.role,
      clusters: doc.createNode([...b.clusters], { flow: true }),
      ...(b.workerIds !== "*" ? { worker_ids: b.workerIds } : {}),
    }));
  }
  doc.addIn(["tokens"], doc.createNode(item));
  const text = doc.toString();
  // Whatever we wrote must load: a check against our own mistakes.
  parseTokenFile(text, path);
  writeAtomically(path, text, mode);
  return token;
}

/** A string written in double quotes (so that no YAML reader takes a time for a timestamp type). */
function quoted(value: string): Scalar<string> {
  const scalar = new Scalar(value);
  scalar.type = Scalar.QUOTE_DOUBLE;
  return scalar;
}

function writeAtomically(path: string, text: string, mode: number): void {
  const temp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString("hex")}.tmp`);
  const fd = openSync(temp, "wx", mode);
  try {
    fchmodSync(fd, mode);
    writeSync(fd, text);
    fsyncSync(fd);
  } catch (error) {
    closeSync(fd);
    rmSync(temp, { force: true });
    throw error;
  }
  closeSync(fd);
  try {
    renameSync(temp, path);
  } catch (error) {
    rmSync(temp, { force: true });
    throw error;
  }
}
