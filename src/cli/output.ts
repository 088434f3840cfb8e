import {
  type DescMessage,
  type JsonValue,
  type MessageShape,
  toJson as protoToJson,
} from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { type Command, InvalidArgumentError, Option } from "commander";
import { parseDuration } from "../config.js";
import { Code, LeaseholdError } from "../errors.js";
import { type Client, createClient, defaultDeadlinePassed, withDefaultDeadline } from "../rpc/client.js";
import { type ClientChannel, type ClientSecurity, clientChannel } from "../rpc/client-security.js";
import { withFailover } from "../rpc/failover.js";
import { errorInfoOf, errorReasonOf, receiveLimitOf } from "../rpc/status.js";
import { checkAddresses, expandAddresses, grpcTarget, splitAddresses } from "../rpc/targets.js";

/**
 * Exit codes of every `leasehold` command (also in `leasehold --help`):
 * 0 success; 1 the operation failed (server refused it, action failed);
 * 2 bad usage (flags, arguments); 3 the server is unreachable; 4 not found.
 */
export const EXIT = { ok: 0, failed: 1, usage: 2, unreachable: 3, notFound: 4 } as const;

let closedOutput: "exit" | "drop" = "exit";
let guarded = false;
let stdoutOpen = true;

/**
 * What happens when stdout is closed under us (EPIPE:
 * `leasehold events | head -1`, `… | grep -q X`, a log reader that died).
 * `"exit"` (commands): exit 0 quietly, like any Unix tool whose reader took
 * what it wanted. `"drop"` (`serve`): keep running and drop what would have
 * been written, so that a dead log pipe never wedges the server or its
 * shutdown. Any other stdout error exits 1 (commands) or is dropped (serve);
 * stderr errors are always dropped. Idempotent; the last mode wins.
 */
export function guardOutput(mode: "exit" | "drop"): void {
  closedOutput = mode;
  if (guarded) return;
  guarded = true;
  process.stdout.on("error", (error: NodeJS.ErrnoException) => {
    stdoutOpen = false;
    if (closedOutput === "drop") return;
    if (error.code === "EPIPE") process.exit(EXIT.ok);
    process.stderr.write(`leasehold: cannot write output: ${error.message}\n`);
    process.exit(EXIT.failed);
  });
  // Messages on a closed stderr are lost; the command still ends with its own exit code.
  process.stderr.on("error", () => {});
}

/**
 * A log destination (for pino) that writes to stdout until stdout is closed
 * and drops lines from then on. Writes are synchronous for pipes and files
 * (Node's stdout), so nothing is left to flush at exit.
 */
export const stdoutLines = {
  write(line: string): void {
    if (stdoutOpen) process.stdout.write(line);
  },
};

/** Global options every client command takes. */
export interface GlobalOptions {
  readonly server: string;
  readonly json: boolean;
  /** `--tls*`, `--token`, `--token-file` (or their LEASEHOLD_* variables); empty values count as unset. */
  readonly security: ClientSecurity;
  /** `--request-timeout` in milliseconds: each unary call's deadline; 0 for none. */
  readonly requestTimeoutMs: number;
}

/** What a switch's variable may say (any case, spaces around), and whether each is on. */
const SWITCH_WORDS: ReadonlyMap<string, boolean> = new Map([
  ["", false],
  ["0", false],
  ["false", false],
  ["no", false],
  ["off", false],
  ["1", true],
  ["true", true],
  ["yes", true],
  ["on", true],
]);

/**
 * Whether a switch's variable (`LEASEHOLD_TLS`, `LEASEHOLD_INSECURE`) says on: "1", "true",
 * "yes" or "on"; "", "0", "false", "no" or "off" say off. Any other value is a usage error
 * naming the variable: a typo must not turn a switch on (commander turns it on for any value).
 */
export function variableSwitch(name: string, value: string | undefined): boolean {
  const on = SWITCH_WORDS.get((value ?? "").trim().toLowerCase());
  if (on === undefined)
    throw new CliError(
      `${name}: ${JSON.stringify(value)} is neither on nor off; use 1, true, yes or on, or 0, false, no, off or empty`,
      EXIT.usage,
    );
  return on;
}

/** Where the CLI and agents go without --server (or with LEASEHOLD_SERVER empty). */
export const DEFAULT_SERVER = "127.0.0.1:50051";

export function globals(command: Command): GlobalOptions {
  const o = command.optsWithGlobals() as Record<string, string | boolean | undefined> & { server: string };
  const text = (v: string | boolean | undefined) => (typeof v === "string" && v !== "" ? v : undefined);
  // Commander turns a boolean on whenever its variable is set; LEASEHOLD_TLS="" (or "0", …) is off.
  const tls =
    command.getOptionValueSourceWithGlobals("tls") === "env"
      ? variableSwitch("LEASEHOLD_TLS", process.env.LEASEHOLD_TLS)
      : o.tls === true;
  // Given on the command line, though, an empty address is a mistake (an unset variable in a script).
  if (o.server === "" && command.getOptionValueSourceWithGlobals("server") === "cli")
    throw new CliError(`--server: must not be empty; omit it for ${DEFAULT_SERVER}`, EXIT.usage);
  return {
    // LEASEHOLD_SERVER="" is unset, as the other variables' empty values are.
    server: text(o.server) ?? DEFAULT_SERVER,
    json: Boolean(o.json),
    requestTimeoutMs: durationMsFlag("--request-timeout", text(o.requestTimeout) ?? "30s"),
    security: {
      tlsCa: text(o.tlsCa),
      tlsCert: text(o.tlsCert),
      tlsKey: text(o.tlsKey),
      tls,
      serverName: text(o.tlsServerName),
      token: text(o.token),
      tokenFile: text(o.tokenFile),
    },
  };
}

/**
 * The channel of the global security options for the `--server` addresses;
 * a malformed address, a bad combination or an unreadable file is a usage
 * error (exit 2) naming the flag, before any connection is tried.
 */
export function channelFor(options: GlobalOptions): ClientChannel {
  try {
    const addresses = splitAddresses(options.server);
    checkAddresses(addresses);
    return clientChannel(options.security, addresses);
  } catch (error) {
    throw usageError(error);
  }
}

/** An INVALID_ARGUMENT from option checks as a usage error (exit 2); anything else as it is. */
function usageError(error: unknown): unknown {
  return error instanceof LeaseholdError && error.code === Code.InvalidArgument
    ? new CliError(error.message, EXIT.usage)
    : error;
}

/** Opens a client of one service on the command's server, with its security. */
export type Connect = <S extends GenServiceMethods>(service: GenService<S>) => Client<S>;

/**
 * JSON with bigints as strings (for values that are not protobuf messages).
 * DEL, the C1 control characters and the bidirectional formatting ones
 * (see {@link terminalSafe}), which JSON.stringify leaves as they are, are
 * written as \u escapes like the C0 ones: the same JSON value, and
 * nothing in it a terminal would act on.
 */
export function toJson(value: unknown): string {
  return JSON.stringify(value, (_, v) => (typeof v === "bigint" ? v.toString() : v)).replace(
    DEL_C1_AND_BIDI,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/** One JSON value (toJson) on a line of stdout: what --json prints. */
export function printJson(value: unknown): void {
  process.stdout.write(`${toJson(value)}\n`);
}

// Control characters: C0 (U+0000–U+001F), DEL (U+007F) and C1 (U+0080–U+009F), ESC and CSI among them.
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching them is the point.
const CONTROLS = /[\u0000-\u001f\u007f-\u009f]/g;
// biome-ignore lint/suspicious/noControlCharactersInRegex: matching them is the point.
const CONTROLS_BUT_TAB_AND_NEWLINE = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g;
const DEL_C1_AND_BIDI = /[\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
// Bidirectional formatting characters (U+061C, U+200E–U+200F, U+202A–U+202E, U+2066–U+2069): not
// controls, but they reorder what a terminal shows after them (CVE-2021-42574, "Trojan Source").
const BIDI = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
const NAMED_CONTROLS: Readonly<Record<string, string>> = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };

/**
 * Text for a terminal, with its control characters shown escaped: `\n`,
 * `\r`, `\t`, and `\xNN` for the others (ESC is `\x1b`, C1's CSI `\x9b`).
 * Whatever a server sends (a lease's label, a container's stderr line, an
 * error message) may have been written by any submitter; printed raw, it
 * could clear the screen, move the cursor or rewrite what was printed before
 * it (kubectl's CVE-2021-25743). The bidirectional overrides and isolates
 * are shown as `\uNNNN`: raw, they make a terminal show text in another
 * order than it is (`evil\u202e1.0` reads as a harmless name). With
 * `keep: "lines"`, newlines and tabs stay
 * as they are, for text that is meant to span lines (an error listing its
 * problems one a line).
 */
export function terminalSafe(text: string, keep: "line" | "lines" = "line"): string {
  return text
    .replace(keep === "lines" ? CONTROLS_BUT_TAB_AND_NEWLINE : CONTROLS, (c) => {
      return NAMED_CONTROLS[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`;
    })
    .replace(BIDI, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/**
 * One line for people on stdout, its control characters escaped (see
 * {@link terminalSafe}): every human line a command prints that may hold
 * server-provided text goes through here or {@link printTable}.
 */
export function printLine(text = ""): void {
  process.stdout.write(`${terminalSafe(text)}\n`);
}

/** `leasehold: <message>` on stderr, control characters escaped but its lines kept (see {@link terminalSafe}). */
export function printError(message: string): void {
  process.stderr.write(`leasehold: ${terminalSafe(message, "lines")}\n`);
}

/** One protobuf message in the proto3 JSON mapping (what grpcurl prints, and other languages parse). */
export function messageJson<D extends DescMessage>(schema: D, message: MessageShape<D>): JsonValue {
  return protoToJson(schema, message);
}

/** Prints rows as an aligned table with a header; each cell is one line, control characters escaped. */
export function printTable(headers: readonly string[], rows: readonly (readonly string[])[]): void {
  const safe = rows.map((row) => row.map((cell) => terminalSafe(cell)));
  // Folded, not Math.max(...rows): a spread of 125,000 arguments overflows the stack.
  const widths = headers.map((h, i) =>
    safe.reduce((width, r) => Math.max(width, (r[i] ?? "").length), h.length),
  );
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join("  ")
      .trimEnd();
  process.stdout.write(`${line(headers)}\n`);
  for (const row of safe) process.stdout.write(`${line(row)}\n`);
}

/** An error that ends a command with a specific exit code and message. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message);
  }
}

/**
 * What Node's TLS says of a server certificate it does not trust (OpenSSL's
 * verify errors, as Node words them): a private or self-signed CA, an
 * expired certificate, one not meant for a server. Not the alerts a server
 * sends when it refuses the client's certificate ("alert certificate
 * required", "alert unknown ca"): there the server did not trust the client.
 */
const UNTRUSTED_CERTIFICATE =
  /self[- ]signed certificate|unable to get (local )?issuer certificate|unable to verify the first certificate|certificate (has expired|is not yet valid|signature failure|revoked)|unsuitable certificate purpose|invalid CA certificate/i;
/** Node's words for a certificate issued for another name than the one connected to. */
const NAME_MISMATCH = /does not match certificate's altnames/i;

/** Errors of calls that change nothing (a get, a wait): see {@link readOnly}. */
const readOnlyErrors = new WeakSet<object>();

/**
 * `call`, whose error (if it fails) is marked as a read-only call's: a call
 * that asks for no change (a get, a wait). {@link cliErrorFrom} then says that
 * running it again is safe, not that a change may or may not have been made.
 */
export async function readOnly<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (error) {
    if (typeof error === "object" && error !== null) readOnlyErrors.add(error);
    throw error;
  }
}

/** Maps a failed gRPC call to an exit code and a message that says what to do; a CliError stays as it is. */
export function cliErrorFrom(error: unknown, server: string): CliError {
  if (error instanceof CliError) return error;
  const e = error as { code?: number; details?: string; message?: string };
  // The server's own DEADLINE_EXCEEDED (what it waited for did not happen in time, e.g. outputs
  // not saved within --timeout) is the operation failing; the call's own deadline passing is not.
  if (e.code === 4 && errorReasonOf(error) !== undefined) return new CliError(e.details ?? "", EXIT.failed);
  // grpc-js's words for a request over the server's receive limit, before the server read it. Exit 1,
  // not 2: nothing was wrong with the command, this server's setting refused it (a file over its
  // --max-file-size exits 1 the same way; see uploadRefused).
  const receiveLimit = receiveLimitOf(error);
  if (receiveLimit !== undefined) {
    const size = /^Received message larger than max \((\d+) vs/.exec(e.details ?? "")?.[1];
    return new CliError(
      `the request${size ? ` (${size} bytes)` : ""} is too large for the server at ${server}: it refuses ` +
        `requests over ${receiveLimit} bytes (its --max-file-size plus 1 MiB); send less, or raise the ` +
        "server's --max-file-size",
      EXIT.failed,
    );
  }
  switch (e.code) {
    case 14:
    case 4: {
      // The server itself answered UNAVAILABLE (starting, its database unreachable): it runs.
      if (errorReasonOf(error) !== undefined)
        return new CliError(`the server at ${server} is unavailable: ${e.details}`, EXIT.unreachable);
      const why = unreachableWhy(error);
      // The server answered, but TLS refused its certificate: whether it runs is not the question.
      if (NAME_MISMATCH.test(why)) {
        return new CliError(
          `the server at ${server} answered, but its certificate was not trusted (${why}): it does not ` +
            "name the host of --server; connect by a name it holds, or pass --tls-server-name <name> with one " +
            "(and --tls-ca <ca.pem> if a private CA signed it)",
          EXIT.unreachable,
        );
      }
      if (UNTRUSTED_CERTIFICATE.test(why) && !/\balert\b/.test(why)) {
        return new CliError(
          `the server at ${server} answered, but its certificate was not trusted (${why}): pass ` +
            "--tls-ca <ca.pem> with the CA that signed it (--tls alone trusts only the system's CAs), and " +
            "--tls-server-name <name> if it was issued for another name than the host of --server",
          EXIT.unreachable,
        );
      }
      // OpenSSL's alert from a server that refused the client's certificate, or wanted one.
      const alert =
        /\b(tlsv1\d? alert (certificate required|unknown ca|bad certificate|certificate unknown|certificate expired|certificate revoked))\b/i.exec(
          why,
        )?.[1];
      if (alert !== undefined) {
        return new CliError(
          `the server at ${server} refused the TLS connection (${alert}): it wants a client certificate it ` +
            "trusts; pass --tls-cert <cert.pem> and --tls-key <key.pem> with one its client CA signed",
          EXIT.unreachable,
        );
      }
      // The connection was there and the request sent, then it broke before the answer (a server
      // killed or restarted mid-call): the server may have applied it. "Is it running?" would read
      // as "nothing happened", and a change (a commit, a collect) may well have been made.
      if (e.code === 14 && !neverSent(error)) {
        if (readOnlyErrors.has(error as object))
          return new CliError(
            `the connection to the server at ${server} broke during the call (${why}): it asked for no ` +
              "change, so running it again once the server is back is safe",
            EXIT.unreachable,
          );
        return new CliError(
          `the connection to the server at ${server} broke during the call (${why}), after the request was sent: ` +
            "the outcome of a change it asked for is unknown (it may or may not have been made); check " +
            "(e.g. with a get) before running it again (with --request-id a submit is not made twice)",
          EXIT.unreachable,
        );
      }
      // What grpc-js says when the TCP connection opened but the HTTP/2 handshake failed: most
      // often a plaintext client meeting a TLS port.
      const tls = /^Failed to connect/.test(why)
        ? "; if it serves TLS, pass --tls-ca <ca.pem> (or --tls for a public CA)"
        : "";
      return new CliError(
        `cannot reach the server at ${server} (${why}); is it running? (--server)${tls}`,
        EXIT.unreachable,
      );
    }
    case 1:
      // Not the user's Ctrl-C, which ends the process: the server (stopping) or the connection ended the call.
      return new CliError(
        `the call to the server at ${server} ended before its answer (${e.details || "cancelled"}; the server may be stopping): ` +
          "a change it asked for may or may not have been made; run it again (with --request-id a submit is not made twice)",
        EXIT.unreachable,
      );
    case 5:
      return new CliError(e.details ?? "not found", EXIT.notFound);
    case 7: {
      // A list refused for naming no cluster names the request's field (cluster, runtime): the
      // commands' flags have the same names.
      const field = errorInfoOf(error)?.metadata.filter;
      const flag = field ? ` (leasehold: --${field} <name>)` : "";
      return new CliError(`${e.details ?? e.message ?? String(error)}${flag}`, EXIT.failed);
    }
    case 3:
      return new CliError(e.details ?? "invalid argument", EXIT.usage);
    default:
      return new CliError(e.details ?? e.message ?? String(error), EXIT.failed);
  }
}

/**
 * The error of an upload (`what`: the file as the user named it, `sizeBytes`
 * its size) that the server refused for its size, said with the file's path
 * and the limit: over its receive limit, grpc-js answers RESOURCE_EXHAUSTED
 * "Received message larger than max (5000015 vs 4194304)" before the server
 * reads it, naming neither the file nor the setting behind it; over
 * --max-file-size but within the receive limit, the server answers
 * FILE_TOO_LARGE with its limit (ErrorInfo `limit_bytes`), naming the file
 * by the name it was to be stored as. Any other error is returned as it is.
 * `exitCode` is the refusal's (default 1; `lease run` gives 2: the manifest
 * names a fixture this server cannot take).
 */
export function uploadRefused(
  error: unknown,
  what: string,
  sizeBytes: number,
  exitCode: number = EXIT.failed,
): unknown {
  const advice = "upload a smaller file, or raise the server's --max-file-size";
  const limit = receiveLimitOf(error);
  if (limit !== undefined) {
    return new CliError(
      `${what} (${sizeBytes} bytes) is too large for the server: it refuses requests over ${limit} bytes ` +
        `(its --max-file-size plus 1 MiB); ${advice}`,
      exitCode,
    );
  }
  const info = (error as { code?: number }).code === 8 ? errorInfoOf(error) : undefined;
  const fileLimit = Number(info?.metadata.limit_bytes);
  if (info?.reason === "FILE_TOO_LARGE" && Number.isSafeInteger(fileLimit)) {
    return new CliError(
      `${what} (${sizeBytes} bytes) is too large for the server: it accepts files of at most ${fileLimit} bytes ` +
        `(its --max-file-size); ${advice}`,
      exitCode,
    );
  }
  return error;
}

/**
 * Whether a failed call never reached a server, so that nothing it asked for
 * can have been applied: grpc-js's UNAVAILABLE before any connection (none
 * established, the name not resolved). Any other UNAVAILABLE without a
 * server's reason (the connection dropped, reset) came after the request
 * was sent.
 */
export function neverSent(error: unknown): boolean {
  const e = error as { code?: number; details?: string };
  return e.code === 14 && /^(No connection established|Name resolution failed)/.test(e.details ?? "");
}

/**
 * Why grpc-js could not reach a server, in words a user reads: its details
 * without the parts that say nothing ("Last error: Error: ", an empty
 * "Resolution note: ").
 */
export function unreachableWhy(error: unknown): string {
  const e = error as { details?: string; message?: string };
  return (typeof error === "string" ? error : (e.details ?? e.message ?? String(error)))
    .replace(/^\d+ [A-Z_]+: /, "")
    .replace(/\.? ?Resolution note: ?$/, "")
    .replace(/^No connection established\. Last error: (Error( \[[A-Z_]+\])?: )?/, "")
    .trim();
}

/** Short enum names: ACTION_STATE_QUEUED → QUEUED, given the generated enum. */
export function enumName(enumObject: Record<number, string>, value: number): string {
  return enumObject[value] ?? String(value);
}

/** A count with its noun, singular for one: "1 resource", "0 resources", "2 closed leases". */
export function count(n: number | bigint, noun: string): string {
  return `${n} ${noun}${n === 1 || n === 1n ? "" : "s"}`;
}

/** RFC 3339 for a protobuf Timestamp, or "-". */
export function time(ts: { seconds: bigint; nanos: number } | undefined): string {
  return ts ? new Date(Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6)).toISOString() : "-";
}

/**
 * How long before `now` a protobuf Timestamp was, in its largest whole unit:
 * "3s ago", "5m ago", "2h ago", "4d ago"; "-" when unset. Measured on this
 * machine's clock: a time a little ahead of it (clocks a second apart) is "0s ago".
 */
export function age(ts: { seconds: bigint; nanos: number } | undefined, now: Date = new Date()): string {
  if (!ts) return "-";
  const seconds = Math.max(
    0,
    Math.floor((now.getTime() - (Number(ts.seconds) * 1000 + ts.nanos / 1e6)) / 1000),
  );
  if (seconds < 120) return `${seconds}s ago`;
  if (seconds < 2 * 3600) return `${Math.floor(seconds / 60)}m ago`;
  if (seconds < 2 * 86_400) return `${Math.floor(seconds / 3600)}h ago`;
  return `${Math.floor(seconds / 86_400)}d ago`;
}

/** Parses repeated `k=v` flags into a map. */
export function parseLabels(values: readonly string[] | undefined, flag: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const item of values ?? []) {
    const at = item.indexOf("=");
    if (at <= 0) throw new CliError(`${flag} ${JSON.stringify(item)}: expected key=value`, EXIT.usage);
    labels[item.slice(0, at)] = item.slice(at + 1);
  }
  return labels;
}

/** Collects a repeatable option's values. */
export const collect = (value: string, previous: string[] = []) => [...previous, value];

/**
 * A duration flag's value in milliseconds (`500ms`, `10s`); malformed, or
 * over `maxMs` (the server's limit of the field it goes to, said as `why`),
 * is bad usage naming the flag.
 */
export function durationMsFlag(
  flag: string,
  text: string,
  options: { wholeMs?: boolean; maxMs?: number; why?: string } = {},
): number {
  let ms: number;
  try {
    ms = parseDuration(flag, text, options);
  } catch (error) {
    throw new CliError(error instanceof Error ? error.message : String(error), EXIT.usage);
  }
  if (options.maxMs !== undefined && ms > options.maxMs) {
    throw new CliError(
      `${flag}: must be at most ${durationText(options.maxMs)}${options.why ? ` (${options.why})` : ""} (got ${JSON.stringify(text)})`,
      EXIT.usage,
    );
  }
  return ms;
}

/** Milliseconds as a duration flag takes them, in the largest unit that holds them whole: 24h, 90m, 1500ms. */
export function durationText(ms: number): string {
  for (const [unit, size] of [
    ["h", 3_600_000],
    ["m", 60_000],
    ["s", 1000],
  ] as const) {
    if (ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}

/** Parses a whole number of at least 1; commander reports a bad value as a usage error. */
export function positiveIntFlag(value: string): number {
  const n = intFlag(value);
  if (n < 1) throw new InvalidArgumentError("expected a whole number of at least 1");
  return n;
}

/** Parses a whole number of at least 0; commander reports a bad value as a usage error. */
export function nonNegativeIntFlag(value: string): number {
  const n = intFlag(value);
  if (n < 0) throw new InvalidArgumentError("expected a whole number of at least 0");
  return n;
}

/** Parses an integer flag; commander reports a bad value as a usage error. */
export function intFlag(value: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isInteger(n)) throw new InvalidArgumentError("expected a whole number");
  return n;
}

/**
 * A filter option over a generated enum (`--state <state>`): its choices are
 * the enum's names but UNSPECIFIED, in lower case as --help lists them, and
 * either case is accepted, as tables print them in upper case. Its value is
 * the enum's number.
 */
export function enumFilterOption(
  flags: string,
  description: string,
  enumObject: Readonly<Record<string, string | number>>,
): Option {
  const names = Object.keys(enumObject).filter((k) => Number.isNaN(Number(k)) && k !== "UNSPECIFIED");
  const choices = names.map((name) => name.toLowerCase());
  return new Option(flags, `${description}, in any case`).choices(choices).argParser((value: string) => {
    const name = value.toUpperCase();
    const number = enumObject[name];
    if (!names.includes(name) || typeof number !== "number")
      throw new InvalidArgumentError(`Allowed choices are ${choices.join(", ")}.`);
    return number;
  });
}

/** How many items a listing command shows without `--limit`. */
export const LIST_LIMIT = 100;

/** The `--limit <n>` option of a listing command; `when` prefixes its help (e.g. "without --follow: "). */
export function limitOption(when = ""): Option {
  return new Option("--limit <n>", `${when}at most this many (default ${LIST_LIMIT})`).argParser(
    positiveIntFlag,
  );
}

/**
 * The first `limit` (default {@link LIST_LIMIT}) items of a paged List call,
 * read a page at a time (at most 1,000 each, the server's largest page):
 * `call` asks for one page, `itemsOf` takes its items from the answer. When
 * items are left over, stderr says so, e.g. "leasehold: showing the oldest 2
 * actions; there are more (raise --limit)": `order` says which end was shown,
 * `noun` what one item is, `hint` how to see the rest; `quiet` says nothing
 * (a follow that starts with the latest items, as `tail -f` does).
 */
export async function listUpTo<R extends { readonly nextPageToken: string }, T>(
  limit: number | undefined,
  call: (page: { pageSize: number; pageToken: string }) => Promise<R>,
  itemsOf: (response: R) => readonly T[],
  shown: {
    readonly order: "oldest" | "newest" | "first";
    readonly noun: string;
    readonly hint?: string;
    readonly quiet?: boolean;
  },
): Promise<T[]> {
  const most = limit ?? LIST_LIMIT;
  const items: T[] = [];
  let pageToken = "";
  do {
    const response = await call({ pageSize: Math.min(1000, most - items.length), pageToken });
    items.push(...itemsOf(response));
    pageToken = response.nextPageToken;
  } while (pageToken && items.length < most);
  if (pageToken && !shown.quiet)
    process.stderr.write(
      `leasehold: showing the ${shown.order} ${count(items.length, shown.noun)}; there are more ` +
        `(${shown.hint ?? "raise --limit"})\n`,
    );
  return items;
}

/**
 * Whether a call failed because the server went away (a restart, a failover):
 * UNAVAILABLE, or a stream reset by a server going down mid-call.
 */
export function serverGoneAway(error: unknown): boolean {
  const e = error as { code?: number; details?: string };
  return e.code === 14 || (e.code === 13 && /RST_STREAM/.test(e.details ?? ""));
}

/**
 * Runs a stream-following call again whenever the server becomes unreachable
 * (a restart, a failover to another replica), waiting `delayMs` between
 * tries. Other errors end it. stderr gets one line when the server goes away
 * and one when `follow` reports, by calling `connected`, that it reached a
 * server again: not one per try.
 */
export async function followThroughRestarts(
  follow: (connected: () => void) => Promise<"done" | "again">,
  delayMs = 1000,
): Promise<void> {
  let away = false;
  let reached = false;
  const connected = () => {
    reached = true;
    if (away) process.stderr.write("leasehold: server back; following again\n");
    away = false;
  };
  for (let tries = 0; ; tries++) {
    try {
      if ((await follow(connected)) === "done") return;
    } catch (error) {
      if (!serverGoneAway(error)) throw error;
      const e = error as { details?: string };
      // Never reached at all: a wrong address or a server that is not running ends the command
      // (exit 3), as every other command does; only a server that went away is waited for.
      if (
        tries === 0 &&
        !reached &&
        /^(No connection established|Name resolution failed)/.test(e.details ?? "")
      )
        throw error;
      if (!away)
        printError(`server unavailable (${unreachableWhy(error)}); reconnecting every ${delayMs / 1000} s`);
      away = true;
    }
    await new Promise((r) => setTimeout(r, delayMs));
  }
}

/**
 * The frame of every client command: opens the clients for `--server` (with
 * `connect`, which applies the TLS and token options), runs `fn`, turns a
 * failed call into the exit code and message of {@link cliErrorFrom}, and
 * closes the clients. A number `fn` returns becomes the exit code.
 */
export async function withServer<C extends Record<string, { close(): void }>>(
  command: Command,
  open: (connect: Connect) => C,
  fn: (clients: C, options: GlobalOptions) => Promise<unknown>,
): Promise<void> {
  const g = globals(command);
  const channel = channelFor(g);
  const target = await grpcTarget(g.server);
  const addresses = await expandAddresses(splitAddresses(g.server));
  const clients = open((service) =>
    withDefaultDeadline(
      service,
      withFailover(
        service,
        createClient(service, target, channel.credentials, channel.options, channel.interceptors),
        addresses,
        (address) =>
          createClient(service, address, channel.credentials, channel.options, channel.interceptors),
      ),
      g.requestTimeoutMs,
    ),
  );
  try {
    const code = await fn(clients, g);
    if (typeof code === "number" && code !== EXIT.ok) process.exitCode = code;
  } catch (error) {
    if (defaultDeadlinePassed(error))
      throw new CliError(
        `the server at ${g.server} did not answer within ${g.requestTimeoutMs / 1000} s (--request-timeout): ` +
          "it may be overloaded or hung; a change it asked for may or may not have been made; run it again " +
          "(with --request-id a submit is not made twice)",
        EXIT.unreachable,
      );
    throw error instanceof CliError ? error : cliErrorFrom(error, g.server);
  } finally {
    for (const client of Object.values(clients)) client.close();
  }
}
