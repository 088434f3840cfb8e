/**
 * What a view is to the shell, and the filter controls the list views share.
 *
 * A view builds its element once: a header with its filters, and a content
 * part. `refresh` fetches and replaces the content part only, so a filter
 * being typed in keeps its focus and the page keeps its scroll.
 */
import type { Api } from "../api.js";
import type { Clock } from "../clock.js";
import { type Child, h, setChildren } from "../dom.js";
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

/**
 * A view made of `header` and a content part that `render` rebuilds at every
 * refresh (see View.refresh: `render` fetches what it shows with `signal`).
 */
export function createView(header: HTMLElement, render: (signal: AbortSignal) => Promise<Child>): View {
  const content = h("div", { class: "content" });
  return {
    element: h("section", { class: "view" }, header, content),
    async refresh(signal) {
      setChildren(content, await render(signal));
    },
  };
}

/** The view's header: its title, then its controls. */
export function viewHeader(title: Child, ...controls: Child[]): HTMLElement {
  return h("header", { class: "view-head" }, h("h1", null, title), h("div", { class: "filters" }, controls));
}

/** The id of the shell's datalist of known cluster names, for cluster filters. */
export const CLUSTER_LIST_ID = "known-clusters";

/**
 * A list view's filters, kept in the hash's query under their keys. Each
 * starts from the route's value ("" when absent); a change puts them all back
 * in the query and refetches.
 */
export interface Filters<K extends string> {
  /** The current values, live; "" is "any". */
  readonly values: Readonly<Record<K, string>>;
  /** True when any filter is set: an empty list is then "no match", not "nothing yet". */
  isFiltered(): boolean;
  /** A text filter for `key` (applied 250 ms after the last keystroke). */
  text(key: K, label: string, options?: TextFilterOptions): HTMLLabelElement;
  /** A text filter for a cluster name under `key`, suggesting the clusters the page knows. */
  cluster(key: K, label: string): HTMLLabelElement;
  /** A select for `key`; `choices` are [value, text] pairs, the first usually "any". */
  select(key: K, label: string, choices: Choices): HTMLLabelElement;
}

/**
 * Filters under `keys`, which also give their order in the query. `onChange`
 * runs first on every change (e.g. a pager going back to its first page).
 */
export function createFilters<K extends string>(
  ctx: ViewContext,
  keys: readonly K[],
  onChange: () => void = () => {},
): Filters<K> {
  const values = {} as Record<K, string>;
  for (const key of keys) values[key] = ctx.route.params.get(key) ?? "";
  const set = (key: K) => (value: string) => {
    values[key] = value;
    onChange();
    ctx.setQuery(values);
    ctx.refreshNow();
  };
  return {
    values,
    isFiltered: () => keys.some((key) => values[key] !== ""),
    text: (key, label, options) => textFilter(label, values[key], set(key), options),
    cluster: (key, label) => textFilter(label, values[key], set(key), { list: CLUSTER_LIST_ID }),
    select: (key, label, choices) => selectFilter(label, choices, values[key], set(key)),
  };
}

/** What a text filter may add: a placeholder (default "any"), a datalist for suggestions. */
export interface TextFilterOptions {
  placeholder?: string;
  list?: string;
}

/** A select's [value, text] pairs. */
export type Choices = readonly (readonly [string, string])[];

/** A labelled text filter calling `onChange` 250 ms after the last keystroke. */
function textFilter(
  label: string,
  value: string,
  onChange: (value: string) => void,
  options: TextFilterOptions = {},
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
function selectFilter(
  label: string,
  choices: Choices,
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

/** What an operator's button asks before it acts. */
export interface Ask {
  /** The question, saying what will happen. */
  readonly question: string;
  /** Whether the reason may be left empty. */
  readonly reasonRequired: boolean;
}

/**
 * A button that asks for a reason (recorded with the change), then calls
 * `act` with it, reports a failure in the banner and refetches the view.
 * Cancelling the prompt does nothing.
 */
export function operatorButton(
  ctx: ViewContext,
  label: string,
  ask: Ask,
  act: (reason: string) => Promise<unknown>,
): HTMLButtonElement {
  const button = h("button", { type: "button", class: "danger" }, label);
  button.addEventListener("click", () => {
    let reason = prompt(ask.question);
    while (ask.reasonRequired && reason !== null && reason.trim() === "")
      reason = prompt("A reason is required:");
    if (reason === null) return;
    button.disabled = true;
    act(reason.trim()).then(
      () => ctx.refreshNow(),
      (error: unknown) => {
        ctx.report(error);
        ctx.refreshNow();
      },
    );
  });
  return button;
}
