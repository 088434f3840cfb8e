import { create } from "@bufbuild/protobuf";
import { ConnectRequestSchema } from "../gen/leasehold/v1/worker_pb.js";
import { charactersOver, PAYLOAD_LIMITS } from "../rpc/limits.js";
import { requestValidator } from "../rpc/request-validator.js";
import type { JsonObject } from "../work/action.js";

/**
 * The server refuses a report that breaks its limits (ReportResult INVALID;
 * an older server ended the stream instead, and a report the SDK sent again
 * after every reconnect then ended every stream: a poison pill).
 * So reports are fitted to the limits before they are sent, with the
 * server's own check; one refused anyway becomes a failure (see agent.ts).
 */
const check = requestValidator(ConnectRequestSchema);

/** U+0000 cannot be stored in PostgreSQL text or jsonb; command output may contain it. */
const REPLACEMENT = "\uFFFD";

/** A copy of `value` with every NUL replaced by U+FFFD (the string itself when it has none). */
export function scrubNul(value: string): string {
  return value.includes("\u0000") ? value.replaceAll("\u0000", REPLACEMENT) : value;
}

/** What a handler hands over as JSON that is not, in words (the `…` of "output.at is …"). */
function notJson(value: unknown): string | undefined {
  switch (typeof value) {
    case "string":
    case "boolean":
      return undefined;
    case "number":
      return Number.isFinite(value) ? undefined : `${value}, not a finite number`;
    case "bigint":
      return "a bigint";
    case "function":
      return "a function";
    case "symbol":
      return "a symbol";
    case "undefined":
      return "undefined";
    default: {
      if (value === null || Array.isArray(value)) return undefined;
      const proto = Object.getPrototypeOf(value);
      if (proto === Object.prototype || proto === null) return undefined;
      const name = (proto as { constructor?: { name?: unknown } }).constructor?.name;
      return typeof name === "string" && name !== "" ? `a ${name}` : "an object that is not a plain one";
    }
  }
}

/** `base.key`, or `base["key"]` when the key is not a plain name. */
const child = (base: string, key: string) =>
  /^[A-Za-z_$][\w$]*$/.test(key) ? `${base}.${key}` : `${base}[${JSON.stringify(key)}]`;

/**
 * A handler's output, or an ActionFailure's details, as JSON that can be
 * sent: a copy with every NUL in strings and keys replaced by U+FFFD and
 * properties set to undefined left out (as JSON.stringify does), or, when
 * it is not JSON, why, naming where (`output.res.req is circular: …`).
 * Handlers return whatever they like, and a value that is not JSON used to
 * be turned into something else without a word (a Date into {}, 10n into
 * null) or, when circular, to crash the agent: the caller fails the action
 * with this message instead. The walk stops below the depth the server
 * takes (PAYLOAD_LIMITS.depth), so it is bounded whatever it is given.
 * Undefined and null at the top are no value at all.
 */
export function toJson(value: unknown, name: string): { json: JsonObject | undefined } | { problem: string } {
  if (value === undefined || value === null) return { json: undefined };
  if (typeof value !== "object" || Array.isArray(value) || notJson(value) !== undefined) {
    const what = Array.isArray(value) ? "an array" : (notJson(value) ?? `a ${typeof value}`);
    return { problem: `${name} is ${what}: return a JSON object (or nothing)` };
  }
  const ancestors: { value: object; path: string }[] = [];
  let problem: string | undefined;
  const copy = (v: unknown, path: string, depth: number): unknown => {
    const wrong = notJson(v);
    if (wrong !== undefined) {
      problem = `${path} is ${wrong}, which JSON cannot hold: return JSON values (objects, arrays, strings, finite numbers, booleans, null)`;
      return undefined;
    }
    if (typeof v === "string") return scrubNul(v);
    if (v === null || typeof v !== "object") return v;
    const loop = ancestors.find((a) => a.value === v);
    if (loop) {
      problem = `${path} is circular: it is ${loop.path} again`;
      return undefined;
    }
    // Too deep for the server: left as it is, for reportViolation to name as a broken limit
    // (its walk stops at this depth too).
    if (depth > PAYLOAD_LIMITS.depth) return v;
    ancestors.push({ value: v, path });
    let out: unknown;
    if (Array.isArray(v)) {
      const list: unknown[] = [];
      for (let i = 0; i < v.length && problem === undefined; i++)
        list.push(copy(v[i], `${path}[${i}]`, depth + 1));
      out = list;
    } else {
      const object: JsonObject = {};
      for (const [k, item] of Object.entries(v)) {
        if (problem !== undefined) break;
        if (item === undefined) continue;
        object[scrubNul(k)] = copy(item, child(path, k), depth + 1);
      }
      out = object;
    }
    ancestors.pop();
    return out;
  };
  try {
    const json = copy(value, name, 1) as JsonObject;
    return problem === undefined ? { json } : { problem };
  } catch (error) {
    // A getter or a proxy that throws.
    return {
      problem: `${name} could not be read: ${error instanceof Error ? error.message : String(error)}`,
    };
  }
}

/**
 * `message` cut to at most `max` characters (as the server counts them: code
 * points), saying how many were cut, so that a long error still reaches the
 * server with its beginning, which usually says what went wrong.
 */
export function cutToFit(message: string, max: number): string {
  if (charactersOver(message, max) === undefined) return message;
  // Code points never outnumber UTF-16 units: cutting by units leaves at most `keep` characters.
  const note = (n: number) => `… (${n} characters cut)`;
  let keep = max - note(message.length).length;
  const code = message.charCodeAt(keep - 1);
  if (code >= 0xd800 && code <= 0xdbff) keep -= 1;
  const rest = message.slice(keep);
  let cut = 0;
  for (const _ of rest) cut++;
  return `${message.slice(0, keep)}${note(cut)}`;
}

/** Why `message` would be refused, or undefined when it fits. */
export function reportViolation(
  message: Parameters<typeof create<typeof ConnectRequestSchema>>[1],
): string | undefined {
  return check(create(ConnectRequestSchema, message))?.message;
}
