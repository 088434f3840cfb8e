import type { EventEmitter } from "node:events";
import { realpathSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { Command, CommanderError, Help, Option } from "commander";
import { actionCommands } from "./cli/action-commands.js";
import { agentCommand } from "./cli/agent-command.js";
import { clusterCommands, workerCommands } from "./cli/cluster-commands.js";
import { dbCommand } from "./cli/db-command.js";
import { eventCommand } from "./cli/event-commands.js";
import { leaseCommands, resourceCommands } from "./cli/lease-commands.js";
import { CliError, DEFAULT_SERVER, EXIT, guardOutput, printError } from "./cli/output.js";
import { serveCommand } from "./cli/serve-command.js";
import { tokenCommand } from "./cli/token-command.js";
import { versionText } from "./version.js";

/**
 * The `leasehold` command line. Flags and environment are read here and in
 * the command definitions of src/cli; everything below receives parsed values.
 */
export function createProgram(): Command {
  const program = new Command("leasehold")
    .description("Leasehold: a gRPC control plane that hands work to cluster agents under leases.")
    .version(
      versionText(),
      "-V, --version",
      "print the version of leasehold and the commit it was built from, and exit",
    )
    .addOption(
      new Option(
        "--server <host:port>",
        "server address(es): comma-separated for several replicas, or a name with several DNS records; the first that answers is used, and the next when one refuses a call because it cannot reach its database",
      )
        .env("LEASEHOLD_SERVER")
        .default(DEFAULT_SERVER),
    )
    .option("--json", "machine-readable output: JSON, or NDJSON for streams")
    .addOption(
      new Option(
        "--request-timeout <duration>",
        "how long a call may wait for the server's answer before the command gives up (exit 3; the outcome of a change is then unknown); 0 waits as long as it takes. Commands that follow a stream (watch, wait) are not bounded by it",
      )
        .env("LEASEHOLD_REQUEST_TIMEOUT")
        .default("30s"),
    )
    .addOption(
      new Option(
        "--tls-ca <file>",
        "PEM file of the CA(s) that signed the server's certificate; turns TLS on",
      ).env("LEASEHOLD_TLS_CA"),
    )
    .addOption(
      new Option(
        "--tls-cert <file>",
        "PEM client certificate for mTLS (with --tls-key); turns TLS on (for `serve`: its own option)",
      ).env("LEASEHOLD_TLS_CERT"),
    )
    .addOption(
      new Option("--tls-key <file>", "PEM private key of --tls-cert (unencrypted)").env("LEASEHOLD_TLS_KEY"),
    )
    .addOption(
      new Option(
        "--tls",
        "use TLS, trusting the system's CAs (implied by --tls-ca and --tls-cert); the variable turns it on with 1, true, yes or on, leaves it off when empty, 0, false, no or off, and any other value exits 2",
      ).env("LEASEHOLD_TLS"),
    )
    .addOption(
      new Option(
        "--tls-server-name <name>",
        "name to verify in the server's certificate instead of the --server host (e.g. when connecting by IP)",
      ).env("LEASEHOLD_TLS_SERVER_NAME"),
    )
    .addOption(
      new Option(
        "--token <token>",
        "bearer token sent as `authorization: Bearer <token>` on every call; only over TLS or to a loopback --server",
      ).env("LEASEHOLD_TOKEN"),
    )
    .addOption(
      new Option(
        "--token-file <file>",
        "file holding the bearer token, read again whenever it changes (rotated tokens); instead of --token",
      ).env("LEASEHOLD_TOKEN_FILE"),
    )
    .showHelpAfterError("(run with --help for usage)")
    .addHelpText(
      "after",
      "\nExit codes: 0 success, 1 the operation failed, 2 bad usage, 3 server unreachable, 4 not found.",
    );
  for (const command of [
    serveCommand(),
    agentCommand(),
    actionCommands(),
    workerCommands(),
    clusterCommands(),
    eventCommand(),
    leaseCommands(),
    ...resourceCommands(),
    tokenCommand(),
    dbCommand(),
  ]) {
    program.addCommand(command);
    // Every client command's --help lists the options it takes from the program (--server, TLS,
    // tokens, --json). Not serve's: it has its own TLS options, and the client ones do not apply;
    // nor db's, which opens the database itself.
    if (command.name() !== "serve" && command.name() !== "db") showGlobalOptions(command);
  }
  routeSharedOptions(program);
  return program;
}

/**
 * Lists the program's options in the help of `command`, or of its
 * subcommands when it has some: a group's help (`leasehold lease --help`)
 * is read for its list of commands, which about 40 lines of them would push
 * below the screen.
 */
function showGlobalOptions(command: Command): void {
  if (command.commands.length === 0) command.configureHelp({ showGlobalOptions: true });
  for (const sub of command.commands) showGlobalOptions(sub);
}

/**
 * Commander lets the program take its options anywhere on the line, so a
 * subcommand's option with the same flag as a global one (serve's own
 * `--tls-cert`/`--tls-key`, the server's certificate) would be taken by the
 * program: `leasehold serve --tls-cert x` would set the client's global.
 * Before a subcommand runs, every global value given on the command line
 * whose flag the subcommand also defines is moved to the subcommand (through
 * its own parser), and the global is cleared. Values from the environment
 * stay where they are: the subcommand reads its own variables.
 */
function routeSharedOptions(program: Command): void {
  program.hook("preSubcommand", (_program, subcommand) => {
    for (const global of program.options) {
      const key = global.attributeName();
      if (program.getOptionValueSource(key) !== "cli" || global.long === undefined) continue;
      const own = subcommand.options.find((o) => o.long === global.long);
      if (!own) continue;
      const value = program.getOptionValue(key) as unknown;
      program.setOptionValueWithSource(key, undefined, "default");
      // What commander's own parser does for an option it reads (Command is an EventEmitter):
      // the subcommand's parser runs and the value's source is "cli".
      (subcommand as unknown as EventEmitter).emit(
        `option:${own.name()}`,
        own.required || own.optional ? value : undefined,
      );
    }
  });
}

/**
 * Node warns (DEP0123) when a TLS client sends an IP address as the server
 * name, which grpc-js does whenever `--server` is an IP and no
 * `--tls-server-name` is given. The connection is fine (the certificate is
 * still checked against the IP), so a user would only see noise on stderr.
 */
function silenceIpServerNameWarning(): void {
  const emit = process.emitWarning.bind(process);
  process.emitWarning = ((warning: string | Error, ...rest: unknown[]) => {
    const code =
      typeof rest[0] === "object" && rest[0] !== null ? (rest[0] as { code?: string }).code : rest[1];
    if (code === "DEP0123") return;
    (emit as (...args: unknown[]) => void)(warning, ...rest);
  }) as typeof process.emitWarning;
}

export async function main(argv: readonly string[]): Promise<void> {
  silenceIpServerNameWarning();
  // `leasehold events | head -1` ends quietly; `serve` switches this to dropping its logs.
  guardOutput("exit");
  const program = createProgram();
  // Every subcommand reports usage errors through the same path.
  const override = (command: Command) => {
    command.exitOverride();
    // Commander's own usage errors (a missing required option, an unknown one) read like ours; a
    // command's own outputError (one that adds a hint) still gets them.
    const own =
      command.configureOutput().outputError ?? ((text: string, write: (s: string) => void) => write(text));
    command.configureOutput({
      outputError: (text, write) => own(text.replace(/^error: /, "leasehold: "), write),
    });
    // And --help says which options a command cannot do without.
    command.configureHelp({
      ...command.configureHelp(),
      optionDescription(this: Help, option: Option) {
        const text = Help.prototype.optionDescription.call(this, option);
        return option.mandatory ? `${text} (required)` : text;
      },
    });
    for (const sub of command.commands) override(sub);
  };
  override(program);
  try {
    await program.parseAsync([...argv]);
  } catch (error) {
    if (error instanceof CommanderError) {
      // Commander printed the message already; help and version are successes (a group
      // command run without a subcommand prints help too, but that is a usage error).
      const helpOrVersion = ["commander.helpDisplayed", "commander.version"].includes(error.code);
      process.exit(helpOrVersion ? EXIT.ok : EXIT.usage);
    }
    // The message may hold what the server said (its error details, which can echo a caller's values).
    printError(error instanceof Error ? error.message : String(error));
    process.exit(error instanceof CliError ? error.exitCode : EXIT.failed);
  }
}

/**
 * Whether this module is the one `node` was asked to run (`node
 * dist/main.js serve`), not imported by bin/leasehold.js or a test. Node
 * runs a main module from its real path, so the argument is resolved the
 * same way.
 */
function isEntryPoint(): boolean {
  const script = process.argv[1];
  if (script === undefined) return false;
  try {
    return pathToFileURL(realpathSync(script)).href === import.meta.url;
  } catch {
    return false;
  }
}

// Run directly, this file did nothing at all and exited 0: it only exports `main`.
if (isEntryPoint()) await main(process.argv);
