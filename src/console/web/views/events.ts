/**
 * Events: the page's live feed, newest first, filtered in the page (no
 * fetch: a refresh re-renders what the stream brought).
 */
import { type Event, EventKindSchema } from "../../../gen/leasehold/v1/event_pb.js";
import { h, setChildren } from "../dom.js";
import { enumName, kindLabel, toMs } from "../format.js";
import { FEED_SIZE } from "../live.js";
import { actionHref, href } from "../router.js";
import { badge, clock, idLink, muted, NONE, table } from "../widgets.js";
import {
  CLUSTER_LIST_ID,
  selectFilter,
  textFilter,
  type View,
  type ViewContext,
  viewHeader,
} from "./view.js";

const KINDS: readonly (readonly [string, string])[] = [
  ["", "any"],
  ...EventKindSchema.values
    .filter((v) => v.number !== 0)
    .map((v) => [v.localName, kindLabel(v.localName)] as const),
];

export function eventsView(ctx: ViewContext): View {
  const filter = {
    cluster: ctx.route.params.get("cluster") ?? "",
    kind: ctx.route.params.get("kind") ?? "",
  };
  const changed = (): void => {
    ctx.setQuery(filter);
    ctx.refreshNow();
  };
  const content = h("div", { class: "content" });
  const element = h(
    "section",
    { class: "view" },
    viewHeader(
      "Events",
      textFilter(
        "Cluster",
        filter.cluster,
        (v) => {
          filter.cluster = v;
          changed();
        },
        { list: CLUSTER_LIST_ID },
      ),
      selectFilter("Kind", KINDS, filter.kind, (v) => {
        filter.kind = v;
        changed();
      }),
    ),
    content,
  );

  function row(e: Event): HTMLTableRowElement {
    const kind = enumName(EventKindSchema, e.kind);
    return h(
      "tr",
      { "data-event-seq": String(e.sequence), "data-kind": kind },
      h("td", null, clock(toMs(e.time))),
      h("td", null, badge(kind, kindLabel(kind))),
      h("td", null, e.cluster || NONE),
      h(
        "td",
        null,
        e.workerId ? h("a", { href: href("/actions", { worker: e.workerId }) }, e.workerId) : NONE,
      ),
      h("td", null, e.actionId ? idLink(actionHref(e.actionId), e.actionId) : NONE),
      h("td", { class: "num" }, e.epoch > 0n ? String(e.epoch) : NONE),
      h("td", { class: "message", title: e.actor ? `by ${e.actor}` : null }, e.message),
    );
  }

  const matches = (e: Event): boolean =>
    (filter.cluster === "" || e.cluster === filter.cluster) &&
    (filter.kind === "" || enumName(EventKindSchema, e.kind) === filter.kind);

  return {
    element,
    async refresh() {
      const { events, status } = ctx.feed;
      const shown = events.filter(matches);
      const filtered = filter.cluster !== "" || filter.kind !== "";
      setChildren(
        content,
        h(
          "p",
          { class: "note" },
          `Newest first: the last ${FEED_SIZE} events, live. `,
          filtered ? ` ${shown.length} of ${events.length} match the filters.` : null,
        ),
        table(
          ["Time", "Kind", "Cluster", "Worker", "Action", "Epoch", "Message"],
          shown.map(row),
          status.state !== "live" && events.length === 0
            ? ["Not connected to the event stream yet. ", muted(status.error)]
            : filtered
              ? "No events match these filters."
              : "No events yet: they appear here as agents connect and actions run.",
        ),
      );
    },
  };
}
