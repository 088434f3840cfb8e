/**
 * A list shown a page at a time, oldest first, with a "Show N more" button.
 * Every refresh re-reads all the items shown so far, so the rows shown stay
 * current.
 */
import { collectPages, type Paging } from "../api.js";
import { type Child, h } from "../dom.js";
import type { ViewContext } from "./view.js";

export interface Pager {
  /** Back to the first page (the filters changed). */
  reset(): void;
  /** Reads as many items as are shown now (see collectPages). */
  collect<R extends { nextPageToken: string }, T>(
    list: (paging: Paging) => Promise<R>,
    itemsOf: (response: R) => readonly T[],
  ): Promise<{ items: T[]; more: boolean }>;
  /**
   * The note under the list: `3 actions, oldest first.`, with the button
   * when there are `more`; nothing for an empty list.
   */
  note(count: number, noun: string, more: boolean): Child;
}

/** Shows `pageSize` items, and `pageSize` more at each click of the button. */
export function createPager(ctx: ViewContext, pageSize: number): Pager {
  let limit = pageSize;
  return {
    reset() {
      limit = pageSize;
    },
    collect: (list, itemsOf) => collectPages(limit, list, itemsOf),
    note(count, noun, more) {
      if (count === 0) return null;
      const button = h("button", { type: "button" }, `Show ${pageSize} more`);
      button.addEventListener("click", () => {
        limit += pageSize;
        button.disabled = true;
        ctx.refreshNow();
      });
      return h(
        "p",
        { class: "note" },
        `${count} ${noun}${count === 1 ? "" : "s"}, oldest first. `,
        more ? button : null,
      );
    },
  };
}
