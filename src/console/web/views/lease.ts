/**
 * One scope lease (DebugLease, which unlike GetLease also returns its
 * resources with their ownership, its deployments with phases and container
 * states, and its recent events). Needs lease.debug in the lease's runtime.
 */
import { EventKindSchema } from "../../../gen/leasehold/v1/event_pb.js";
import {
  CloseReasonSchema,
  type Lease,
  LeaseState,
  LeaseStateSchema,
} from "../../../gen/leasehold/v1/lease_pb.js";
import {
  type Deployment,
  DeploymentPhaseSchema,
  OwnershipSchema,
  type Resource,
} from "../../../gen/leasehold/v1/resource_pb.js";
import { type Child, h } from "../dom.js";
import { enumName, kindLabel, spaced, toMs } from "../format.js";
import { actionHref, href } from "../router.js";
import { ago, badge, clock, countdown, idLink, idText, muted, NONE, table } from "../widgets.js";
import { detailHeader, foldedJson, summaryGrid } from "./detail.js";
import { createView, type View, type ViewContext } from "./view.js";

/** Recent events DebugLease returns with the lease. */
const EVENT_LIMIT = 50;

export function leaseView(ctx: ViewContext): View {
  const id = ctx.route.id;
  const header = detailHeader("Scope lease", id, { href: "#/leases", text: "← all leases" });

  return createView(header, async (signal) => {
    const debug = await ctx.api.leases.debugLease({ leaseId: id, eventLimit: EVENT_LIMIT }, { signal });
    const now = ctx.clock.now();
    return [
      debug.lease ? summary(debug.lease, now) : null,
      h("h2", null, "Resources"),
      table(
        ["Resource", "Kind", "Name", "Ownership", "Created"],
        debug.resources.map((r) => resourceRow(r, now)),
        "No resources: a resource enters the lease when it is created with the lease's id.",
      ),
      h("h2", null, "Deployments"),
      debug.deployments.length === 0
        ? h("div", { class: "empty" }, "No deployments.")
        : debug.deployments.map(deployment),
      h("h2", null, "Recent events"),
      table(
        ["Time", "Kind", "Message"],
        debug.events.map((e) => {
          const kind = enumName(EventKindSchema, e.kind);
          return h(
            "tr",
            { "data-event-seq": String(e.sequence) },
            h("td", null, clock(toMs(e.time))),
            h("td", null, badge(kind, kindLabel(kind))),
            h("td", null, e.message),
          );
        }),
        "No events.",
      ),
    ];
  });
}

function summary(l: Lease, now: number): HTMLElement {
  const state = enumName(LeaseStateSchema, l.state);
  const expire = toMs(l.expireTime);
  const fields: [string, Child][] = [
    ["State", badge(state, spaced(state), { "data-lease-state": state })],
    ["Runtime", h("a", { href: href("/workers", { cluster: l.runtime }) }, l.runtime)],
    ["Label", l.label || NONE],
    [
      "TTL left",
      l.state === LeaseState.OPEN && expire !== undefined
        ? countdown(expire, now)
        : [
            spaced(enumName(CloseReasonSchema, l.closeReason)).toLowerCase(),
            " ",
            ago(toMs(l.closeTime), now),
          ],
    ],
    ["Owned resources", l.ownedResources],
    ["Created", [ago(toMs(l.createTime), now), l.createdBy ? muted(` by ${l.createdBy}`) : null]],
  ];
  return h("div", null, summaryGrid(fields), foldedJson("Result", l.result));
}

function resourceRow(r: Resource, now: number): HTMLTableRowElement {
  const ownership = enumName(OwnershipSchema, r.ownership);
  return h(
    "tr",
    { "data-resource": r.id },
    h("td", null, idText(r.id)),
    h("td", null, r.kind),
    h("td", null, resourceName(r)),
    h("td", null, badge(ownership)),
    h("td", null, ago(toMs(r.createTime), now)),
  );
}

/** Resources have no name field: a file's is its file name, a deployment's its containers'. */
function resourceName(r: Resource): Child {
  switch (r.body.case) {
    case "file":
      return r.body.value.name;
    case "deployment":
      return muted(r.body.value.spec?.containers.map((c) => c.name).join(", ") ?? NONE);
    default:
      return NONE;
  }
}

function deployment(d: Deployment): HTMLElement {
  const phase = enumName(DeploymentPhaseSchema, d.phase);
  return h(
    "div",
    { class: "deployment", "data-deployment": d.id, "data-phase": phase },
    h(
      "div",
      { class: "deployment-head" },
      h("strong", null, "Deployment "),
      idText(d.id),
      " ",
      badge(phase),
      d.actionId ? [" action ", idLink(actionHref(d.actionId), d.actionId)] : null,
      d.message ? [" ", muted(d.message)] : null,
    ),
    table(
      ["Container", "State", "Exit code", "Message"],
      d.containers.map((c) =>
        h(
          "tr",
          { "data-container": c.name },
          h("td", null, c.name),
          h("td", null, badge(c.state, c.state)),
          h("td", { class: "num" }, c.state === "exited" ? c.exitCode : NONE),
          h("td", null, c.message || NONE),
        ),
      ),
      "No container has reported yet.",
    ),
    d.outputFileIds.length > 0
      ? h(
          "p",
          { class: "note" },
          "Outputs: ",
          d.outputFileIds.map((f) => [idText(f), " "]),
        )
      : null,
  );
}
