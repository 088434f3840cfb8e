/**
 * What the detail pages (one action, one scope lease) share: a header with
 * the whole id and a way back, a summary grid, and JSON folded away.
 */
import { type Child, h } from "../dom.js";
import { viewHeader } from "./view.js";

/** A detail page's header: `title` and the whole `id`, then a link back to the list. */
export function detailHeader(title: string, id: string, back: { href: string; text: string }): HTMLElement {
  return viewHeader(
    [`${title} `, h("code", { class: "id-full" }, id)],
    h("a", { href: back.href }, back.text),
  );
}

/** The summary at the top of a detail page: name and value pairs in a dense grid. */
export function summaryGrid(fields: readonly (readonly [string, Child])[]): HTMLElement {
  return h(
    "dl",
    { class: "summary" },
    fields.map(([name, value]) => h("div", null, h("dt", null, name), h("dd", null, value))),
  );
}

/** `value` as indented JSON, folded under `title`; nothing when it is unset. */
export function foldedJson(title: string, value: unknown): Child {
  if (value === undefined) return null;
  return h("details", null, h("summary", null, title), h("pre", null, JSON.stringify(value, null, 2)));
}
