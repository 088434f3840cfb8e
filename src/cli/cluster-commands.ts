import { Command } from "commander";
import {
  ClusterHealth,
  ClusterSchema,
  ClusterService,
  ForgetWorkerResponseSchema,
  UndrainWorkerResponseSchema,
  WorkerSchema,
  WorkerState,
} from "../gen/leasehold/v1/cluster_pb.js";
import type { createClient } from "../rpc/client.js";
import {
  age,
  count,
  enumFilterOption,
  enumName,
  limitOption,
  listUpTo,
  messageJson,
  printJson,
  printLine,
  printTable,
  time,
  withServer,
} from "./output.js";

type ClusterClient = ReturnType<typeof createClient<(typeof ClusterService)["method"]>>;

const withClient = (command: Command, fn: (api: ClusterClient, json: boolean) => Promise<void>) =>
  withServer(
    command,
    (connect) => ({ api: connect(ClusterService) }),
    ({ api }, g) => fn(api, g.json),
  );

/** "2 workers without a stream are reaped at their deadline", with the verb of the count. */
const inGrace = (n: number) =>
  n === 1
    ? "1 worker without a stream is reaped at its deadline"
    : `${n} workers without a stream are reaped at their deadline`;

/** `leasehold workers …`: list, drain, undrain and forget. */
export function workerCommands(): Command {
  const workers = new Command("workers").description(
    "Show workers, drain them and end their drains, and forget workers that are gone.",
  );
  workers
    .command("list")
    .description(
      "List workers (by id) with their state, when the server last heard from each, the server process " +
        "hosting its session, its deadline and held leases (--json adds the session ids and labels).",
    )
    .option("--cluster <name>", "only of this cluster")
    .addOption(enumFilterOption("--state <state>", "only in this state", WorkerState))
    .addOption(limitOption())
    .action(async (o: { cluster?: string; state?: WorkerState; limit?: number }, command: Command) =>
      withClient(command, async (api, json) => {
        const state = o.state ?? WorkerState.UNSPECIFIED;
        const list = await listUpTo(
          o.limit,
          (page) => api.listWorkers({ cluster: o.cluster ?? "", state, ...page }),
          (r) => r.workers,
          { order: "first", noun: "worker" },
        );
        if (json) return printJson({ workers: list.map((w) => messageJson(WorkerSchema, w)) });
        printTable(
          ["WORKER", "CLUSTER", "STATE", "SLOTS", "HELD", "LAST SEEN", "DEADLINE", "DRAINING", "SERVER"],
          list.map((w) => [
            w.workerId,
            w.cluster,
            enumName(WorkerState, w.state),
            String(w.capacity),
            w.heldLeases.map((l) => `${l.actionId}@${l.epoch}`).join(",") || "-",
            // A hung agent stays CONNECTED until its deadline: its last contact ageing is what shows it.
            age(w.lastSeenTime),
            time(w.session?.deadline),
            w.draining ? "yes" : "no",
            // The id the hosting `leasehold serve` logs when it starts ("serverId").
            w.session?.serverId || "-",
          ]),
        );
        // A worker in grace is kept past its deadline while its cluster's expiries are
        // paused (a partition), which the rows alone do not show.
        const graceClusters = new Set(
          list.filter((w) => w.state === WorkerState.IN_GRACE).map((w) => w.cluster),
        );
        if (graceClusters.size === 0) return undefined;
        const { clusters } = await api.listClusters({});
        for (const c of clusters) {
          if (!graceClusters.has(c.name) || !c.expiriesPaused) continue;
          printLine(
            `cluster ${c.name} is partitioned: its expiries are paused, so sessions past their deadline are kept ` +
              `(leasehold clusters resume-expiries ${c.name} reaps them)`,
          );
        }
        return undefined;
      }),
    );
  workers
    .command("drain")
    .description(
      "Stop new grants to a worker and ask it to finish what it holds. The drain lasts until " +
        "`leasehold workers undrain` or the end of the worker's session (a goodbye, or reaped): the reference " +
        "agent stays connected and idle meanwhile, and takes work again after an undrain, or once restarted.",
    )
    .argument("<worker-id>")
    .option("--reason <text>", "why, sent to the worker")
    .action(async (workerId: string, o: Record<string, string | undefined>, command: Command) =>
      withClient(command, async (api, json) => {
        const { worker } = await api.drainWorker({ workerId, reason: o.reason ?? "" });
        if (json) printJson({ worker: worker && messageJson(WorkerSchema, worker) });
        else
          printLine(
            `${workerId} is draining (${count(worker?.heldLeases.length ?? 0, "lease")} still held); ` +
              `\`leasehold workers undrain ${workerId}\` ends the drain`,
          );
      }),
    );
  workers
    .command("undrain")
    .description(
      "End a worker's drain: its session is granted work again at once. A worker that is not draining is " +
        "left as it is. A worker that stopped taking grants itself (an agent closing) stays stopped.",
    )
    .argument("<worker-id>")
    .option("--reason <text>", "why, recorded in the event")
    .action(async (workerId: string, o: Record<string, string | undefined>, command: Command) =>
      withClient(command, async (api, json) => {
        const response = await api.undrainWorker({ workerId, reason: o.reason ?? "" });
        if (json) printJson(messageJson(UndrainWorkerResponseSchema, response));
        else
          printLine(
            response.drainEnded
              ? `${workerId} is no longer draining: it is granted work again`
              : `${workerId} was not draining: nothing changed`,
          );
      }),
    );
  workers
    .command("forget")
    .description(
      "Forget a worker that has no live session, as --worker-retention does once it ages out: its id is free " +
        "at once for a new worker, in any cluster (its history stays). A worker still connected, or in grace, " +
        "is refused: stop its agent first.",
    )
    .argument("<worker-id>")
    .option("--reason <text>", "why, recorded in the event")
    .action(async (workerId: string, o: Record<string, string | undefined>, command: Command) =>
      withClient(command, async (api, json) => {
        const response = await api.forgetWorker({ workerId, reason: o.reason ?? "" });
        if (json) printJson(messageJson(ForgetWorkerResponseSchema, response));
        else
          printLine(
            `${workerId} forgotten (it was in cluster ${response.worker?.cluster ?? "?"}): its id is free`,
          );
      }),
    );
  return workers;
}

/** `leasehold clusters list|resume-expiries`. */
export function clusterCommands(): Command {
  const clusters = new Command("clusters").description(
    "Show clusters and their health; resume the expiries of a partitioned one.",
  );
  clusters
    .command("list")
    .description("List clusters with health and counts.")
    .action(async (_o: unknown, command: Command) =>
      withClient(command, async (api, json) => {
        const { clusters: list } = await api.listClusters({});
        if (json) return printJson({ clusters: list.map((c) => messageJson(ClusterSchema, c)) });
        printTable(
          ["CLUSTER", "HEALTH", "CONNECTED", "IN GRACE", "QUEUED", "LEASED", "EXPIRIES(5m)", "WHY"],
          list.map((c) => [
            c.name,
            enumName(ClusterHealth, c.health),
            String(c.connectedWorkers),
            String(c.workersInGrace),
            String(c.queuedActions),
            String(c.leasedActions),
            String(c.recentExpiries),
            c.healthReason || "-",
          ]),
        );
      }),
    );
  clusters
    .command("resume-expiries")
    .description(
      "Let the lease expiries of a partitioned cluster go on: its lost workers are really gone, so their work should move.",
    )
    .argument("<cluster>")
    .option("--reason <text>", "why, recorded in the event")
    .action(async (name: string, o: Record<string, string | undefined>, command: Command) =>
      withClient(command, async (api, json) => {
        const { cluster } = await api.resumeExpiries({ cluster: name, reason: o.reason ?? "" });
        if (json) printJson({ cluster: cluster && messageJson(ClusterSchema, cluster) });
        else printLine(`${name}: lease expiries resume (${inGrace(cluster?.workersInGrace ?? 0)})`);
      }),
    );
  return clusters;
}
