import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { Command } from "commander";
import { type AgentEvent, createAgent } from "../agent/agent.js";
import { commandHandler } from "../agent/command-handler.js";
import type { CommandAllowList } from "../agent/command-policy.js";
import { createDeploymentHandler, isDeploymentPayload } from "../agent/deployment-handler.js";
import { createProcessRegistry } from "../agent/process-registry.js";
import { splitAddresses } from "../rpc/targets.js";
import {
  CliError,
  channelFor,
  collect,
  EXIT,
  globals,
  parseLabels,
  positiveIntFlag,
  toJson,
} from "./output.js";

/** `leasehold agent`: the reference agent, running commands from action payloads. */
export function agentCommand(): Command {
  return new Command("agent")
    .description(
      "Run the reference agent: actions whose payload is {argv, env, cwd, timeout} run as commands in their own " +
        "process group; the whole group is killed when the lease is revoked or the agent self-fences. " +
        "Deployments of scope leases run here too: their containers start in a work directory of their own, " +
        "report starting/ready, are torn down when their lease is rolled back, and save outputs_dir as files " +
        "of the lease when their outputs are collected. It runs only the commands --allow-command allows (or any, " +
        "with --allow-any-command); one of them is required.",
    )
    .requiredOption("--cluster <name>", "the cluster this worker belongs to")
    .option("--worker-id <id>", "stable worker id (default: hostname-pid)")
    .option("--slots <n>", "actions run at once", positiveIntFlag, 1)
    .option("--labels <key=value>", "a label of this worker (repeatable)", collect)
    .option(
      "--work-dir <dir>",
      "where deployments get their work directories, and the record of started processes that the next agent " +
        "with the same directory stops if this one was killed (default: <tmp>/leasehold-agent-<worker id>)",
    )
    .option(
      "--allow-command <glob>",
      "run only commands (action argv, deployment containers and exec readiness probes) whose argv, joined with " +
        "single spaces, matches this glob: * is any run of characters (spaces and / included), ? one character; " +
        "e.g. '/bin/echo *' or 'python3 /opt/jobs/*' (repeatable). Others fail, not retried",
      collect,
    )
    .option(
      "--allow-any-command",
      "run any command a payload names: whoever may submit to the cluster runs code on this machine",
    )
    .action(async (o: Record<string, unknown>, command: Command) => {
      const g = globals(command);
      const allow = allowList(o.allowCommand as string[] | undefined, o.allowAnyCommand === true);
      // Fails fast, as a usage error naming the flag, before anything starts.
      channelFor(g);
      const workerId = (o.workerId as string | undefined) ?? `${hostname()}-${process.pid}`;
      const servers = splitAddresses(g.server);
      const workDir = (o.workDir as string | undefined) ?? join(tmpdir(), `leasehold-agent-${workerId}`);
      // What an earlier run of this worker (same work directory) left running when it was killed.
      const registry = createProcessRegistry(join(workDir, ".processes", workerId));
      const leftovers = registry.sweep();
      const deployments = createDeploymentHandler({
        address: servers,
        workDir,
        registry,
        security: g.security,
        allow,
      });
      const log = (event: AgentEvent) => {
        if (g.json) process.stdout.write(`${toJson({ time: new Date().toISOString(), ...event })}\n`);
        else process.stdout.write(`${new Date().toISOString()} ${describe(event)}\n`);
      };
      if (leftovers > 0) {
        const at = new Date().toISOString();
        if (g.json)
          process.stdout.write(`${toJson({ time: at, type: "leftovers_stopped", count: leftovers })}\n`);
        else
          process.stdout.write(`${at} stopped ${leftovers} process group(s) an earlier run left running\n`);
      }
      const agent = createAgent({
        address: servers,
        security: g.security,
        cluster: o.cluster as string,
        workerId,
        capacity: o.slots as number,
        labels: parseLabels(o.labels as string[] | undefined, "--labels"),
        handler: (ctx) =>
          isDeploymentPayload(ctx.payload) ? deployments(ctx) : commandHandler(ctx, { registry, allow }),
        agentVersion: "leasehold-agent",
        onEvent: log,
      });
      await new Promise<void>((resolve) => {
        const stop = () => {
          process.stdout.write(
            `${new Date().toISOString()} draining: finishing held actions, then goodbye\n`,
          );
          agent.close().then(resolve, resolve);
        };
        process.once("SIGTERM", stop);
        process.once("SIGINT", stop);
      });
    });
}

/** The commands `--allow-command`/`--allow-any-command` allow; neither (or both) is a usage error. */
function allowList(globs: readonly string[] | undefined, any: boolean): CommandAllowList {
  if (any && globs?.length) {
    throw new CliError(
      "--allow-any-command and --allow-command exclude each other: drop one (the globs restrict, the other does not)",
      EXIT.usage,
    );
  }
  if (any) return "any";
  if (!globs?.length) {
    throw new CliError(
      "the agent needs to know which commands it may run: pass --allow-command <glob> (repeatable), " +
        "e.g. --allow-command '/usr/bin/make *', or --allow-any-command to run whatever a payload names",
      EXIT.usage,
    );
  }
  return globs;
}

function describe(e: AgentEvent): string {
  switch (e.type) {
    case "connected":
      return `connected to ${e.address}: session ${e.sessionId}${e.resumed.length ? `, resumed ${e.resumed.join(", ")}` : ""}${e.revoked.length ? `, revoked ${e.revoked.join(", ")}` : ""}`;
    case "disconnected":
      return `disconnected (${e.error}); reconnecting in ${e.retryInMs}ms`;
    case "grant":
      return `granted ${e.actionId} (epoch ${e.epoch}, attempt ${e.attempt})`;
    case "finished":
      return `${e.actionId} ${e.outcome}${e.accepted ? "" : ` but the server rejected it: ${e.message}`}`;
    case "revoked":
      return `revoked ${e.actionId} (epoch ${e.epoch}): ${e.reason}`;
    case "self_fenced":
      return `self-fenced: no heartbeat ack in time; stopped ${e.actionIds.join(", ")}`;
    case "drain":
      return `asked to drain: ${e.reason}`;
  }
}
