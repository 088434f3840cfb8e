import { accessSync, constants, statSync } from "node:fs";
import { delimiter, isAbsolute, join } from "node:path";
import { matchesGlob } from "../auth/access.js";
import { quote } from "../errors.js";
import { ActionFailure } from "./agent.js";

/**
 * Which commands an agent runs: `"any"`, or globs matched against a
 * command's line, its argv joined with single spaces (`*` matches any run of
 * characters, spaces and `/` included; `?` one character), with argv[0] as
 * the payload wrote it. `["/bin/echo *"]` allows `/bin/echo hi there` but not
 * `echo hi` or `/bin/echo` alone; `["echo *"]` allows `echo hi`, which runs the
 * `echo` the agent's own PATH finds. `["python3 /opt/jobs/*"]` allows the
 * agent's `python3` with a first argument that starts with `/opt/jobs/`,
 * followed by any arguments; an argument with a `..` segment is always refused
 * under a list (see {@link hasDotDotSegment}), so it cannot climb out of
 * `/opt/jobs` (a symbolic link inside it still can). An empty list allows
 * nothing.
 */
export type CommandAllowList = "any" | readonly string[];

/**
 * What an agent lets a payload run: which commands, which environment
 * variables it may set and in which working directories it may run.
 * Under `commands: "any"` everything is allowed and `env`/`cwd` are not
 * consulted. Under a list of globs:
 *
 * - the line matches one of `commands` (see {@link CommandAllowList}),
 *   argv[0] has no space, and no argv element has a `..` segment;
 * - a bare argv[0] (no `/`) is resolved against the agent's own PATH (never
 *   the payload's) to the absolute path that is spawned; a name found there
 *   nowhere fails the action;
 * - every variable name the payload sets matches one of `env` (exact,
 *   case-sensitive); a {@link GUARDED_ENV} name must be listed there exactly,
 *   a glob never allows it;
 * - a payload `cwd` matches one of `cwd` (as written) and has no `..`
 *   segment. Deployments always run in their own work directory, so only
 *   command actions use it.
 *
 * Refusals fail the action before anything starts, not retryable.
 */
export interface CommandPolicy {
  /** `"any"`, or the globs the command line must match. */
  readonly commands: CommandAllowList;
  /** Globs of the environment variable names a payload may set; empty: none. */
  readonly env: readonly string[];
  /** Globs of the working directories a command payload may name; empty: none. */
  readonly cwd: readonly string[];
}

/**
 * Environment variables that change which code a program loads or runs
 * (dynamic loader hooks, shell startup files and exported functions,
 * interpreter module paths and startup options, tools that run commands from
 * their configuration, the PATH that bare names are looked up in). Under a
 * {@link CommandPolicy} list, a name matching one of these is allowed only when
 * {@link CommandPolicy.env} names it exactly: `--allow-env '*'` does not let
 * `LD_PRELOAD` through, `--allow-env LD_PRELOAD` does. The list is the known
 * hooks, not a proof that every other variable is harmless: prefer exact
 * names in `env` to globs.
 */
export const GUARDED_ENV: readonly string[] = Object.freeze([
  // Dynamic loaders (glibc, macOS) and glibc's charset-conversion modules: injected shared objects.
  "LD_*",
  "DYLD_*",
  "GCONV_PATH",
  // Shells: startup files, exported functions, tracing that expands commands, lookup paths.
  "BASH_ENV",
  "ENV",
  "BASH_FUNC_*",
  "SHELLOPTS",
  "BASHOPTS",
  "PS4",
  "IFS",
  "CDPATH",
  "ZDOTDIR",
  "PATH",
  // Interpreters: module paths, startup files and options that load code.
  "NODE_OPTIONS",
  "NODE_PATH",
  "PYTHON*", // PYTHONPATH, PYTHONSTARTUP, PYTHONHOME, PYTHONWARNINGS (imports), PYTHONBREAKPOINT, …
  "PERL5LIB",
  "PERL5OPT",
  "PERLLIB",
  "PERL5DB",
  "RUBYOPT",
  "RUBYLIB",
  "JAVA_TOOL_OPTIONS",
  "_JAVA_OPTIONS",
  "JDK_JAVA_OPTIONS",
  "CLASSPATH",
  "LUA_INIT*",
  "LUA_PATH*",
  "LUA_CPATH*",
  "PHPRC",
  "PHP_INI_SCAN_DIR",
  "TCLLIBPATH",
  // Tools that run commands named in their environment or in configuration found through it.
  "GIT_*",
  "MAKEFLAGS",
  "GNUMAKEFLAGS",
  "MFLAGS",
  "OPENSSL_CONF",
  "OPENSSL_ENGINES",
  "HOME", // dotfiles a deployment ships (.gitconfig, .npmrc, …) would configure allowed tools
  "XDG_CONFIG_HOME",
  "EDITOR",
  "VISUAL",
  "PAGER",
  "SSH_ASKPASS",
  "LESSOPEN",
  "LESSCLOSE",
]);

/** What a payload asks to run: its argv, and the environment and working directory it sets. */
export interface CommandRequest {
  readonly argv: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly cwd?: string | undefined;
}

/** What an allowed request spawns: `program` (absolute when resolved) with `args`, `argv0` as written. */
export interface AllowedCommand {
  /** The file to execute: argv[0], or the absolute path a bare name resolved to on the agent's PATH. */
  readonly program: string;
  /** argv[1..]. */
  readonly args: readonly string[];
  /** argv[0] as the payload wrote it, passed to the program as its own argv[0]. */
  readonly argv0: string;
}

/** How many globs a refusal lists before "and N more". */
const LISTED = 5;

/** Lets everything run: the SDK's default when no policy is given. */
const ANY: CommandPolicy = Object.freeze({ commands: "any", env: [], cwd: [] });

/**
 * The policy `allow` means: omitted → everything allowed; a bare
 * {@link CommandAllowList} → those commands, no environment variables and
 * no payload `cwd` under a list.
 */
export function commandPolicy(allow: CommandAllowList | CommandPolicy | undefined): CommandPolicy {
  if (allow === undefined) return ANY;
  if (allow === "any" || Array.isArray(allow))
    return { commands: allow as CommandAllowList, env: [], cwd: [] };
  return allow as CommandPolicy;
}

/** The line a command's argv is matched as: its arguments joined with single spaces. */
export function commandLine(argv: readonly string[]): string {
  return argv.join(" ");
}

/**
 * Whether `value` has a `..` path segment: `..` alone, or bounded by `/` or
 * the ends of the value, or following `=` (as in `--dir=../x`). `a..b` and
 * `...` have none.
 */
export function hasDotDotSegment(value: string): boolean {
  return /(^|[/=])\.\.(\/|$)/.test(value);
}

/**
 * Whether `argv` may run under `allow`: `"any"`, or a line matching one of
 * the globs with no `..` segment in any element. Environment, working
 * directory and PATH lookup are checked by {@link requireAllowedCommand}.
 */
export function isCommandAllowed(argv: readonly string[], allow: CommandAllowList | CommandPolicy): boolean {
  return commandRefusal(argv, commandPolicy(allow).commands) === undefined;
}

/** Whether a payload may set the variable `name` under the `--allow-env` globs `allow`. */
export function isEnvNameAllowed(name: string, allow: readonly string[]): boolean {
  return envRefusal(name, allow) === undefined;
}

/**
 * The absolute path of the executable file `name` (no `/`) in the
 * directories of `searchPath` (`:`-separated), first match first, as
 * execvp would find it; `undefined` when none has it. Empty and relative
 * entries are skipped: they would resolve against the command's working
 * directory, which a payload chooses.
 */
export function resolveProgram(name: string, searchPath: string): string | undefined {
  if (name === "" || name.includes("/")) return undefined;
  for (const dir of searchPath.split(delimiter)) {
    if (!isAbsolute(dir)) continue;
    const candidate = join(dir, name);
    try {
      if (!statSync(candidate).isFile()) continue;
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // Missing or not executable here: execvp goes on to the next directory too.
    }
  }
  return undefined;
}

/**
 * Checks `request` against `policy` and says what to spawn; throws a
 * non-retryable {@link ActionFailure} naming the refused command, variable or
 * directory and the flag that would allow it (another attempt on this agent
 * would be refused the same way). Under a list, a bare argv[0] is resolved on
 * `searchPath` (the agent's own PATH by default, never the payload's).
 */
export function requireAllowedCommand(
  request: CommandRequest,
  policy: CommandAllowList | CommandPolicy,
  searchPath: string = process.env.PATH ?? "",
): AllowedCommand {
  const { commands, env, cwd } = commandPolicy(policy);
  const [argv0 = "", ...args] = request.argv;
  if (commands === "any") return { program: argv0, args, argv0 };
  const refusal =
    commandRefusal(request.argv, commands) ??
    Object.keys(request.env ?? {})
      .map((name) => envRefusal(name, env))
      .find((message) => message !== undefined) ??
    (request.cwd === undefined ? undefined : cwdRefusal(request.cwd, cwd));
  if (refusal !== undefined) throw new ActionFailure(refusal, { retryable: false });
  if (argv0.includes("/")) return { program: argv0, args, argv0 };
  const program = resolveProgram(argv0, searchPath);
  if (program === undefined) {
    throw new ActionFailure(
      `command ${quote(argv0)} is not on this agent's PATH (${quote(searchPath)}): install it there, or name it by its path`,
      { retryable: false },
    );
  }
  return { program, args, argv0 };
}

/**
 * Where a refusal's allow-list is set, for the reference agent (its flag) and
 * for an SDK agent (commandHandler's and createDeploymentHandler's `allow`),
 * which has no flags.
 */
const SET_BY = {
  commands: "--allow-command, or the SDK's allow option (CommandPolicy.commands)",
  env: "--allow-env, or the SDK's CommandPolicy.env",
  cwd: "--allow-cwd, or the SDK's CommandPolicy.cwd",
} as const;

/** "allowed: a, b; see --flag, or …" for a refusal. */
function allowedList(globs: readonly string[], list: keyof typeof SET_BY): string {
  const listed = globs.slice(0, LISTED).map((g) => quote(g));
  if (globs.length > LISTED) listed.push(`and ${globs.length - LISTED} more`);
  return `allowed: ${listed.join(", ") || "none"}; see ${SET_BY[list]}`;
}

function commandRefusal(argv: readonly string[], commands: CommandAllowList): string | undefined {
  if (commands === "any") return undefined;
  const line = commandLine(argv);
  if (!commands.some((glob) => matchesGlob(glob, line))) {
    return `command ${quote(line)} is not allowed on this agent (${allowedList(commands, "commands")})`;
  }
  // The line cannot tell `["python3 /opt/jobs/x"]` (one relative path, e.g. a file a deployment
  // shipped into its work directory) from `["python3", "/opt/jobs/x"]`: argv[0] has no spaces.
  if (argv[0]?.includes(" ")) {
    return `command ${quote(line)} is not allowed on this agent: its program ${quote(argv[0])} has a space, which no allow-list allows (the line could not tell it from program and arguments)`;
  }
  // `*` matches `..` too: `python3 /opt/jobs/*` would otherwise allow `/opt/jobs/../../tmp/x.py`.
  const climbing = argv.find(hasDotDotSegment);
  if (climbing !== undefined) {
    return `command ${quote(line)} is not allowed on this agent: its argument ${quote(climbing)} has a ".." segment, which no allow-list allows; name the path without ".."`;
  }
  return undefined;
}

function envRefusal(name: string, allow: readonly string[]): string | undefined {
  if (name === "" || name.includes("=") || name.includes("\0")) {
    return `environment variable name ${quote(name)} is not valid on this agent: a name is not empty and has no "=" or NUL`;
  }
  if (GUARDED_ENV.some((glob) => matchesGlob(glob, name))) {
    if (allow.includes(name)) return undefined;
    return `environment variable ${quote(name)} is not allowed on this agent: it can change what code runs, so only its exact name in --allow-env (the SDK's CommandPolicy.env) allows it (a glob such as "*" does not)`;
  }
  if (allow.some((glob) => matchesGlob(glob, name))) return undefined;
  return `environment variable ${quote(name)} is not allowed on this agent (${allowedList(allow, "env")})`;
}

function cwdRefusal(cwd: string, allow: readonly string[]): string | undefined {
  if (!allow.some((glob) => matchesGlob(glob, cwd))) {
    return `working directory ${quote(cwd)} is not allowed on this agent (${allowedList(allow, "cwd")})`;
  }
  if (hasDotDotSegment(cwd)) {
    return `working directory ${quote(cwd)} is not allowed on this agent: it has a ".." segment, which no allow-list allows; name it without ".."`;
  }
  return undefined;
}
