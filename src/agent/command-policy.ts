import { matchesGlob } from "../auth/access.js";
import { quote } from "../errors.js";
import { ActionFailure } from "./agent.js";

/**
 * Which commands an agent runs: `"any"`, or globs matched against a
 * command's line, its argv joined with single spaces (`*` matches any run of
 * characters, spaces and `/` included; `?` one character). `["/bin/echo *"]`
 * allows `/bin/echo hi there` but not `echo hi` or `/bin/echo` alone;
 * `["python3 /opt/jobs/*"]` allows every script under /opt/jobs with any
 * arguments. An empty list allows nothing.
 */
export type CommandAllowList = "any" | readonly string[];

/** How many globs a refusal lists before "and N more". */
const LISTED = 5;

/** The line a command's argv is matched as: its arguments joined with single spaces. */
export function commandLine(argv: readonly string[]): string {
  return argv.join(" ");
}

/** Whether `argv` may run under `allow`. */
export function isCommandAllowed(argv: readonly string[], allow: CommandAllowList): boolean {
  if (allow === "any") return true;
  const line = commandLine(argv);
  return allow.some((glob) => matchesGlob(glob, line));
}

/**
 * Throws a non-retryable {@link ActionFailure} unless `argv` may run: another
 * attempt on this agent would be refused the same way.
 */
export function requireAllowedCommand(argv: readonly string[], allow: CommandAllowList): void {
  if (isCommandAllowed(argv, allow)) return;
  const globs = allow === "any" ? [] : allow;
  const listed = globs.slice(0, LISTED).map((g) => quote(g));
  if (globs.length > LISTED) listed.push(`and ${globs.length - LISTED} more`);
  throw new ActionFailure(
    `command ${quote(commandLine(argv))} is not allowed on this agent (allowed: ${listed.join(", ") || "none"}; see --allow-command)`,
    { retryable: false },
  );
}
