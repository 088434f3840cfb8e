/**
 * Events: the page's live feed, newest first, filtered in the page (no
 * fetch: a refresh re-renders what the stream brought).
 */
import { type Event, EventKindSchema } from "../../../gen/leasehold/v1/event_pb.js";
import { h } from "../dom.js";
import { enumChoices, enumName, kindLabel, toMs } from "../format.js";
import { FEED_SIZE } from "../live.js";
import { actionHref, href } from "../router.js";
import { badge, clock, idLink, muted, NONE, table } from "../widgets.js";
import { createFilters, createView, type View, type ViewContext, viewHeader } from "./view.js";

const KINDS = enumChoices(EventKindSchema, kindLabel);

export function eventsView(ctx: ViewContext): View {
  const filters = createFilters(ctx, ["cluster", "kind"]);
  const header = viewHeader(
    "Events",
    filters.cluster("cluster", "Cluster"),
    filters.select("kind", "Kind", KINDS),
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

  const matches = (e: Event): boolean => {
    const { cluster, kind } = filters.values;
    return (
      (cluster === "" || e.cluster === cluster) && (kind === "" || enumName(EventKindSchema, e.kind) === kind)
    );
  };

  return createView(header, async () => {
    const { events, status } = ctx.feed;
    const shown = events.filter(matches);
    const filtered = filters.isFiltered();
    return [
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
    ];
  });
}
