import { type Duration, durationMs } from "@bufbuild/protobuf/wkt";
import { type FieldViolation, LeaseholdError, quote } from "../errors.js";
import { charactersOver } from "./limits.js";

/** Violations kept per request: enough to fix a request in a round or two, bounded whatever it holds. */
const MAX_VIOLATIONS = 16;

/**
 * Collects every violation of a request (the first {@link MAX_VIOLATIONS}),
 * so the caller fixes them all in one round trip; `throwIfAny()` raises
 * INVALID_ARGUMENT naming each field.
 */
export class Violations {
  readonly #list: FieldViolation[] = [];

  add(field: string, description: string): void {
    if (this.#list.length < MAX_VIOLATIONS) this.#list.push({ field, description });
  }

  throwIfAny(): void {
    if (this.#list.length > 0) throw LeaseholdError.invalidFields(this.#list);
  }
}

/** Names: clusters, worker ids. Letters, digits and `.`, `_`, `-`, `:`. */
const NAME = /^[A-Za-z0-9._:-]+$/;

/** Checks a required name field. */
export function checkName(v: Violations, field: string, value: string, max = 128): void {
  if (value === "") v.add(field, "is required");
  else if (value.length > max) v.add(field, `must be at most ${max} characters (got ${value.length})`);
  else if (!NAME.test(value)) v.add(field, "may contain only letters, digits, '.', '_', '-' and ':'");
}

/**
 * A name given as a List or Watch filter: empty (no filter) or a name as
 * the calls that make them check it. A filter no name can match answered
 * an empty page, and the caller never heard of the typo.
 */
export function checkFilterName(field: string, value: string): void {
  if (value === "") return;
  const v = new Violations();
  checkName(v, field, value);
  v.throwIfAny();
}

/**
 * Checks the names a worker's hello carries (worker id, cluster, labels),
 * reporting each under the name `fields` gives it: the hello's field paths on
 * the server, the agent's options or flags before a hello is ever sent.
 */
export function checkWorkerNames(
  v: Violations,
  names: { readonly workerId: string; readonly cluster: string; readonly labels: Record<string, string> },
  fields: { readonly workerId: string; readonly cluster: string; readonly labels: string },
): void {
  checkName(v, fields.workerId, names.workerId);
  checkName(v, fields.cluster, names.cluster);
  checkLabels(v, fields.labels, names.labels);
}

/** Checks an optional free-form string's length. */
export function checkLength(v: Violations, field: string, value: string, max: number): void {
  const over = charactersOver(value, max);
  if (over !== undefined) v.add(field, `must be at most ${max} characters (got ${over})`);
}

/** Checks a required id field. */
export function requireId(field: string, value: string): string {
  if (value === "") throw LeaseholdError.invalidArgument(field, "is required");
  // No id is blank: one that looks given but is not must not read as an unknown id (NOT_FOUND).
  if (value.trim() === "")
    throw LeaseholdError.invalidArgument(field, "is required (it holds only whitespace)");
  if (charactersOver(value, 128) !== undefined)
    throw LeaseholdError.invalidArgument(field, "must be at most 128 characters");
  return value;
}

/** Checks a string map's keys and values. */
export function checkLabels(v: Violations, field: string, labels: Record<string, string>): void {
  const keys = Object.keys(labels);
  if (keys.length > 64) v.add(field, `must have at most 64 entries (got ${keys.length})`);
  for (const key of keys) {
    if (key === "" || key.length > 128 || !NAME.test(key)) {
      v.add(`${field}[${quote(key)}]`, "keys must be 1–128 letters, digits, '.', '_', '-' or ':'");
    } else if (charactersOver(labels[key] ?? "", 256) !== undefined) {
      v.add(`${field}[${quote(key)}]`, "values must be at most 256 characters");
    }
  }
}

/**
 * A duration field in milliseconds, or `fallback` when unset. Malformed
 * (nanos out of range, mixed signs), negative, shorter than `minMs` or
 * longer than `maxMs` is a violation: one, so that a field is never named
 * twice for one value (a negative probe timeout was also "at least 100ms").
 * The bounds are compared with the exact value, before it is rounded to
 * milliseconds (0.9995s is shorter than 1s). With `wholeMs`, for a value the
 * server keeps and shows in milliseconds (a lease's TTL), one that is not a
 * whole number of them is a violation too, rather than rounded.
 */
export function durationField(
  v: Violations,
  field: string,
  value: Duration | undefined,
  fallback: number,
  maxMs: number,
  minMs = 0,
  options: { readonly wholeMs?: boolean } = {},
): number {
  if (value === undefined) return fallback;
  const seconds = Number(value.seconds);
  if (
    value.nanos < -999_999_999 ||
    value.nanos > 999_999_999 ||
    (seconds > 0 && value.nanos < 0) ||
    (seconds < 0 && value.nanos > 0)
  ) {
    v.add(field, "is not a valid duration (nanos out of range or of the wrong sign)");
    return fallback;
  }
  const nanos = BigInt(value.seconds) * NANOS_PER_SECOND + BigInt(value.nanos);
  const ms = durationMs(value);
  if (nanos < 0n) v.add(field, "must not be negative");
  else if (nanos < BigInt(minMs) * NANOS_PER_MS)
    v.add(field, `must be at least ${minMs % 1000 === 0 ? `${minMs / 1000}s` : `${minMs}ms`}`);
  else if (Number.isFinite(maxMs) && nanos > BigInt(maxMs) * NANOS_PER_MS)
    v.add(field, `must be at most ${maxMs / 1000}s`);
  else if (options.wholeMs && nanos % NANOS_PER_MS !== 0n)
    v.add(field, `must be a whole number of milliseconds (got ${durationText(nanos)})`);
  return ms;
}

const NANOS_PER_SECOND = 1_000_000_000n;
const NANOS_PER_MS = 1_000_000n;

/** A non-negative duration of `nanos` as proto3 JSON writes it: `1.0000005s`, `2s`. */
function durationText(nanos: bigint): string {
  const fraction = (nanos % NANOS_PER_SECOND).toString().padStart(9, "0").replace(/0+$/, "");
  return `${nanos / NANOS_PER_SECOND}${fraction ? `.${fraction}` : ""}s`;
}

/**
 * Characters no file name may hold: C0 and C1 controls and DEL (a newline or
 * an escape sequence in a name forges lines and terminal output wherever it
 * is printed), the line and paragraph separators, and the bidirectional-text
 * controls (U+202E shows "txt.exe" as "exe.txt").
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching them is the point.
const FILE_NAME_FORBIDDEN = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/u;

/** What a file name is, said with every refusal of one. */
const FILE_NAME_RULE =
  'a file name is a relative path of "/"-separated segments, like "report.txt" or "logs/run-1.txt"';

/**
 * Checks a required file name (CreateFileRequest.name): at most `max`
 * characters; a relative path of "/"-separated segments, none of them empty,
 * "." or ".." (no leading or trailing "/", no "//"), without "\" and without
 * the characters of {@link FILE_NAME_FORBIDDEN}. Agents name a deployment's
 * outputs by their path under its outputs_dir, and whoever downloads a file
 * may write it under its name: one that climbs out of a directory, or prints
 * as something else, is refused rather than stored.
 */
export function checkFileName(v: Violations, field: string, name: string, max = 512): void {
  const problem = fileNameProblem(name, max);
  if (problem !== undefined) v.add(field, problem);
}

function fileNameProblem(name: string, max: number): string | undefined {
  if (name === "") return "is required";
  const over = charactersOver(name, max);
  if (over !== undefined) return `must be at most ${max} characters (got ${over})`;
  const forbidden = FILE_NAME_FORBIDDEN.exec(name);
  if (forbidden) {
    const code = `U+${(forbidden[0].codePointAt(0) ?? 0).toString(16).toUpperCase().padStart(4, "0")}`;
    return `must not contain control or bidirectional-text characters (it has ${code} at index ${forbidden.index}); ${FILE_NAME_RULE}`;
  }
  if (name.includes("\\")) return `must not contain "\\" (the separator is "/"); ${FILE_NAME_RULE}`;
  if (name.startsWith("/")) return `must be a relative path, not start with "/"; ${FILE_NAME_RULE}`;
  if (name.endsWith("/")) return `must name a file, not end with "/"; ${FILE_NAME_RULE}`;
  const bad = name.split("/").find((segment) => segment === "" || segment === "." || segment === "..");
  if (bad === undefined) return undefined;
  return `must not have ${bad === "" ? 'an empty segment ("//")' : `a "${bad}" segment`}; ${FILE_NAME_RULE}`;
}
