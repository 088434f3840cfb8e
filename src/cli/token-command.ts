import { Command, InvalidArgumentError } from "commander";
import { principalProblem, ROLE_RIGHTS, ROLES, type Role, type RoleBinding } from "../auth/access.js";
import { addStaticToken } from "../auth/static-tokens.js";
import { LeaseholdError } from "../errors.js";
import { CliError, collect, EXIT, globals, toJson } from "./output.js";

/** Parses one `--role`, collecting repeats; commander reports a bad one as a usage error. */
function roleFlag(value: string, previous: Role[] = []): Role[] {
  if (!(ROLES as readonly string[]).includes(value))
    throw new InvalidArgumentError(`must be one of ${ROLES.join(", ")}`);
  return [...previous, value as Role];
}

/** Errors writing a file that say its path is wrong, not that the write failed on the way. */
const PATH_ERRORS = ["ENOENT", "ENOTDIR", "EISDIR", "EACCES", "EPERM", "EROFS"];

/** `leasehold token create`: static bearer tokens for small setups. */
export function tokenCommand(): Command {
  const token = new Command("token").description("Manage static bearer tokens (serve --auth-tokens).");
  token
    .command("create")
    .description(
      "Create a token for a principal: its SHA-256 is appended to the tokens file, and the token is printed once.",
    )
    .requiredOption(
      "--principal <name>",
      'who the token is for (the actor recorded for its calls); not "anonymous" (reserved for callers when authentication is off), without leading or trailing spaces or control characters',
    )
    .requiredOption(
      "--tokens-file <path>",
      "the tokens file of `serve --auth-tokens` (created with mode 0600 if missing)",
    )
    .option("--role <role>", `a role that comes with the token (${ROLES.join(", ")}); repeatable`, roleFlag)
    .option(
      "--cluster <glob>",
      "where the roles apply, required with --role (no default, as in the tokens file: * for every cluster); repeatable",
      collect,
    )
    .option("--worker-ids <glob>", "worker ids an agent (or operator) role may use (default *)")
    .addHelpText(
      "after",
      "\nA running server picks the new token up within two seconds. Roles the policy gives the principal apply too.",
    )
    .action(
      (
        o: { principal: string; tokensFile: string; role?: Role[]; cluster?: string[]; workerIds?: string },
        command: Command,
      ) => {
        const roles = o.role ?? [];
        if (o.principal.trim() === "") throw new CliError("--principal must not be empty", EXIT.usage);
        const problem = principalProblem(o.principal);
        if (problem) throw new CliError(`--principal ${JSON.stringify(o.principal)} ${problem}`, EXIT.usage);
        if (o.tokensFile === "") throw new CliError("--tokens-file must not be empty", EXIT.usage);
        if (roles.length === 0 && (o.cluster || o.workerIds !== undefined))
          throw new CliError(
            "--cluster and --worker-ids apply to the roles given with --role; add one",
            EXIT.usage,
          );
        if (o.cluster?.some((c) => c === ""))
          throw new CliError("--cluster must not be empty (use * for every cluster)", EXIT.usage);
        if (o.workerIds !== undefined) {
          const runsWorkers = roles.some((r) => ROLE_RIGHTS[r].includes("worker.connect"));
          if (!runsWorkers || o.workerIds === "")
            throw new CliError(
              "--worker-ids needs a role that runs workers (--role agent or --role operator) and a glob",
              EXIT.usage,
            );
        }
        if (roles.length > 0 && !o.cluster)
          throw new CliError(
            "--role needs --cluster: name the clusters its roles apply in, or --cluster '*' for every cluster",
            EXIT.usage,
          );
        const clusters = o.cluster ?? [];
        const bindings: RoleBinding[] = [...new Set(roles)].map((role) => ({
          role,
          clusters,
          workerIds: ROLE_RIGHTS[role].includes("worker.connect") ? (o.workerIds ?? "*") : "*",
        }));
        let created: string;
        try {
          created = addStaticToken(o.tokensFile, { principal: o.principal, bindings });
        } catch (error) {
          // A broken or unreadable file: say which and why (the flag of the server is --auth-tokens).
          if (error instanceof LeaseholdError)
            throw new CliError(error.message.replace(/^--auth-tokens: /, "--tokens-file: "), EXIT.usage);
          // A path that cannot be written (no such directory, no permission) is the flag to fix, as
          // an unreadable file is; anything else (a full disk) is a failure.
          const code = (error as NodeJS.ErrnoException).code ?? "";
          const usage = PATH_ERRORS.includes(code);
          throw new CliError(
            `${usage ? "--tokens-file: " : ""}cannot write ${o.tokensFile}: ${(error as Error).message}`,
            usage ? EXIT.usage : EXIT.failed,
          );
        }
        if (globals(command).json)
          process.stdout.write(`${toJson({ principal: o.principal, token: created })}\n`);
        else process.stdout.write(`${created}\n`);
        process.stderr.write(
          `leasehold: token for ${JSON.stringify(o.principal)} added to ${o.tokensFile}; it is shown only this once (the file keeps its hash)\n`,
        );
      },
    );
  return token;
}
