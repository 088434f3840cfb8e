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
import { collectPages } from "../api.js";
import { h, setChildren } from "../dom.js";
import { enumName, enumValue, toMs } from "../format.js";
import { leaseHref } from "../router.js";
import { ago, badge, cmd, countdown, idLink, muted, NONE, table } from "../widgets.js";
import {
  CLUSTER_LIST_ID,
  selectFilter,
  textFilter,
  type View,
  type ViewContext,
  viewHeader,
} from "./view.js";

const PAGE = 100;

const STATES: readonly (readonly [string, string])[] = [
  ["", "any"],
  ...LeaseStateSchema.values
    .filter((v) => v.number !== 0)
    .map((v) => [v.localName, v.localName.toLowerCase().replace("_", " ")] as const),
];

export function leasesView(ctx: ViewContext): View {
  const filter = {
    state: ctx.route.params.get("state") ?? "",
    runtime: ctx.route.params.get("runtime") ?? "",
    label: ctx.route.params.get("label") ?? "",
  };
  let limit = PAGE;
  const changed = (): void => {
    limit = PAGE;
    ctx.setQuery(filter);
    ctx.refreshNow();
  };
  const content = h("div", { class: "content" });
  const element = h(
    "section",
    { class: "view" },
    viewHeader(
      "Scope leases",
      selectFilter("State", STATES, filter.state, (v) => {
        filter.state = v;
        changed();
      }),
      textFilter(
        "Runtime",
        filter.runtime,
        (v) => {
          filter.runtime = v;
          changed();
        },
        { list: CLUSTER_LIST_ID },
      ),
      textFilter("Label", filter.label, (v) => {
        filter.label = v;
        changed();
      }),
    ),
    content,
  );

  function row(l: Lease, now: number): HTMLTableRowElement {
    const state = enumName(LeaseStateSchema, l.state);
    const expire = toMs(l.expireTime);
    const closeReason = enumName(CloseReasonSchema, l.closeReason);
    const target = leaseHref(l.id);
    return h(
      "tr",
      {
        "data-lease": l.id,
        "data-state": state,
        class: "link-row",
        onclick: (e) => {
          if (!(e.target instanceof Element && e.target.closest("a"))) location.hash = target;
        },
      },
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

  return {
    element,
    async refresh(signal) {
      const { items, more } = await collectPages(limit, async (pageToken, pageSize) => {
        const page = await ctx.api.leases.listLeases(
          {
            state: enumValue(LeaseStateSchema, filter.state) ?? 0,
            runtime: filter.runtime,
            label: filter.label,
            pageSize,
            pageToken,
          },
          { signal },
        );
        return { items: page.leases, nextPageToken: page.nextPageToken };
      });
      const now = ctx.clock.now();
      const filtered = filter.state !== "" || filter.runtime !== "" || filter.label !== "";
      const moreButton = h("button", { type: "button" }, `Show ${PAGE} more`);
      moreButton.addEventListener("click", () => {
        limit += PAGE;
        moreButton.disabled = true;
        ctx.refreshNow();
      });
      setChildren(
        content,
        table(
          ["Lease", "Label", "Runtime", "State", "TTL left / closed", "Resources", "Created"],
          items.map((l) => row(l, now)),
          filtered
            ? "No scope leases match these filters."
            : ["No scope leases yet: open one with ", cmd("leasehold lease create --runtime NAME"), "."],
        ),
        items.length > 0
          ? h(
              "p",
              { class: "note" },
              `${items.length} lease${items.length === 1 ? "" : "s"}, oldest first. `,
              more ? moreButton : null,
            )
          : null,
      );
    },
  };
}
