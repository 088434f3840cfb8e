/**
 * A tiny element builder. Children are appended as nodes or text nodes and
 * attributes are set with setAttribute, never parsed as markup: server data
 * can go anywhere in `h(...)` without escaping. No innerHTML in this page.
 */

/** What `h` accepts as children; nullish and booleans are skipped, arrays flattened. */
export type Child = Node | string | number | bigint | boolean | null | undefined | readonly Child[];

/** An event handler, set under an `on<event>` attribute name (e.g. `onclick`). */
export type Handler = (event: Event) => void;

/**
 * Attributes: strings and numbers are set as they are, `true` as an empty
 * attribute (`hidden`, `disabled`, `data-countdown`), `false` and nullish are
 * left out; a function under an `on*` name is added as a listener.
 */
export type Attrs = Record<string, string | number | bigint | boolean | null | undefined | Handler>;

/** Creates `<tag attrs>children</tag>`. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs?: Attrs | null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (typeof value === "function") {
      if (!name.startsWith("on")) throw new TypeError(`h: handler under "${name}" needs an on* name`);
      element.addEventListener(name.slice(2), value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else if (value !== false && value !== null && value !== undefined) {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

/** Replaces the children of `parent`, keeping `parent` itself (and its scroll and focus). */
export function setChildren(parent: Node & ParentNode, ...children: Child[]): void {
  parent.replaceChildren();
  append(parent, children);
}

function append(parent: Node, children: readonly Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || typeof child === "boolean") continue;
    if (isChildList(child)) append(parent, child);
    else parent.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function isChildList(child: Child): child is readonly Child[] {
  return Array.isArray(child);
}
