import { hostname } from "node:os";
import { Command } from "commander";
import { type AgentEvent, createAgent } from "../agent/agent.js";
import { commandHandler } from "../agent/command-handler.js";
import { collect, globals, parseLabels, positiveIntFlag, toJson } from "./output.js";

/** `leasehold agent`: the reference agent, running commands from action payloads. */
export function agentCommand(): Command {
  return new Command("agent")
    .description(
      "Run the reference agent: actions whose payload is {argv, env, cwd, timeout} run as commands in their own " +
        "process group; the whole group is killed when the lease is revoked or the agent self-fences.",
    )
    .requiredOption("--cluster <name>", "the cluster this worker belongs to")
    .option("--worker-id <id>", "stable worker id (default: hostname-pid)")
    .option("--slots <n>", "actions run at once", positiveIntFlag, 1)
    .option("--labels <key=value>", "a label of this worker (repeatable)", collect)
    .action(async (o: Record<string, unknown>, command: Command) => {
      const g = globals(command);
      const workerId = (o.workerId as string | undefined) ?? `${hostname()}-${process.pid}`;
      const log = (event: AgentEvent) => {
        if (g.json) process.stdout.write(`${toJson({ time: new Date().toISOString(), ...event })}\n`);
        else process.stdout.write(`${new Date().toISOString()} ${describe(event)}\n`);
      };
      const agent = createAgent({
        address: g.server.split(","),
        cluster: o.cluster as string,
        workerId,
        capacity: o.slots as number,
        labels: parseLabels(o.labels as string[] | undefined, "--labels"),
        handler: commandHandler,
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
