/**
 * Actions: filtered by state, cluster and the worker that was granted them,
 * in submission order (the API lists oldest first), a page at a time.
 */
import { type Action, ActionStateSchema } from "../../../gen/leasehold/v1/action_pb.js";
import { collectPages } from "../api.js";
import { h, setChildren } from "../dom.js";
import { enumName, enumValue, toMs } from "../format.js";
import { actionHref, href } from "../router.js";
import { ago, badge, cmd, idLink, muted, NONE, table } from "../widgets.js";
import {
  CLUSTER_LIST_ID,
  selectFilter,
  textFilter,
  type View,
  type ViewContext,
  viewHeader,
} from "./view.js";

/** Actions per "more". */
const PAGE = 100;

const STATES: readonly (readonly [string, string])[] = [
  ["", "any"],
  ...ActionStateSchema.values
    .filter((v) => v.number !== 0)
    .map((v) => [v.localName, v.localName.toLowerCase()] as const),
];

export function actionsView(ctx: ViewContext): View {
  const filter = {
    state: ctx.route.params.get("state") ?? "",
    cluster: ctx.route.params.get("cluster") ?? "",
    worker: ctx.route.params.get("worker") ?? "",
  };
  // How many actions to show; every refresh re-reads that many (so rows shown stay current).
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
      "Actions",
      selectFilter("State", STATES, filter.state, (v) => {
        filter.state = v;
        changed();
      }),
      textFilter(
        "Cluster",
        filter.cluster,
        (v) => {
          filter.cluster = v;
          changed();
        },
        { list: CLUSTER_LIST_ID },
      ),
      textFilter(
        "Worker",
        filter.worker,
        (v) => {
          filter.worker = v;
          changed();
        },
        { placeholder: "granted to" },
      ),
    ),
    content,
  );

  function row(a: Action, now: number): HTMLTableRowElement {
    const state = enumName(ActionStateSchema, a.state);
    const target = actionHref(a.id);
    const holder = a.lease?.workerId ?? "";
    return h(
      "tr",
      {
        "data-action": a.id,
        "data-state": state,
        class: "link-row",
        // The whole row opens the action; links inside it keep their own target.
        onclick: (e) => {
          if (!(e.target instanceof Element && e.target.closest("a"))) location.hash = target;
        },
      },
      h("td", null, idLink(target, a.id)),
      h(
        "td",
        null,
        badge(state),
        a.cancelRequested ? [" ", badge("CANCEL_REQUESTED", "cancel requested")] : null,
      ),
      h("td", null, a.cluster),
      h("td", { class: "num" }, a.epoch > 0n ? String(a.epoch) : NONE),
      h("td", null, holder === "" ? NONE : h("a", { href: href("/actions", { worker: holder }) }, holder)),
      h(
        "td",
        {
          class: "num",
          title: `${a.attemptCount} attempts, ${a.failureCount} failed, ${a.systemRetryCount} lease expiries`,
        },
        a.attemptCount,
      ),
      h("td", { class: "reason" }, a.failureReason || (a.lastError ? muted(a.lastError.message) : NONE)),
      h("td", null, ago(toMs(a.updateTime), now)),
    );
  }

  return {
    element,
    async refresh(signal) {
      const { items, more } = await collectPages(limit, async (pageToken, pageSize) => {
        const page = await ctx.api.actions.listActions(
          {
            state: enumValue(ActionStateSchema, filter.state) ?? 0,
            cluster: filter.cluster,
            workerId: filter.worker,
            pageSize,
            pageToken,
          },
          { signal },
        );
        return { items: page.actions, nextPageToken: page.nextPageToken };
      });
      const now = ctx.clock.now();
      const filtered = filter.state !== "" || filter.cluster !== "" || filter.worker !== "";
      const moreButton = h("button", { type: "button" }, `Show ${PAGE} more`);
      moreButton.addEventListener("click", () => {
        limit += PAGE;
        moreButton.disabled = true;
        ctx.refreshNow();
      });
      setChildren(
        content,
        table(
          ["Action", "State", "Cluster", "Epoch", "Holder", "Attempts", "Failure reason", "Updated"],
          items.map((a) => row(a, now)),
          filtered
            ? "No actions match these filters."
            : [
                "No actions yet: submit one with ",
                cmd("leasehold action submit --cluster NAME -- echo hi"),
                ".",
              ],
        ),
        items.length > 0
          ? h(
              "p",
              { class: "note" },
              `${items.length} action${items.length === 1 ? "" : "s"}, oldest first. `,
              more ? moreButton : null,
            )
          : null,
      );
    },
  };
}
