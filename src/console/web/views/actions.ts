/**
 * Actions: filtered by state, cluster and the worker that was granted them,
 * in submission order (the API lists oldest first), a page at a time.
 */
import { type Action, ActionStateSchema } from "../../../gen/leasehold/v1/action_pb.js";
import { h } from "../dom.js";
import { enumChoices, enumName, enumValue, toMs } from "../format.js";
import { actionHref, href } from "../router.js";
import { ago, badge, cmd, idLink, linkRow, muted, NONE, table } from "../widgets.js";
import { createPager } from "./pager.js";
import { createFilters, createView, type View, type ViewContext, viewHeader } from "./view.js";

/** Actions per "more". */
const PAGE = 100;

const STATES = enumChoices(ActionStateSchema, (name) => name.toLowerCase());

export function actionsView(ctx: ViewContext): View {
  const pager = createPager(ctx, PAGE);
  const filters = createFilters(ctx, ["state", "cluster", "worker"], pager.reset);
  const header = viewHeader(
    "Actions",
    filters.select("state", "State", STATES),
    filters.cluster("cluster", "Cluster"),
    filters.text("worker", "Worker", { placeholder: "granted to" }),
  );

  function row(a: Action, now: number): HTMLTableRowElement {
    const state = enumName(ActionStateSchema, a.state);
    const target = actionHref(a.id);
    const holder = a.lease?.workerId ?? "";
    return h(
      "tr",
      { "data-action": a.id, "data-state": state, ...linkRow(target) },
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

  return createView(header, async (signal) => {
    const { state, cluster, worker } = filters.values;
    const { items, more } = await pager.collect(
      (paging) =>
        ctx.api.actions.listActions(
          { state: enumValue(ActionStateSchema, state) ?? 0, cluster, workerId: worker, ...paging },
          { signal },
        ),
      (page) => page.actions,
    );
    const now = ctx.clock.now();
    return [
      table(
        ["Action", "State", "Cluster", "Epoch", "Holder", "Attempts", "Failure reason", "Updated"],
        items.map((a) => row(a, now)),
        filters.isFiltered()
          ? "No actions match these filters."
          : [
              "No actions yet: submit one with ",
              cmd("leasehold action submit --cluster NAME -- echo hi"),
              ".",
            ],
      ),
      pager.note(items.length, "action", more),
    ];
  });
}
