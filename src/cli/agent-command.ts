import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { Command, Option } from "commander";
import { type AgentEvent, createAgent } from "../agent/agent.js";
import { commandHandler } from "../agent/command-handler.js";
import { type CommandPolicy, GUARDED_ENV } from "../agent/command-policy.js";
import { createDeploymentHandler, isDeploymentPayload } from "../agent/deployment-handler.js";
import { keptBy, startFenceKeeper } from "../agent/fence-keeper.js";
import { claimWorkDir, createProcessRegistry, ownWorkDir } from "../agent/process-registry.js";
import { MAX_CAPACITY } from "../rpc/limits.js";
import { splitAddresses } from "../rpc/targets.js";
import { checkWorkerNames, Violations } from "../rpc/validate.js";
import { versionText } from "../version.js";
import {
  CliError,
  channelFor,
  collect,
  count,
  durationMsFlag,
  durationText,
  EXIT,
  globals,
  guardOutput,
  nonNegativeIntFlag,
  parseLabels,
  positiveIntFlag,
  printJson,
  printLine,
  unreachableWhy,
} from "./output.js";
import { exitOnSignal, interruptCounter } from "./signals.js";

/** `leasehold agent`: the reference agent, running commands from action payloads. */
export function agentCommand(): Command {
  return (
    new Command("agent")
      .description(
        "Run the reference agent: actions whose payload is {argv, env, cwd, timeout} run as commands in their own " +
          "process group; the whole group is killed when the lease is revoked or the agent self-fences. " +
          "A command's environment is the agent's and the payload's env, plus LEASEHOLD_ACTION_ID (the action's " +
          "id) and LEASEHOLD_EPOCH (its lease's epoch), which the payload cannot override: the fencing token to " +
          "pass to systems the command writes to, so that they can refuse a stale attempt's writes. " +
          "Deployment containers get LEASEHOLD_DEPLOYMENT_ID, LEASEHOLD_LEASE_ID, LEASEHOLD_WORK_DIR and " +
          "LEASEHOLD_OUTPUTS_DIR (when it has one). " +
          "Deployments of scope leases run here too: their containers start in a work directory of their own, " +
          "report starting/ready, are torn down when their lease is rolled back, and save outputs_dir as files " +
          "of the lease when their outputs are collected. It runs only the commands --allow-command allows, with " +
          "only the environment variables --allow-env allows and in the directories --allow-cwd allows (or " +
          "anything, with --allow-any-command); one of --allow-command and --allow-any-command is required. " +
          "Ctrl-C (or SIGTERM) drains: no new work, held actions finish (at most --drain-timeout), then goodbye; a second one, " +
          "a second or more later, stops held actions now (commands get SIGTERM, then SIGKILL after --kill-grace; " +
          "deployments are killed at once) and gives their leases back (exit 130, or 143 if it was SIGTERM); a " +
          "third kills every process group they started, removes deployments' work directories and exits at once.",
      )
      .requiredOption("--cluster <name>", "the cluster this worker belongs to")
      .option(
        "--worker-id <id>",
        "this worker's id, kept across restarts: an agent restarted with the same id ends its earlier run's " +
          "session once the server has seen that run's stream end, so the leases it held are granted again at " +
          "once instead of after the grace period (default: this machine's hostname; give each agent its own " +
          "to run several on one machine)",
      )
      .option(
        "--capacity <n>",
        "actions run at once (the SDK's `capacity`); --capacity plus --prefetch is at most 10000",
        positiveIntFlag,
        1,
      )
      .option(
        "--prefetch <n>",
        "grants to hold beyond --capacity, each started as soon as a running action ends (the SDK's " +
          "`prefetch`): for short actions, the server's commit of one action overlaps the next. A held grant can " +
          "wait behind a long action while another worker is idle, so leave it at 0 for long actions",
        nonNegativeIntFlag,
        0,
      )
      .option(
        "--kill-grace <duration>",
        "how long a command being stopped (revoked, timed out, or stopped by a second Ctrl-C) gets " +
          "between SIGTERM and SIGKILL to its process group, e.g. 500ms, 10s (one whose lease is gone or " +
          "about to be, self-fenced, expired or superseded, is killed at once)",
        "2s",
      )
      .option(
        "--drain-timeout <duration>",
        "how long a drain (the first Ctrl-C or SIGTERM) waits for held actions to finish before it stops " +
          "them as a second Ctrl-C would and gives their leases back, e.g. 5m (at most 24h; 0 stops them at " +
          "once). Give the agent's supervisor at least this plus --kill-grace before it kills the agent",
        "30s",
      )
      // The flag's earlier name, kept working for scripts written against it.
      .addOption(new Option("--slots <n>").argParser(positiveIntFlag).hideHelp())
      // --label too: the spelling of `action submit`, which selects workers by their labels.
      .option("--label, --labels <key=value>", "a label of this worker (repeatable)", collect)
      .option(
        "--work-dir <dir>",
        "where deployments get their work directories, and the record of started processes and of those " +
          "directories that the next agent with the same directory and worker id stops and removes if this one " +
          "was killed (default: <tmp>/leasehold-agent-<worker id>)",
      )
      .option(
        "--allow-command <glob>",
        "run only commands (action argv, deployment containers and exec readiness probes) whose argv, joined with " +
          "single spaces, matches this glob: * is any run of characters (spaces and / included), ? one character " +
          "(repeatable). argv[0] is matched as written: '/bin/echo *' allows '/bin/echo hi' but not 'echo hi'; " +
          "a bare name like 'make *' runs the make this agent's own PATH finds (never the payload's PATH; not found " +
          "there, the action fails). An argv[0] with a space, and an argument with a '..' segment (../x, a/../b, " +
          "--dir=..), are always refused, " +
          "so 'python3 /opt/jobs/*' allows python3 with a first argument starting with /opt/jobs/ (symbolic links " +
          "there are followed) and any further arguments. Others fail, not retried",
        collect,
      )
      .option(
        "--allow-env <glob>",
        "with --allow-command: let payloads, containers and exec probes set the environment variables whose names " +
          "match this glob (repeatable; default none, and a payload setting any other fails, not retried). " +
          `Variables that change what code runs (${GUARDED_ENV.join(", ")}) are allowed only by their exact ` +
          "name, never by a glob: --allow-env '*' does not allow LD_PRELOAD, --allow-env LD_PRELOAD does",
        collect,
      )
      .option(
        "--allow-cwd <glob>",
        "with --allow-command: let an action's payload run in a working directory (its cwd, as written) matching " +
          "this glob, e.g. '/srv/builds/*' (repeatable; default none: payloads naming a cwd fail, not retried; a " +
          "'..' segment is always refused). Deployments always run in their own work directory",
        collect,
      )
      .option(
        "--allow-any-command",
        "run any command a payload names, with any environment and working directory: whoever may submit to the " +
          "cluster runs code on this machine",
      )
      .action(async (o: Record<string, unknown>, command: Command) => {
        // A closed stdout (`leasehold agent | tee log`, then Ctrl-C) drops the log lines; the agent
        // still drains, and stops what it started.
        guardOutput("drop");
        const g = globals(command);
        const killGraceMs = durationMsFlag("--kill-grace", o.killGrace as string);
        const drainTimeoutMs = durationMsFlag("--drain-timeout", o.drainTimeout as string, {
          maxMs: 24 * 3_600_000,
        });
        const allow = allowPolicy({
          commands: o.allowCommand as string[] | undefined,
          any: o.allowAnyCommand === true,
          env: o.allowEnv as string[] | undefined,
          cwd: o.allowCwd as string[] | undefined,
        });
        // Fails fast, as a usage error naming the flag, before anything starts.
        channelFor(g);
        const capacity = (o.slots ?? o.capacity) as number;
        const prefetch = o.prefetch as number;
        if (capacity + prefetch > MAX_CAPACITY) {
          throw new CliError(
            `--capacity plus --prefetch must be at most ${MAX_CAPACITY} (got ${capacity} + ${prefetch}): ` +
              "the hello asks for both",
            EXIT.usage,
          );
        }
        const workerId = (o.workerId as string | undefined) ?? hostname();
        const labels = parseLabels(o.labels as string[] | undefined, "--labels");
        // Checked before the work directory exists: the server would refuse every hello.
        const names = new Violations();
        checkWorkerNames(
          names,
          { workerId, cluster: o.cluster as string, labels },
          {
            workerId:
              o.workerId === undefined
                ? "the default worker id (this machine's hostname; pass --worker-id)"
                : "--worker-id",
            cluster: "--cluster",
            labels: "--labels",
          },
        );
        try {
          names.throwIfAny();
        } catch (error) {
          throw new CliError((error as Error).message, EXIT.usage);
        }
        const servers = splitAddresses(g.server);
        const workDir = (o.workDir as string | undefined) ?? join(tmpdir(), `leasehold-agent-${workerId}`);
        let madeWorkDir: boolean;
        try {
          madeWorkDir = ownWorkDir(workDir);
        } catch (error) {
          throw new CliError((error as Error).message, EXIT.usage);
        }
        // Before the sweep: a second agent of this worker would stop the first one's work.
        const other = claimWorkDir(workDir, workerId);
        if (other !== undefined)
          throw new CliError(
            `another agent (pid ${other}) runs as worker ${workerId} from ${workDir}; ` +
              "a worker id belongs to one process: stop that one, or pass another --worker-id",
            EXIT.usage,
          );
        // Kills what the agent started if the agent is paused past its leases' guarantee, or killed.
        const keeper = startFenceKeeper((code) =>
          say(
            "fence_keeper_exited",
            `the fence keeper exited (${code}): commands no longer stop if this agent is paused or killed`,
            { code },
          ),
        );
        // What an earlier run of this worker (same work directory) left running when it was killed.
        const registry = keptBy(createProcessRegistry(workDir, workerId), keeper);
        const leftovers = registry.sweep();
        const deployments = createDeploymentHandler({
          address: servers,
          workDir,
          registry,
          security: g.security,
          allow,
        });
        const disconnects = disconnectNotices(
          servers.length === 1 ? (servers[0] ?? g.server) : `any of ${servers.join(", ")}`,
        );
        /** Whether the stream now open was welcomed (a session), or the agent is between streams or waiting for a welcome. */
        let inSession = false;
        /** A taken_over line was just said: the disconnected event of that same stream end says nothing more. */
        let saidTakenOver = false;
        /** Leases held now; read only once the agent exists (events come after createAgent returns). */
        let held = () => 0;
        const log = (event: AgentEvent) => {
          if (g.json) return printJson({ time: new Date().toISOString(), ...event });
          if (event.type === "disconnected") {
            inSession = false;
            const line = disconnects.noticeOf(unreachableWhy(event.error), Date.now());
            if (saidTakenOver) saidTakenOver = false;
            else if (line !== undefined) printLine(`${new Date().toISOString()} ${line}`);
            return;
          }
          if (event.type === "connected") {
            inSession = true;
            disconnects.connected();
          }
          if (event.type === "taken_over") {
            saidTakenOver = true;
            // Emitted after the SDK aborted the handlers it held, which stay counted until they return.
            return printLine(
              `${new Date().toISOString()} ${takenOverLine(workerId, { hadSession: inSession, stopped: held(), retryInMs: event.retryInMs })}`,
            );
          }
          printLine(`${new Date().toISOString()} ${describe(event)}`);
        };
        /** One line of the agent's own (not the SDK's events): `type` and `fields` under --json. */
        const say = (type: string, human: string, fields: Record<string, unknown> = {}) =>
          g.json
            ? printJson({ time: new Date().toISOString(), type, ...fields })
            : printLine(`${new Date().toISOString()} ${human}`);
        // A mistyped --work-dir is made as asked; this line lets the operator see it happen.
        if (madeWorkDir && o.workDir !== undefined)
          say("work_dir_created", `made the work directory ${workDir} (--work-dir): it did not exist`, {
            directory: workDir,
          });
        if (leftovers.groups > 0 || leftovers.directories > 0) {
          say("leftovers_stopped", `${leftoversDone(leftovers)} an earlier run left behind`, {
            count: leftovers.groups,
            directories: leftovers.directories,
          });
        }
        const agent = createAgent({
          address: servers,
          security: g.security,
          cluster: o.cluster as string,
          workerId,
          capacity,
          prefetch,
          labels,
          handler: (ctx) =>
            isDeploymentPayload(ctx.payload)
              ? deployments(ctx)
              : commandHandler(ctx, { registry, allow, killGraceMs }),
          agentVersion: `leasehold-agent ${versionText()}`,
          onEvent: log,
          // Half the self-fence's 500 ms margin later: the agent's own fence first, and both
          // before the server may hand the actions on.
          onGuarantee: (ms) => keeper.guaranteed(ms + 250),
        });
        held = () => agent.running;
        // Ctrl-C (or SIGTERM) once drains; twice stops the held actions now and gives their leases
        // back; three times kills what they started and exits at once.
        const interrupts = interruptCounter();
        /** The signal that cut a drain short while actions were held, if one did. */
        let cutShortBy: NodeJS.Signals | undefined;
        let closed = () => {};
        const done = new Promise<void>((resolve) => {
          closed = resolve;
        });
        const onSignal = (signal: NodeJS.Signals) => {
          const nth = interrupts();
          if (nth === undefined) return;
          if (nth === 1) {
            if (agent.sessionId === undefined)
              // Never welcomed: the agent may have reached a server that refused it, but it holds no lease.
              say(
                "interrupt_unconnected",
                "not connected (no session with a server): nothing to hand back; exiting",
                {
                  signal,
                },
              );
            else
              say(
                "interrupt_drain",
                "draining: finishing held actions, then goodbye (Ctrl-C again stops them now)",
                {
                  signal,
                },
              );
            agent.close({ timeoutMs: drainTimeoutMs }).then((result) => {
              // The drain's time (--drain-timeout) passed with actions still running (not a second signal: that says so).
              if (result.stopped.length > 0 && cutShortBy === undefined)
                say(
                  "drain_timeout",
                  `drain timed out after ${durationText(drainTimeoutMs)}: stopped ${count(result.stopped.length, "action")} still running and gave ${result.stopped.length === 1 ? "its lease" : "their leases"} back, to run again on another worker (${result.stopped.map((a) => `${a.actionId} epoch ${a.epoch}`).join(", ")}); nothing is lost, exiting 0`,
                  { stopped: result.stopped.map((a) => ({ action_id: a.actionId, epoch: a.epoch })) },
                );
              if (!result.goodbye && agent.sessionId !== undefined)
                say(
                  "goodbye_unconfirmed",
                  "the server did not confirm the goodbye: it ends the session at its deadline (the grace period after the last heartbeat)",
                );
              closed();
            }, closed);
          } else if (nth === 2) {
            const held = agent.running;
            if (held > 0) cutShortBy = signal;
            say(
              "interrupt_stop",
              held > 0
                ? `stopping ${count(held, "held action")} now and giving the leases back (Ctrl-C again kills what they started and exits)`
                : "nothing held: leaving once the server confirms the goodbye (Ctrl-C again exits now)",
              { signal, running: held },
            );
            agent.close({ timeoutMs: 0 }).then(closed, closed);
          } else {
            const swept = registry.sweep();
            say("interrupt_kill", `${leftoversDone(swept)}; exiting without a goodbye`, {
              signal,
              count: swept.groups,
              directories: swept.directories,
            });
            process.exit(exitOnSignal(signal));
          }
        };
        process.on("SIGTERM", onSignal);
        process.on("SIGINT", onSignal);
        try {
          await done;
        } finally {
          process.off("SIGTERM", onSignal);
          process.off("SIGINT", onSignal);
          keeper.close();
        }
        // A drain cut short did not finish the work it held: say so, as a shell's 128 + signal.
        if (cutShortBy) process.exitCode = exitOnSignal(cutShortBy);
      })
  );
}

/** What a sweep of the process registry did: "killed 2 process groups and removed 1 deployment directory". */
function leftoversDone(swept: { groups: number; directories: number }): string {
  const killed = `killed ${count(swept.groups, "process group")}`;
  const n = swept.directories;
  return n > 0 ? `${killed} and removed ${n} deployment ${n === 1 ? "directory" : "directories"}` : killed;
}

/**
 * What `--allow-command`/`--allow-env`/`--allow-cwd` or `--allow-any-command`
 * allow; neither (or both) is a usage error, and so are `--allow-env` and
 * `--allow-cwd` with `--allow-any-command`, which they would not restrict.
 */
function allowPolicy(flags: {
  commands: readonly string[] | undefined;
  any: boolean;
  env: readonly string[] | undefined;
  cwd: readonly string[] | undefined;
}): CommandPolicy {
  const { commands: globs, any } = flags;
  if (any && (flags.env?.length || flags.cwd?.length)) {
    throw new CliError(
      `${flags.env?.length ? "--allow-env" : "--allow-cwd"} restricts nothing with --allow-any-command, which allows ` +
        "every variable and directory: drop it, or use --allow-command instead of --allow-any-command",
      EXIT.usage,
    );
  }
  if (any && globs?.length) {
    throw new CliError(
      "--allow-any-command and --allow-command exclude each other: drop one (the globs restrict, the other does not)",
      EXIT.usage,
    );
  }
  if (any) return { commands: "any", env: [], cwd: [] };
  if (!globs?.length) {
    throw new CliError(
      "the agent needs to know which commands it may run: pass --allow-command <glob> (repeatable), " +
        "e.g. --allow-command '/usr/bin/make *', or --allow-any-command to run whatever a payload names",
      EXIT.usage,
    );
  }
  return { commands: globs, env: flags.env ?? [], cwd: flags.cwd ?? [] };
}

function describe(e: AgentEvent): string {
  switch (e.type) {
    case "connected":
      return `connected to ${e.address}: session ${e.sessionId}${e.resumed.length ? `, resumed ${e.resumed.join(", ")}` : ""}${e.revoked.length ? `, revoked ${e.revoked.join(", ")}` : ""}`;
    case "disconnected":
      return `disconnected (${unreachableWhy(e.error)}); reconnecting in ${e.retryInMs}ms`;
    case "grant":
      return `granted ${e.actionId} (epoch ${e.epoch}, attempt ${e.attempt})`;
    case "finished":
      return `${e.actionId} ${e.outcome}${e.accepted ? "" : ` but the server rejected it: ${e.message}`}`;
    case "revoked":
      return `revoked ${e.actionId} (epoch ${e.epoch}): ${e.reason}`;
    case "self_fenced":
      return `self-fenced: ${e.databaseUnreachable ? "the server could not reach its database to extend the leases in time" : "no heartbeat ack in time"}; stopped ${e.actionIds.join(", ")}`;
    case "drain":
      // The agent stays connected and idle: say what ends that, since nothing here does.
      return `asked to drain: ${e.reason} (held actions finish; no new work until \`leasehold workers undrain\` or a restart of this agent)`;
    case "server_database":
      return e.reachable
        ? `server ${e.address} reaches its database again`
        : `server ${e.address} cannot reach its database: its acks no longer extend the leases' guarantee`;
    case "warning":
      return e.message;
    // Said by the caller, which knows whether the agent had a session and what it held.
    case "taken_over":
      return `another process holds this worker id's session (worker ids must be unique); trying again in ${Math.round(e.retryInMs)}ms`;
  }
}

/**
 * The line for a taken_over event: another process took this agent's
 * session (`hadSession`), or holds it and the server refused this agent's
 * hello; the actions it stopped are said only when there were some.
 */
export function takenOverLine(
  workerId: string,
  { hadSession, stopped, retryInMs }: { hadSession: boolean; stopped: number; retryInMs: number },
): string {
  const what = hadSession
    ? `another process connected as worker ${workerId} and took this agent's session over`
    : `the server refused this agent: another process is connected as worker ${workerId} and holds its session`;
  const actions =
    stopped > 0 ? `stopped ${count(stopped, "held action")} (their leases are that process's); ` : "";
  return `${what} (worker ids must be unique); ${actions}trying again in ${Math.round(retryInMs)}ms`;
}

/** How often the agent says again that it still cannot connect. */
const STILL_DISCONNECTED_EVERY_MS = 30_000;

/**
 * The human lines for a run of failed connection attempts: the first, then
 * one whenever a reason not yet told comes up (a refusal of the agent's
 * credentials after a server that was down), and one every 30 s while it
 * lasts, so that an agent that cannot connect never goes silent; with
 * several --server addresses tried in turn, each reason is told once. A run
 * before the agent's first session says it cannot connect to `target` (yet);
 * only one after a session says it was disconnected.
 */
export function disconnectNotices(target: string) {
  let since: number | undefined;
  let saidAt = 0;
  let everConnected = false;
  /** Whether the run now going on follows a session that ended (else the agent never had one). */
  let lost = false;
  const told = new Set<string>();
  return {
    noticeOf(why: string, now: number): string | undefined {
      // grpc-js stamps some reasons with the time ("Failed to connect (2026-…)"): the same reason.
      const reason = why.replace(/ \(\d{4}-\d\d-\d\dT[^)]*\)/g, "");
      if (since === undefined) {
        since = now;
        saidAt = now;
        lost = everConnected;
        told.add(reason);
        return lost
          ? `disconnected (${why}); reconnecting with backoff`
          : `cannot connect to ${target} yet (${why}); trying again with backoff`;
      }
      if (told.has(reason) && now - saidAt < STILL_DISCONNECTED_EVERY_MS) return undefined;
      told.add(reason);
      saidAt = now;
      // A second reason can come within the first second (another address): in ms, never "after 0 s".
      const ms = now - since;
      const after = ms < 1000 ? `${ms} ms` : `${Math.round(ms / 1000)} s`;
      return lost
        ? `still disconnected after ${after} (${why}); reconnecting with backoff`
        : `still cannot connect after ${after} (${why}); trying again with backoff`;
    },
    connected(): void {
      since = undefined;
      everConnected = true;
      told.clear();
    },
  };
}
