import { existsSync } from "node:fs";
import { hostname, userInfo } from "node:os";
import { join } from "node:path";
import { Command, Option } from "commander";
import { DEFAULTS, parseDuration } from "../config.js";
import { LeaseholdError } from "../errors.js";
import { CliError, EXIT, printJson, printLine } from "./output.js";
import { saidOfItsSource } from "./serve-command.js";

/** `leasehold db`: operations on the database itself, run with no server in between. */
export function dbCommand(): Command {
  const db = new Command("db").description(
    "Operate on the database directly (not through a server): what a restore from a backup needs.",
  );
  db.command("restored")
    .description(
      "Make a database that went back in time safe to serve: one restored from a backup, or a standby promoted after losing commits. In one transaction it raises the epoch of every queued or leased action by --epoch-margin (so no (action, epoch) granted after the backup is ever granted again), ends every live session (a worker still running a lease from before is told to stop it when it reconnects), puts leased actions back in the queue without charging a retry, holds every grant for --grace-period (an agent that does not reconnect fences itself meanwhile), and records a database_restored event. Run it on the restored database before the servers serve it; it is safe with servers running, whose streams it ends. It applies no migration: it marks the database on the schema it has, so a backup of an older build (one from before an upgrade, rolled back to) stays on that build's schema and that build serves it afterwards; an older build without this command is marked by this one. It refuses (exit 2, changing nothing) a database with no Leasehold schema, one older than migration 0006_authorization, and one a newer build migrated (its schema may keep state this build's mark does not know of: run that build's db restored).",
    )
    .addOption(
      new Option(
        "--database-url <url>",
        "PostgreSQL URL of the restored database (postgres://user@host:port/db); unset: embedded PGlite in --data-dir",
      ).env("DATABASE_URL"),
    )
    .addOption(
      new Option("--data-dir <dir>", "PGlite data directory (its server must be stopped)")
        .env("LEASEHOLD_DATA_DIR")
        .default(DEFAULTS.dataDir),
    )
    .addOption(
      new Option(
        "--grace-period <duration>",
        "the servers' --grace-period: no action is granted for this long after the command, the longest an agent keeps running a lease after its last heartbeat ack",
      )
        .env("LEASEHOLD_GRACE_PERIOD")
        .default(DEFAULTS.gracePeriod),
    )
    .addOption(
      new Option(
        "--epoch-margin <n>",
        "how much every queued or leased action's epoch is raised: more than the grants one action can have had since the backup",
      ).default("1000000"),
    )
    .action(async (o: Record<string, string | undefined>, command: Command) => {
      let holdMs: number;
      try {
        holdMs = parseDuration("--grace-period", o.gracePeriod ?? DEFAULTS.gracePeriod);
      } catch (error) {
        if (error instanceof LeaseholdError)
          throw new CliError(saidOfItsSource(error.message, command), EXIT.usage);
        throw error;
      }
      const margin = Number(o.epochMargin);
      if (!Number.isSafeInteger(margin) || margin < 1)
        throw new CliError(
          `--epoch-margin: must be a whole number of at least 1 (got ${o.epochMargin})`,
          EXIT.usage,
        );
      // Opening a directory that holds no database would make a new, empty one there.
      if (!o.databaseUrl && !existsSync(join(o.dataDir as string, "PG_VERSION")))
        throw new CliError(
          `--data-dir: ${o.dataDir} ${existsSync(o.dataDir as string) ? "holds no database" : "does not exist"}; give the data directory of the restored database (or --database-url)`,
          EXIT.usage,
        );
      // Loaded here: every other command starts faster without the store's modules.
      const [{ openDatabase }, { databaseClock }, { markDatabaseRestored, DatabaseNotMarkable }] =
        await Promise.all([
          import("../store/database.js"),
          import("../store/clock.js"),
          import("../store/queries/mark-database-restored.js"),
        ]);
      // Not migrated: a restored backup keeps the schema it has (the build it came from may serve it next).
      const database = await openDatabase({
        url: o.databaseUrl || undefined,
        dataDir: o.dataDir as string,
        migrate: false,
      });
      try {
        const done = await markDatabaseRestored(database.db, databaseClock, {
          margin,
          holdMs,
          actor: operatorName(),
        }).catch((error: unknown) => {
          throw error instanceof DatabaseNotMarkable ? new CliError(error.message, EXIT.usage) : error;
        });
        if (command.optsWithGlobals().json) printJson(done);
        else {
          printLine(
            `database marked restored: ${done.sessionsEnded} live sessions ended, ${done.leasesEnded} leases revoked, ` +
              `the epochs of ${done.actionsRenumbered} queued or leased actions raised by ${margin}; ` +
              `no grant before ${done.grantsFrom.toISOString()}`,
          );
        }
      } finally {
        await database.close();
      }
    });
  return db;
}

/** The actor of the command's event: who ran it, where (no principal: it does not go through a server). */
function operatorName(): string {
  let user = "unknown";
  try {
    user = userInfo().username;
  } catch {
    // No user name for this uid (a container's): the host still says where it ran.
  }
  return `${user}@${hostname()}`;
}
