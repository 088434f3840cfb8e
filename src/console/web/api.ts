/**
 * The page's view of the Leasehold API: Connect (JSON) clients for the
 * services the console server exposes, the bearer token the operator typed,
 * and what an error means to the operator.
 */
import { type Client, Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { ActionService } from "../../gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../gen/leasehold/v1/cluster_pb.js";
import { EventService } from "../../gen/leasehold/v1/event_pb.js";
import { LeaseService } from "../../gen/leasehold/v1/lease_pb.js";
import type { ServerClock } from "./clock.js";

/** One client per service the console serves (WorkerService is for agents, not browsers). */
export interface Api {
  readonly actions: Client<typeof ActionService>;
  readonly clusters: Client<typeof ClusterService>;
  readonly events: Client<typeof EventService>;
  readonly leases: Client<typeof LeaseService>;
}

export interface ApiOptions {
  /** Origin serving the Connect API, e.g. `location.origin`. */
  baseUrl: string;
  /** The bearer token to send, read at every call; empty for none. */
  token: () => string;
  /** Fed with every response's `date` header. */
  clock: ServerClock;
}

export function createApi(options: ApiOptions): Api {
  // Adds the token, and times each call for the server clock estimate.
  const interceptor: Interceptor = (next) => async (request) => {
    const token = options.token();
    if (token !== "") request.header.set("authorization", `Bearer ${token}`);
    const sent = Date.now();
    const response = await next(request);
    options.clock.observe(response.header.get("date"), sent, Date.now());
    return response;
  };
  const transport = createConnectTransport({
    baseUrl: options.baseUrl,
    useBinaryFormat: false,
    interceptors: [interceptor],
  });
  return {
    actions: createClient(ActionService, transport),
    clusters: createClient(ClusterService, transport),
    events: createClient(EventService, transport),
    leases: createClient(LeaseService, transport),
  };
}

const TOKEN_KEY = "leasehold.console.token";

/**
 * The operator's token, kept in sessionStorage: it lives as long as the tab
 * and is never written anywhere that outlasts it. A pasted `Bearer xyz` is
 * taken as `xyz`.
 */
export const tokenStore = {
  get(): string {
    return sessionStorage.getItem(TOKEN_KEY) ?? "";
  },
  set(token: string): void {
    const bare = token.trim().replace(/^bearer\s+/i, "");
    if (bare === "") sessionStorage.removeItem(TOKEN_KEY);
    else sessionStorage.setItem(TOKEN_KEY, bare);
  },
};

/** An error as the banner shows it. */
export interface Problem {
  /** What it means for the operator and what to do. */
  title: string;
  /** The server's own words (or the browser's, for a network failure). */
  detail: string;
  /** The gRPC code as grpcurl prints it, e.g. `PERMISSION_DENIED`. */
  code: string;
}

/** Says what went wrong with a call, in the operator's terms. */
export function describeError(error: unknown): Problem {
  const e = ConnectError.from(error);
  const code = (Code[e.code] ?? String(e.code)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
  const detail = e.rawMessage;
  switch (e.code) {
    case Code.Unauthenticated:
      return {
        title: "The server needs a token: enter one in the Token field at the top right.",
        detail,
        code,
      };
    case Code.PermissionDenied:
      return { title: "This token lacks the right this view needs.", detail, code };
    case Code.Unavailable:
      return { title: "The server cannot be reached; retrying.", detail, code };
    case Code.NotFound:
      return { title: "Not found.", detail, code };
    default:
      return { title: "The call failed.", detail, code };
  }
}

/** True when the error is the given code (after ConnectError.from). */
export function hasCode(error: unknown, code: Code): boolean {
  return ConnectError.from(error).code === code;
}

/** The paging fields of a List request (AIP-158). */
export interface Paging {
  pageToken: string;
  pageSize: number;
}

/**
 * Reads pages until `limit` items or the last page: `list` gets the token
 * and how many items are still wanted (at most 1000, the APIs' page limit),
 * `itemsOf` picks the items out of a response. `more` says the list goes on
 * past `limit`.
 */
export async function collectPages<R extends { nextPageToken: string }, T>(
  limit: number,
  list: (paging: Paging) => Promise<R>,
  itemsOf: (response: R) => readonly T[],
): Promise<{ items: T[]; more: boolean }> {
  const items: T[] = [];
  let token = "";
  do {
    const page = await list({ pageToken: token, pageSize: Math.min(1000, limit - items.length) });
    items.push(...itemsOf(page));
    token = page.nextPageToken;
  } while (token !== "" && items.length < limit);
  return { items: items.slice(0, limit), more: token !== "" };
}
