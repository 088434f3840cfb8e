/**
 * The small pieces every view uses: badges, ids, times, countdowns, tables,
 * empty states. Countdowns and "ago" times are plain elements carrying their
 * instant in a data attribute; one ticker rewrites their text in place.
 */
import type { Clock } from "./clock.js";
import { type Attrs, type Child, h } from "./dom.js";
import { clockTime, dateTime, shortId, spaced, timeAgo, timeLeft } from "./format.js";

/** Badge colours: ok green, busy amber, bad red, info blue, idle grey. */
type Tone = "ok" | "busy" | "bad" | "info" | "idle";

// Enum short names (of any of the API's enums) by tone; the rest are idle.
const TONES: Record<string, Tone> = {
  // WorkerState, ClusterHealth
  CONNECTED: "ok",
  IN_GRACE: "busy",
  HEALTHY: "ok",
  DEGRADED: "busy",
  UNHEALTHY: "bad",
  PARTITIONED: "bad",
  // ActionState, AttemptOutcome
  QUEUED: "info",
  LEASED: "busy",
  RUNNING: "busy",
  SUCCEEDED: "ok",
  FAILED: "bad",
  LEASE_EXPIRED: "bad",
  // LeaseState, CloseReason, Ownership, DeploymentPhase
  OPEN: "info",
  COMMITTED: "ok",
  ROLLED_BACK: "idle",
  EXPIRED: "bad",
  LEASE: "info",
  WORKSPACE: "ok",
  PENDING: "info",
  STARTING: "busy",
  READY: "ok",
  STOPPING: "busy",
  // ContainerState.state
  running: "ok",
  waiting: "info",
  // Flags shown as badges
  DRAINING: "busy",
  CANCEL_REQUESTED: "busy",
  PAUSED: "bad",
  // EventKind
  ACTION_SUBMITTED: "info",
  ACTION_SUCCEEDED: "ok",
  ACTION_FAILED: "bad",
  ACTION_RETRY_SCHEDULED: "busy",
  ACTION_CANCEL_REQUESTED: "busy",
  LEASE_GRANTED: "ok",
  LEASE_RESUMED: "ok",
  LEASE_REVOKED: "busy",
  REPORT_FENCED: "bad",
  SESSION_STARTED: "ok",
  SESSION_RESUMED: "ok",
  STREAM_LOST: "busy",
  SESSION_TAKEN_OVER: "busy",
  SESSION_REAPED: "bad",
  WORKER_DRAINING: "busy",
  CLUSTER_HEALTH_CHANGED: "busy",
  CLUSTER_PARTITIONED: "bad",
  CLUSTER_RECOVERED: "ok",
  CLUSTER_EXPIRIES_RESUMED: "busy",
  SCOPE_LEASE_COMMITTED: "ok",
  WORKER_UNDRAINED: "ok",
};

/** A coloured badge for an enum short name; `text` defaults to the name with spaces. */
export function badge(name: string, text: string = spaced(name), attrs: Attrs = {}): HTMLSpanElement {
  return h("span", { ...attrs, class: `badge tone-${TONES[name] ?? "idle"}` }, text);
}

/** An id in monospace, shortened, with the whole id in its title. */
export function idText(id: string): HTMLElement {
  return h("code", { class: "id", title: id }, shortId(id));
}

/** A shortened id linking to `target`. */
export function idLink(target: string, id: string, title: string = id): HTMLAnchorElement {
  return h("a", { href: target, class: "id", title }, shortId(id));
}

/** Placeholder for an absent value. */
export const NONE = "—";

/** A local `HH:MM:SS.mmm` with the full date in its title. */
export function clock(ms: number | undefined): Child {
  if (ms === undefined) return NONE;
  return h("time", { datetime: new Date(ms).toISOString(), title: dateTime(ms) }, clockTime(ms));
}

/**
 * A live countdown to `deadlineMs` (`4.2 s`, then `expired`), marked
 * `data-countdown` for tests and `data-deadline` for the ticker.
 */
export function countdown(deadlineMs: number, now: number): HTMLSpanElement {
  return h(
    "span",
    { class: "countdown", "data-countdown": true, "data-deadline": deadlineMs, title: dateTime(deadlineMs) },
    timeLeft(deadlineMs, now),
  );
}

/** A live "3.1 s ago" for `ms`, with the date in its title; NONE when unset. */
export function ago(ms: number | undefined, now: number): Child {
  if (ms === undefined) return NONE;
  return h(
    "time",
    { "data-since": ms, datetime: new Date(ms).toISOString(), title: dateTime(ms) },
    timeAgo(ms, now),
  );
}

/**
 * Starts rewriting every countdown and "ago" under `root` every
 * `intervalMs`, text only (no refetch, no re-render). Returns its `off`.
 */
export function startTicker(root: ParentNode, clockSource: Clock, intervalMs: number): () => void {
  const tick = (): void => {
    const now = clockSource.now();
    for (const el of root.querySelectorAll<HTMLElement>("[data-deadline]")) {
      setText(el, timeLeft(Number(el.dataset.deadline), now));
    }
    for (const el of root.querySelectorAll<HTMLElement>("[data-since]")) {
      setText(el, timeAgo(Number(el.dataset.since), now));
    }
  };
  const timer = setInterval(tick, intervalMs);
  return () => clearInterval(timer);
}

function setText(el: HTMLElement, text: string): void {
  if (el.textContent !== text) el.textContent = text;
}

/** A table with a sticky header; `empty` shows instead when there are no rows. */
export function table(head: readonly string[], rows: readonly Node[], empty: Child): HTMLElement {
  if (rows.length === 0) return h("div", { class: "empty" }, empty);
  return h(
    "table",
    { class: "grid" },
    h(
      "thead",
      null,
      h(
        "tr",
        null,
        head.map((title) => h("th", null, title)),
      ),
    ),
    h("tbody", null, rows),
  );
}

/** Inline command text in an empty state or note. */
export function cmd(text: string): HTMLElement {
  return h("code", { class: "cmd" }, text);
}

/** Muted secondary text. */
export function muted(...children: Child[]): HTMLElement {
  return h("span", { class: "muted" }, children);
}

/**
 * Attributes for a table row that opens `target` when clicked anywhere;
 * links inside the row keep their own target.
 */
export function linkRow(target: string): Attrs {
  return {
    class: "link-row",
    onclick: (e) => {
      if (!(e.target instanceof Element && e.target.closest("a"))) location.hash = target;
    },
  };
}
