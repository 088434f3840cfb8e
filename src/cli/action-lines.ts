import { create, fromJson, type JsonValue, toBinary } from "@bufbuild/protobuf";
import { isCommandTimeout, MAX_COMMAND_TIMEOUT_SECONDS } from "../agent/command-handler.js";
import {
  RetryPolicySchema,
  type SubmitActionRequest,
  SubmitActionRequestSchema,
} from "../gen/leasehold/v1/action_pb.js";
import { CliError, EXIT } from "./output.js";

/** Most actions one SubmitActions call takes (action.proto). */
export const MAX_ACTIONS_PER_CALL = 1000;
/**
 * Most bytes of actions the CLI puts in one call: under the server's default
 * receive limit (--max-file-size 3 MiB + 1 MiB), with room for framing.
 */
export const MAX_BYTES_PER_CALL = 3 * 1024 * 1024;

/** What `leasehold action submit` flags give every line of `--from` that leaves it out. */
export interface LineDefaults {
  readonly cluster?: string | undefined;
  readonly labels: Readonly<Record<string, string>>;
  readonly priority?: number | undefined;
  readonly runId?: string | undefined;
  readonly maxAttempts?: number | undefined;
  readonly timeout?: number | undefined;
}

/** One parsed line: the request and the (1-based) line it came from. */
export interface ActionLine {
  readonly line: number;
  readonly request: SubmitActionRequest;
}

/**
 * Parses NDJSON, one action per line, into SubmitActionRequests; blank lines
 * are skipped. A line is the proto3 JSON of a SubmitActionRequest (`cluster`,
 * `requestId`, `runId`, `labelSelector`, `payload`, `priority`,
 * `retryPolicy`, `maxSystemRetries`; snake_case names work too), with the
 * single submit's shorthands: `argv` (the command, as after `--`; becomes
 * the payload `{argv}`), `timeout` (seconds, with `argv`) and `maxAttempts`
 * (`retryPolicy.maxAttempts`). `defaults` fill what a line leaves out; label
 * flags add to a line's labelSelector. A bad line is a usage error naming
 * its line number.
 */
export function parseActionLines(text: string, defaults: LineDefaults): ActionLine[] {
  const out: ActionLine[] = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const raw = (lines[i] as string).trim();
    if (raw === "") continue;
    try {
      out.push({ line: i + 1, request: parseLine(raw, defaults) });
    } catch (error) {
      throw new CliError(`line ${i + 1}: ${(error as Error).message}`, EXIT.usage);
    }
  }
  if (out.length === 0) throw new CliError("no actions to submit: the input has no lines", EXIT.usage);
  // Checked over the whole input before anything is sent: the server would find a repeat only
  // within one call of 1,000, after the calls before it were submitted.
  const firstLineOf = new Map<string, number>();
  for (const { line, request } of out) {
    if (request.requestId === "") continue;
    const first = firstLineOf.get(request.requestId);
    if (first !== undefined) {
      throw new CliError(
        `line ${line}: request id ${JSON.stringify(request.requestId)} repeats line ${first}'s: give each line its own`,
        EXIT.usage,
      );
    }
    firstLineOf.set(request.requestId, line);
  }
  return out;
}

function parseLine(raw: string, defaults: LineDefaults): SubmitActionRequest {
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch (error) {
    throw new Error(`not valid JSON (${(error as Error).message})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error('must be a JSON object, e.g. {"cluster": "east", "argv": ["make", "test"]}');
  }
  const { argv, timeout, maxAttempts, max_attempts, ...rest } = value as Record<string, unknown>;
  const has = (...keys: string[]) => keys.some((k) => Object.hasOwn(rest, k));
  if (argv !== undefined) {
    if (!Array.isArray(argv) || argv.length === 0 || !argv.every((a) => typeof a === "string")) {
      throw new Error('"argv" must be a non-empty list of strings');
    }
    if (has("payload")) throw new Error('give either "argv" or "payload", not both');
  } else if (timeout !== undefined) {
    throw new Error('"timeout" goes with "argv" (the reference agent kills the command after it)');
  }
  if (timeout !== undefined && (typeof timeout !== "number" || !isCommandTimeout(timeout))) {
    throw new Error(`"timeout" must be a whole number of seconds, 1 to ${MAX_COMMAND_TIMEOUT_SECONDS}`);
  }
  const attempts = maxAttempts ?? max_attempts;
  if (attempts !== undefined && (typeof attempts !== "number" || !Number.isInteger(attempts))) {
    throw new Error('"maxAttempts" must be a whole number');
  }
  let request: SubmitActionRequest;
  try {
    request = fromJson(SubmitActionRequestSchema, rest as JsonValue);
  } catch (error) {
    // protobuf-es says "cannot decode message leasehold.v1.SubmitActionRequest from JSON: …".
    throw new Error((error as Error).message.replace(/^cannot decode message \S+ from JSON: /, ""));
  }
  if (request.cluster === "") {
    if (!defaults.cluster) throw new Error('no cluster: give "cluster" on the line, or --cluster');
    request.cluster = defaults.cluster;
  }
  if (argv !== undefined) {
    const seconds = timeout ?? defaults.timeout;
    request.payload = { argv, ...(seconds !== undefined ? { timeout: seconds } : {}) };
  } else if (!has("payload")) {
    throw new Error('nothing to run: give "argv" (a command) or "payload"');
  }
  request.labelSelector = { ...defaults.labels, ...request.labelSelector };
  if (!has("priority") && defaults.priority !== undefined) request.priority = defaults.priority;
  if (!has("runId", "run_id") && defaults.runId !== undefined) request.runId = defaults.runId;
  if (attempts !== undefined && request.retryPolicy?.maxAttempts) {
    throw new Error('give either "maxAttempts" or "retryPolicy.maxAttempts", not both');
  }
  const maxAttemptsOf = (attempts as number | undefined) ?? defaults.maxAttempts;
  if (maxAttemptsOf !== undefined && !request.retryPolicy?.maxAttempts) {
    request.retryPolicy ??= create(RetryPolicySchema);
    request.retryPolicy.maxAttempts = maxAttemptsOf;
  }
  return request;
}

/**
 * Splits parsed lines into calls of at most {@link MAX_ACTIONS_PER_CALL}
 * actions and about {@link MAX_BYTES_PER_CALL} bytes each, in order.
 */
export function chunkActionLines(lines: readonly ActionLine[]): ActionLine[][] {
  const chunks: ActionLine[][] = [];
  let current: ActionLine[] = [];
  let bytes = 0;
  for (const item of lines) {
    // The item's bytes plus its field tag and length prefix.
    const size = toBinary(SubmitActionRequestSchema, item.request).length + 6;
    if (current.length > 0 && (current.length >= MAX_ACTIONS_PER_CALL || bytes + size > MAX_BYTES_PER_CALL)) {
      chunks.push(current);
      current = [];
      bytes = 0;
    }
    current.push(item);
    bytes += size;
  }
  if (current.length > 0) chunks.push(current);
  return chunks;
}
