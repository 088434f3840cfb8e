/**
 * Hash routes: `#/workers?cluster=x&state=IN_GRACE`, `#/actions/<id>`, ...
 * The hash holds everything a view shows, so a link or a reload gives the
 * same view; filters edit it with replaceState (no history entry per
 * keystroke, and no hashchange to re-mount the view).
 */

/** The views, by the first segment of the hash (`action` and `lease` are the detail pages). */
export type ViewName = "clusters" | "workers" | "actions" | "action" | "leases" | "lease" | "events";

export interface Route {
  view: ViewName;
  /** The id of a detail page; empty for lists. */
  id: string;
  /** The query part: filters. */
  params: URLSearchParams;
}

/** Where an empty or unknown hash leads. */
export const DEFAULT_HASH = "#/workers";

const LISTS = new Set<string>(["clusters", "workers", "actions", "leases", "events"]);
const DETAILS: Record<string, ViewName> = { actions: "action", leases: "lease" };

/** The route of a hash; undefined for one that names no view. */
export function parseRoute(hash: string): Route | undefined {
  const [path = "", query = ""] = hash.replace(/^#/, "").split("?", 2);
  const [list = "", id, ...rest] = path.split("/").filter((s) => s !== "");
  const params = new URLSearchParams(query);
  if (rest.length > 0) return undefined;
  if (id === undefined) return LISTS.has(list) ? { view: list as ViewName, id: "", params } : undefined;
  const detail = DETAILS[list];
  if (detail === undefined) return undefined;
  try {
    return { view: detail, id: decodeURIComponent(id), params };
  } catch {
    return undefined; // a malformed %-escape
  }
}

/** A hash for `path` (e.g. `/workers`) with the non-empty `params`. */
export function href(path: string, params: Record<string, string | undefined> = {}): string {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) query.set(key, value);
  const q = query.toString();
  return q === "" ? `#${path}` : `#${path}?${q}`;
}

/** Links to the detail pages. */
export const actionHref = (id: string): string => `#/actions/${encodeURIComponent(id)}`;
export const leaseHref = (id: string): string => `#/leases/${encodeURIComponent(id)}`;
