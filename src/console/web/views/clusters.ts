/**
 * Clusters: health and counts per cluster (ListClusters), with offline
 * workers counted from one ListWorkers call for all clusters, and the
 * operator's way out of a partition: Resume expiries.
 */
import { Code } from "@connectrpc/connect";
import { type Cluster, ClusterHealthSchema, WorkerState } from "../../../gen/leasehold/v1/cluster_pb.js";
import { type Api, collectPages, hasCode } from "../api.js";
import { h } from "../dom.js";
import { enumName, toMs } from "../format.js";
import { href } from "../router.js";
import { ago, badge, cmd, muted, NONE, table } from "../widgets.js";
import { createView, operatorButton, type View, type ViewContext, viewHeader } from "./view.js";

/** Offline workers counted per cluster; more than this many in all shows as a lower bound. */
const OFFLINE_LIMIT = 1000;

interface OfflineCounts {
  byCluster: Map<string, number>;
  /** There were more offline workers than OFFLINE_LIMIT: counts are lower bounds. */
  partial: boolean;
}

export function clustersView(ctx: ViewContext): View {
  function row(c: Cluster, offline: OfflineCounts | undefined): HTMLTableRowElement {
    const health = enumName(ClusterHealthSchema, c.health);
    const now = ctx.clock.now();
    const resumeButton = operatorButton(
      ctx,
      "Resume expiries",
      {
        question:
          `Resume lease expiries in ${c.name}?\n\nSessions past their deadline will be reaped and their actions re-queued. ` +
          "Say why you know the lost workers are really gone (recorded in the event):",
        reasonRequired: true,
      },
      (reason) => ctx.api.clusters.resumeExpiries({ cluster: c.name, reason }),
    );
    return h(
      "tr",
      { "data-cluster": c.name, "data-health": health },
      h("td", null, h("a", { href: href("/workers", { cluster: c.name }), class: "strong" }, c.name)),
      h("td", null, badge(health, undefined, { title: c.healthReason }), " ", muted(c.healthReason)),
      h("td", { class: "num" }, c.connectedWorkers),
      h("td", { class: c.workersInGrace > 0 ? "num warn" : "num" }, c.workersInGrace),
      h("td", { class: "num" }, offlineCell(c.name, offline)),
      h("td", { class: "num" }, c.queuedActions),
      h("td", { class: "num" }, c.leasedActions),
      h("td", { class: c.recentExpiries > 0 ? "num bad" : "num" }, c.recentExpiries),
      h("td", null, ago(toMs(c.partitionedTime), now)),
      h("td", null, c.expiriesPaused ? [badge("PAUSED", "paused"), " ", resumeButton] : NONE),
    );
  }

  return createView(viewHeader("Clusters"), async (signal) => {
    const [{ clusters }, offline] = await Promise.all([
      ctx.api.clusters.listClusters({}, { signal }),
      countOffline(ctx.api, signal),
    ]);
    return [
      table(
        [
          "Cluster",
          "Health",
          "Connected",
          "In grace",
          "Offline",
          "Queued",
          "Leased",
          "Recent expiries",
          "Partitioned since",
          "Expiries",
        ],
        clusters.map((c) => row(c, offline)),
        [
          "No clusters yet: a cluster appears when its first agent connects (",
          cmd("leasehold agent --cluster NAME …"),
          ") or an action targets it (",
          cmd("leasehold action submit --cluster NAME -- …"),
          ").",
        ],
      ),
    ];
  });
}

function offlineCell(cluster: string, offline: OfflineCounts | undefined): string | HTMLElement {
  if (offline === undefined) {
    return h("span", { title: "Counting offline workers needs worker.read in every cluster" }, NONE);
  }
  const n = offline.byCluster.get(cluster) ?? 0;
  return offline.partial
    ? h("span", { title: `more than ${OFFLINE_LIMIT} offline workers in all` }, `${n}+`)
    : String(n);
}

/**
 * Offline workers per cluster from one ListWorkers call (not one per
 * cluster). A token whose worker.read is limited to some clusters may not
 * list all of them: the column then shows no counts rather than failing the
 * view.
 */
async function countOffline(api: Api, signal: AbortSignal): Promise<OfflineCounts | undefined> {
  try {
    const { items, more } = await collectPages(
      OFFLINE_LIMIT,
      (paging) => api.clusters.listWorkers({ state: WorkerState.OFFLINE, ...paging }, { signal }),
      (page) => page.workers,
    );
    const byCluster = new Map<string, number>();
    for (const w of items) byCluster.set(w.cluster, (byCluster.get(w.cluster) ?? 0) + 1);
    return { byCluster, partial: more };
  } catch (error) {
    if (hasCode(error, Code.PermissionDenied)) return undefined;
    throw error;
  }
}
