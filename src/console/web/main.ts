/**
 * The console's shell: the top bar (tabs, live status, token), the banner,
 * and the current view. The view is refreshed when an event arrives (at most
 * a few times per second), every 5 s without events, and when it asks;
 * countdowns tick in place in between.
 */
import { createApi, describeError, tokenStore } from "./api.js";
import { createServerClock } from "./clock.js";
import { h, setChildren } from "./dom.js";
import { createEventFeed, type LiveStatus } from "./live.js";
import { createRefresher } from "./refresher.js";
import { DEFAULT_HASH, href, parseRoute, type Route, type ViewName } from "./router.js";
import { actionView } from "./views/action.js";
import { actionsView } from "./views/actions.js";
import { clustersView } from "./views/clusters.js";
import { eventsView } from "./views/events.js";
import { leaseView } from "./views/lease.js";
import { leasesView } from "./views/leases.js";
import { CLUSTER_LIST_ID, type View, type ViewFactory } from "./views/view.js";
import { workersView } from "./views/workers.js";
import { startTicker } from "./widgets.js";

/** Refreshes start at least this far apart, however many events arrive. */
const MIN_REFRESH_INTERVAL_MS = 250;
/**
 * Refetch this often even without events: a grace period ends by the clock,
 * and the server's event for it may come late or be missed across a reconnect.
 */
const FALLBACK_REFRESH_MS = 5000;
/** Countdowns are rewritten this often (tenths of seconds are shown). */
const TICK_MS = 200;

/** Each view, with the tab it lights up and the page title. */
const VIEWS: Record<ViewName, { create: ViewFactory; tab: string; title: string }> = {
  clusters: { create: clustersView, tab: "clusters", title: "Clusters" },
  workers: { create: workersView, tab: "workers", title: "Workers" },
  actions: { create: actionsView, tab: "actions", title: "Actions" },
  action: { create: actionView, tab: "actions", title: "Action" },
  leases: { create: leasesView, tab: "leases", title: "Scope leases" },
  lease: { create: leaseView, tab: "leases", title: "Scope lease" },
  events: { create: eventsView, tab: "events", title: "Events" },
};

function byId<T extends HTMLElement>(id: string, type: new () => T): T {
  const element = document.getElementById(id);
  if (!(element instanceof type)) throw new Error(`index.html lacks #${id}`);
  return element;
}

const viewRoot = byId("view", HTMLElement);
const bannerRoot = byId("banner", HTMLElement);
const liveRoot = byId("live", HTMLElement);
const liveText = byId("live-text", HTMLElement);
const tokenForm = byId("token-form", HTMLFormElement);
const tokenInput = byId("token", HTMLInputElement);
const clusterList = byId(CLUSTER_LIST_ID, HTMLDataListElement);

const clock = createServerClock();
const api = createApi({ baseUrl: location.origin, token: tokenStore.get, clock });
const feed = createEventFeed(api.events);

/** The mounted view and its route. */
let current: { view: View; route: Route } | undefined;
/** Mounts so far: a view's callbacks act only while it is the latest one. */
let mounts = 0;

// --- Banner -----------------------------------------------------------------

/**
 * Where the banner's error came from: a failed refresh goes away with the
 * next good one; a failed button stays until dismissed or the view changes.
 */
let bannerSource: "refresh" | "action" | undefined;

function showBanner(error: unknown, source: "refresh" | "action"): void {
  if (source === "refresh" && bannerSource === "action") return;
  const problem = describeError(error);
  bannerSource = source;
  bannerRoot.hidden = false;
  bannerRoot.dataset.code = problem.code;
  setChildren(
    bannerRoot,
    h("strong", null, problem.title),
    " ",
    h("span", { class: "detail" }, `Server: ${problem.code}: ${problem.detail}`),
    h("button", { type: "button", class: "close", title: "Dismiss", onclick: hideBanner }, "×"),
  );
}

function hideBanner(): void {
  bannerSource = undefined;
  bannerRoot.hidden = true;
  bannerRoot.replaceChildren();
}

// --- Views ------------------------------------------------------------------

const refresher = createRefresher(async (signal) => {
  if (current === undefined) return;
  try {
    await current.view.refresh(signal);
    delete viewRoot.dataset.failed;
    if (bannerSource === "refresh") hideBanner();
  } catch (error) {
    if (signal.aborted) return;
    // A view that never loaded says so instead of "Loading…".
    viewRoot.dataset.failed = "";
    showBanner(error, "refresh");
  }
}, MIN_REFRESH_INTERVAL_MS);

/** The route of the hash; an empty or unknown hash is replaced by DEFAULT_HASH. */
function routeOfHash(): Route {
  const route = parseRoute(location.hash);
  if (route !== undefined) return route;
  history.replaceState(null, "", DEFAULT_HASH);
  const fallback = parseRoute(DEFAULT_HASH);
  if (fallback === undefined) throw new Error(`DEFAULT_HASH ${DEFAULT_HASH} names no view`);
  return fallback;
}

/** Shows the view of the hash (at start and at every hashchange). */
function mount(): void {
  const route = routeOfHash();
  refresher.stop();
  hideBanner();
  delete viewRoot.dataset.failed;
  const entry = VIEWS[route.view];
  const generation = ++mounts;
  const isCurrent = (): boolean => generation === mounts;
  const view = entry.create({
    route,
    api,
    clock,
    feed,
    refreshNow: () => {
      if (isCurrent()) refresher.restart();
    },
    setQuery: (params) => {
      if (isCurrent()) history.replaceState(null, "", href(`/${route.view}`, params));
    },
    report: (error) => showBanner(error, "action"),
  });
  current = { view, route };
  setChildren(viewRoot, view.element);
  for (const tab of document.querySelectorAll<HTMLElement>("[data-tab]")) {
    const active = tab.dataset.tab === entry.tab;
    tab.classList.toggle("active", active);
    if (active) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  document.title = `${entry.title} · Leasehold`;
  window.scrollTo(0, 0);
  refresher.restart();
}

// --- Live status, token, cluster names --------------------------------------

function showLive(status: LiveStatus): void {
  liveRoot.dataset.live = status.state;
  liveRoot.title = status.state === "live" ? "Receiving events" : status.error || "Connecting…";
  liveText.textContent = status.state === "live" ? "live" : status.error ? "reconnecting…" : "connecting…";
}

const knownClusters = new Set<string>();

/** Fills the cluster filters' suggestions; best effort (a token may not list clusters). */
async function loadClusterNames(): Promise<void> {
  try {
    const { clusters } = await api.clusters.listClusters({});
    knownClusters.clear();
    for (const c of clusters) knownClusters.add(c.name);
    setChildren(
      clusterList,
      [...knownClusters].map((name) => h("option", { value: name })),
    );
  } catch {
    // Suggestions only: the filters work without them.
  }
}

tokenInput.value = tokenStore.get();
tokenForm.addEventListener("submit", (event) => event.preventDefault()); // Enter fires "change"
tokenInput.addEventListener("change", () => {
  tokenStore.set(tokenInput.value);
  tokenInput.value = tokenStore.get();
  feed.reconnect();
  void loadClusterNames();
  refresher.restart();
});

feed.onStatus((status) => {
  showLive(status);
  // The Events view shows the stream's state.
  if (current?.route.view === "events") refresher.request();
});
feed.onEvent((event) => {
  refresher.request();
  if (event.cluster !== "" && !knownClusters.has(event.cluster)) {
    knownClusters.add(event.cluster);
    void loadClusterNames();
  }
});

window.addEventListener("hashchange", mount);
setInterval(() => refresher.request(), FALLBACK_REFRESH_MS);
startTicker(document, clock, TICK_MS);
showLive(feed.status);
mount();
feed.start();
void loadClusterNames();
