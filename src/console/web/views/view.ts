/**
 * What a view is to the shell, and the filter controls the list views share.
 *
 * A view builds its element once: a header with its filters, and a content
 * part. `refresh` fetches and replaces the content part only, so a filter
 * being typed in keeps its focus and the page keeps its scroll.
 */
import type { Api } from "../api.js";
import type { Clock } from "../clock.js";
import { type Child, h } from "../dom.js";
import type { EventFeed } from "../live.js";
import type { Route } from "../router.js";

export interface View {
  /** Mounted once by the shell. */
  readonly element: HTMLElement;
  /**
   * Fetches and re-renders the content. `signal` aborts when a newer refresh
   * or another view takes over. Rejects with the call's error; the shell
   * shows it in the banner.
   */
  refresh(signal: AbortSignal): Promise<void>;
}

/** What the shell gives a view. */
export interface ViewContext {
  readonly route: Route;
  readonly api: Api;
  readonly clock: Clock;
  readonly feed: EventFeed;
  /**
   * Refetches now, dropping a refresh in flight (a filter changed, an action
   * was taken). Does nothing once the view was left.
   */
  refreshNow(): void;
  /**
   * Puts the filters in the hash's query (replaceState: no history entry per
   * keystroke, no hashchange); empty values are left out. Does nothing once
   * the view was left (a debounced filter firing late).
   */
  setQuery(params: Record<string, string>): void;
  /** Shows an error in the banner (a button's call failed). */
  report(error: unknown): void;
}

export type ViewFactory = (context: ViewContext) => View;

/** The view's header: its title, then its controls. */
export function viewHeader(title: Child, ...controls: Child[]): HTMLElement {
  return h("header", { class: "view-head" }, h("h1", null, title), h("div", { class: "filters" }, controls));
}

/** The id of the shell's datalist of known cluster names, for cluster filters. */
export const CLUSTER_LIST_ID = "known-clusters";

/** A labelled text filter calling `onChange` 250 ms after the last keystroke. */
export function textFilter(
  label: string,
  value: string,
  onChange: (value: string) => void,
  options: { placeholder?: string; list?: string } = {},
): HTMLLabelElement {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const input = h("input", {
    type: "search",
    value,
    placeholder: options.placeholder ?? "any",
    list: options.list,
    spellcheck: "false",
    autocomplete: "off",
    oninput: () => {
      clearTimeout(timer);
      timer = setTimeout(() => onChange(input.value.trim()), 250);
    },
  });
  return h("label", { class: "filter" }, h("span", null, label), input);
}

/** A labelled select; `choices` are [value, text] pairs, the first usually "any". */
export function selectFilter(
  label: string,
  choices: readonly (readonly [string, string])[],
  value: string,
  onChange: (value: string) => void,
): HTMLLabelElement {
  const select = h(
    "select",
    { onchange: () => onChange(select.value) },
    choices.map(([v, text]) => h("option", { value: v, selected: v === value }, text)),
  );
  return h("label", { class: "filter" }, h("span", null, label), select);
}
