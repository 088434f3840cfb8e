import { Command, CommanderError, Option } from "commander";
import { actionCommands } from "./cli/action-commands.js";
import { agentCommand } from "./cli/agent-command.js";
import { clusterCommands, workerCommands } from "./cli/cluster-commands.js";
import { eventCommand } from "./cli/event-commands.js";
import { leaseCommands, resourceCommands } from "./cli/lease-commands.js";
import { CliError, EXIT, guardOutput } from "./cli/output.js";
import { serveCommand } from "./cli/serve-command.js";
import { tokenCommand } from "./cli/token-command.js";

/**
 * The `leasehold` command line. Flags and environment are read here and in
 * the command definitions of src/cli; everything below receives parsed values.
 */
export function createProgram(): Command {
  const program = new Command("leasehold")
    .description("Leasehold: a gRPC control plane that hands work to cluster agents under leases.")
    .addOption(
      new Option(
        "--server <host:port>",
        "server address(es): comma-separated for several replicas, or a name with several DNS records; the first that answers is used",
      )
        .env("LEASEHOLD_SERVER")
        .default("127.0.0.1:50051"),
    )
    .option("--json", "machine-readable output: JSON, or NDJSON for streams")
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
  ]) {
    program.addCommand(command);
  }
  return program;
}

export async function main(argv: readonly string[]): Promise<void> {
  // `leasehold events | head -1` ends quietly; `serve` switches this to dropping its logs.
  guardOutput("exit");
  const program = createProgram();
  // Every subcommand reports usage errors through the same path.
  const override = (command: Command) => {
    command.exitOverride();
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
    console.error(`leasehold: ${error instanceof Error ? error.message : String(error)}`);
    process.exit(error instanceof CliError ? error.exitCode : EXIT.failed);
  }
}
