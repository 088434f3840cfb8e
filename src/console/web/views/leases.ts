/**
 * Scope leases (LeaseService.ListLeases): open ones count down to their TTL
 * rollback; closed ones say how they closed.
 */
import {
  CloseReason,
  CloseReasonSchema,
  type Lease,
  LeaseState,
  LeaseStateSchema,
} from "../../../gen/leasehold/v1/lease_pb.js";
import { h } from "../dom.js";
import { enumChoices, enumName, enumValue, toMs } from "../format.js";
import { leaseHref } from "../router.js";
import { ago, badge, cmd, countdown, idLink, linkRow, muted, NONE, table } from "../widgets.js";
import { createPager } from "./pager.js";
import { createFilters, createView, type View, type ViewContext, viewHeader } from "./view.js";

/** Leases per "more". */
const PAGE = 100;

const STATES = enumChoices(LeaseStateSchema, (name) => name.toLowerCase().replace("_", " "));

export function leasesView(ctx: ViewContext): View {
  const pager = createPager(ctx, PAGE);
  const filters = createFilters(ctx, ["state", "runtime", "label"], pager.reset);
  const header = viewHeader(
    "Scope leases",
    filters.select("state", "State", STATES),
    filters.cluster("runtime", "Runtime"),
    filters.text("label", "Label"),
  );

  function row(l: Lease, now: number): HTMLTableRowElement {
    const state = enumName(LeaseStateSchema, l.state);
    const expire = toMs(l.expireTime);
    const closeReason = enumName(CloseReasonSchema, l.closeReason);
    const target = leaseHref(l.id);
    return h(
      "tr",
      { "data-lease": l.id, "data-state": state, ...linkRow(target) },
      h("td", null, idLink(target, l.id)),
      h("td", null, l.label || NONE),
      h("td", null, l.runtime),
      h("td", null, badge(state)),
      h(
        "td",
        null,
        l.state === LeaseState.OPEN && expire !== undefined
          ? countdown(expire, now)
          : l.closeReason === CloseReason.UNSPECIFIED
            ? NONE
            : [
                badge(closeReason, closeReason.toLowerCase().replace("_", " ")),
                " ",
                ago(toMs(l.closeTime), now),
              ],
      ),
      h("td", { class: "num" }, l.ownedResources),
      h("td", null, ago(toMs(l.createTime), now), l.createdBy ? muted(` by ${l.createdBy}`) : null),
    );
  }

  return createView(header, async (signal) => {
    const { state, runtime, label } = filters.values;
    const { items, more } = await pager.collect(
      (paging) =>
        ctx.api.leases.listLeases(
          { state: enumValue(LeaseStateSchema, state) ?? 0, runtime, label, ...paging },
          { signal },
        ),
      (page) => page.leases,
    );
    const now = ctx.clock.now();
    return [
      table(
        ["Lease", "Label", "Runtime", "State", "TTL left / closed", "Resources", "Created"],
        items.map((l) => row(l, now)),
        filters.isFiltered()
          ? "No scope leases match these filters."
          : ["No scope leases yet: open one with ", cmd("leasehold lease create --runtime NAME"), "."],
      ),
      pager.note(items.length, "lease", more),
    ];
  });
}
