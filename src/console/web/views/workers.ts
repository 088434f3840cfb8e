/**
 * Workers: who is connected, who is in grace and for how long, and what each
 * holds. The deadline column counts down live between refetches.
 */
import { type Worker, WorkerState, WorkerStateSchema } from "../../../gen/leasehold/v1/cluster_pb.js";
import { collectPages } from "../api.js";
import { h } from "../dom.js";
import { enumName, enumValue, shortId, toMs } from "../format.js";
import { actionHref, href } from "../router.js";
import { ago, badge, cmd, countdown, muted, NONE, table } from "../widgets.js";
import {
  createFilters,
  createView,
  operatorButton,
  type View,
  type ViewContext,
  viewHeader,
} from "./view.js";

/** Workers shown at most (ListWorkers pages are followed up to this many). */
const WORKER_LIMIT = 1000;

const STATES = [
  ["", "any"],
  ["CONNECTED", "connected"],
  ["IN_GRACE", "in grace"],
  ["OFFLINE", "offline"],
] as const;

export function workersView(ctx: ViewContext): View {
  const filters = createFilters(ctx, ["cluster", "state"]);
  const header = viewHeader(
    "Workers",
    filters.cluster("cluster", "Cluster"),
    filters.select("state", "State", STATES),
  );

  function row(w: Worker, now: number): HTMLTableRowElement {
    const state = enumName(WorkerStateSchema, w.state);
    const deadline = toMs(w.session?.deadline);
    const lost = toMs(w.session?.streamLostTime);
    return h(
      "tr",
      { "data-worker": w.workerId, "data-state": state },
      h(
        "td",
        null,
        // Worker ids are chosen by operators (hostnames and the like): shown whole.
        h(
          "a",
          { href: href("/actions", { worker: w.workerId }), class: "id", title: "Show its actions" },
          w.workerId,
        ),
      ),
      h("td", null, h("a", { href: href("/workers", { cluster: w.cluster }) }, w.cluster)),
      h("td", null, badge(state)),
      h(
        "td",
        null,
        w.draining
          ? [
              badge("DRAINING", "draining"),
              " ",
              operatorButton(
                ctx,
                "Undrain",
                {
                  question:
                    `End the drain of ${w.workerId}?\n\nIt is granted new actions again at once. ` +
                    "Why (optional, recorded in the event):",
                  reasonRequired: false,
                },
                (reason) => ctx.api.clusters.undrainWorker({ workerId: w.workerId, reason }),
              ),
            ]
          : w.state === WorkerState.OFFLINE
            ? NONE
            : operatorButton(
                ctx,
                "Drain",
                {
                  question:
                    `Drain ${w.workerId}?\n\nIt gets no new actions until you undrain it or its session ends; ` +
                    "the ones it holds finish. The reference agent then stays connected and idle. " +
                    "Why (optional, recorded in the event):",
                  reasonRequired: false,
                },
                (reason) => ctx.api.clusters.drainWorker({ workerId: w.workerId, reason }),
              ),
      ),
      h("td", { class: "num" }, `${w.heldLeases.length}/${w.capacity}`),
      h(
        "td",
        null,
        w.heldLeases.length === 0
          ? NONE
          : w.heldLeases.map((l) =>
              h(
                "a",
                { href: actionHref(l.actionId), class: "lease-chip", title: l.actionId },
                h("code", null, shortId(l.actionId)),
                ` epoch ${l.epoch}`,
              ),
            ),
      ),
      h(
        "td",
        { class: "deadline" },
        deadline === undefined ? NONE : countdown(deadline, now),
        lost === undefined ? null : h("div", { class: "muted" }, "stream lost ", ago(lost, now)),
      ),
      h("td", null, ago(toMs(w.lastSeenTime), now)),
      h("td", null, w.agentVersion === "" ? NONE : muted(w.agentVersion)),
    );
  }

  return createView(header, async (signal) => {
    const { cluster, state } = filters.values;
    const { items, more } = await collectPages(
      WORKER_LIMIT,
      (paging) =>
        ctx.api.clusters.listWorkers(
          { cluster, state: enumValue(WorkerStateSchema, state) ?? 0, ...paging },
          { signal },
        ),
      (page) => page.workers,
    );
    const now = ctx.clock.now();
    return [
      table(
        ["Worker", "Cluster", "State", "Draining", "Slots", "Held leases", "Deadline", "Last seen", "Agent"],
        items.map((w) => row(w, now)),
        filters.isFiltered()
          ? "No workers match these filters."
          : ["No workers yet: start an agent with ", cmd("leasehold agent --cluster NAME"), "."],
      ),
      more
        ? h("p", { class: "note" }, `Showing the first ${WORKER_LIMIT} workers: filter by cluster or state.`)
        : null,
    ];
  });
}
