import { createHash } from "node:crypto";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import type { Clock } from "../store/clock.js";
import type { Db } from "../store/database.js";
import {
  type Closed,
  closeScopeLease,
  deleteClosedScopeLeases,
  deleteWorkspaceResource,
  expireScopeLeases,
  findResource,
  findScopeLease,
  insertResource,
  insertScopeLease,
  type LeaseRefusal,
  listResources,
  listScopeLeases,
  type NewResource,
  type Ownership,
  promoteResource,
  type ResourceRecord,
  readFileContent,
  type ScopeLeaseRecord,
  type ScopeLeaseState,
  setScopeLeaseResult,
} from "../store/scope-leases.js";
import type { JsonObject } from "../work/action.js";
import type { Page } from "../work/action-service.js";
import { type ChangeFeed, EVENTS_TOPIC } from "../work/change-feed.js";
import { decodePageToken, toPage } from "../work/page-token.js";

/** Limits of scope leases and resources. */
export interface ScopeLimits {
  /** TTL of a lease created without one. */
  readonly defaultTtlMs: number;
  /** Longest TTL a lease may ask for. */
  readonly maxTtlMs: number;
  /** Largest file content accepted. */
  readonly maxFileBytes: number;
}

export const SCOPE_DEFAULTS: ScopeLimits = {
  defaultTtlMs: 60 * 60_000,
  maxTtlMs: 24 * 60 * 60_000,
  maxFileBytes: 3 * 1024 * 1024,
};

/** Scope leases (SPEC §3): the transaction boundary around the resources of a run. */
export interface ScopeLeaseService extends AsyncDisposable {
  create(input: {
    runtime: string;
    label: string;
    ttlMs: number | undefined;
    requestId: string | undefined;
  }): Promise<ScopeLeaseRecord>;
  get(id: string): Promise<ScopeLeaseRecord>;
  list(
    filter: { state?: ScopeLeaseState | undefined; label?: string | undefined; runtime?: string | undefined },
    pageSize: number,
    pageToken: string,
  ): Promise<Page<ScopeLeaseRecord>>;
  promote(leaseId: string, kind: string, resourceId: string): Promise<ResourceRecord>;
  commit(leaseId: string): Promise<Closed>;
  rollback(leaseId: string): Promise<Closed>;
  setResult(leaseId: string, result: JsonObject): Promise<ScopeLeaseRecord>;
  delete(leaseId: string): Promise<void>;
  deleteMany(filter: { label?: string | undefined; closedBefore?: Date | undefined }): Promise<number>;
  createResource(input: NewResource): Promise<ResourceRecord>;
  getResource(id: string): Promise<ResourceRecord>;
  listResources(
    filter: { leaseId?: string | undefined; kind?: string | undefined; ownership?: Ownership | undefined },
    pageSize: number,
    pageToken: string,
  ): Promise<Page<ResourceRecord>>;
  readFile(id: string): Promise<Uint8Array>;
  deleteResource(id: string): Promise<void>;
  /** Rolls back leases past their TTL now (the loop does it every second). */
  expireDue(): Promise<string[]>;
  /** Starts the expiry loop. */
  start(): void;
  close(): Promise<void>;
}

export function createScopeLeaseService(deps: {
  db: Db;
  clock: Clock;
  feed: ChangeFeed;
  log: Logger;
  limits?: ScopeLimits;
}): ScopeLeaseService {
  const { db, clock, feed, log } = deps;
  const limits = deps.limits ?? SCOPE_DEFAULTS;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<unknown> | undefined;

  const notFound = (id: string) => LeaseholdError.notFound("lease", id);

  /** FAILED_PRECONDITION naming the lease's state, for any refused operation. */
  const refused = (leaseId: string, refusal: LeaseRefusal, what: string): LeaseholdError => {
    if (refusal.refused === "not_found") return notFound(leaseId);
    const lease = refusal.lease;
    const state =
      lease.state === "OPEN"
        ? "OPEN but past its TTL (being rolled back)"
        : `${lease.state}${lease.closeReason === "EXPIRED" ? " (its TTL passed)" : ""}`;
    return LeaseholdError.failedPrecondition(
      "LEASE_CLOSED",
      `cannot ${what}: lease ${leaseId} is ${state}; only an open lease can be changed`,
      { type: "LEASE_STATE", subject: `leases/${leaseId}`, description: `state is ${lease.state}` },
    );
  };
  const isRefusal = (value: object): value is LeaseRefusal => "refused" in value;

  async function expireDue(): Promise<string[]> {
    const expired = await expireScopeLeases(db, clock, 100);
    if (expired.length > 0) {
      log.info({ leases: expired }, "scope leases rolled back: their TTL passed");
      feed.publish(EVENTS_TOPIC);
    }
    return expired;
  }

  async function close(leaseId: string, how: "COMMITTED" | "ROLLED_BACK"): Promise<Closed> {
    const result = await closeScopeLease(db, clock, leaseId, how);
    if (isRefusal(result)) {
      // An open lease past its TTL: roll it back now, then report that.
      if (result.refused === "closed" && result.lease.state === "OPEN") {
        await expireDue();
        const lease = await findScopeLease(db, leaseId);
        if (lease)
          throw refused(leaseId, { refused: "closed", lease }, how === "COMMITTED" ? "commit" : "roll back");
      }
      throw refused(leaseId, result, how === "COMMITTED" ? "commit" : "roll back");
    }
    feed.publish(EVENTS_TOPIC);
    return result;
  }

  return {
    async create(input) {
      const ttlMs = input.ttlMs ?? limits.defaultTtlMs;
      if (ttlMs > limits.maxTtlMs) {
        throw LeaseholdError.invalidArgument(
          "ttl",
          `must be at most ${limits.maxTtlMs / 1000}s (the server's maximum)`,
        );
      }
      const { lease, created } = await insertScopeLease(db, clock, { ...input, ttlMs });
      if (
        !created &&
        (lease.runtime !== input.runtime || lease.label !== input.label || lease.ttlMs !== ttlMs)
      ) {
        throw new LeaseholdError(
          Code.AlreadyExists,
          `request_id ${JSON.stringify(input.requestId)} was already used for a different lease (${lease.id}); use a new request_id for a new lease`,
          { reason: "REQUEST_ID_REUSED", metadata: { lease_id: lease.id } },
        );
      }
      if (created) feed.publish(EVENTS_TOPIC);
      return lease;
    },
    async get(id) {
      const lease = await findScopeLease(db, id);
      if (!lease) throw notFound(id);
      return lease;
    },
    async list(filter, size, pageToken) {
      const cursor = decodePageToken(pageToken, filter);
      const rows = await listScopeLeases(db, filter, cursor?.after, size + 1);
      return toPage(rows, size, (l) => l.id, filter);
    },
    async promote(leaseId, kind, resourceId) {
      const result = await promoteResource(db, clock, leaseId, kind, resourceId);
      if ("refused" in result) {
        if (result.refused === "no_resource") {
          throw new LeaseholdError(
            Code.NotFound,
            `lease ${leaseId} owns no ${kind} ${JSON.stringify(resourceId)}; check the kind and id, or it was promoted already`,
            { reason: "RESOURCE_NOT_IN_LEASE" },
          );
        }
        throw refused(leaseId, result, `promote ${kind} ${resourceId}`);
      }
      feed.publish(EVENTS_TOPIC);
      return result;
    },
    commit: (leaseId) => close(leaseId, "COMMITTED"),
    rollback: (leaseId) => close(leaseId, "ROLLED_BACK"),
    async setResult(leaseId, result) {
      if (!(await setScopeLeaseResult(db, leaseId, result))) throw notFound(leaseId);
      return (await findScopeLease(db, leaseId)) as ScopeLeaseRecord;
    },
    async delete(leaseId) {
      const lease = await findScopeLease(db, leaseId);
      if (!lease) throw notFound(leaseId);
      if (lease.state === "OPEN") {
        throw LeaseholdError.failedPrecondition(
          "LEASE_OPEN",
          `lease ${leaseId} is OPEN; commit or roll it back first (delete only forgets closed leases)`,
          { type: "LEASE_STATE", subject: `leases/${leaseId}`, description: "state is OPEN" },
        );
      }
      await deleteClosedScopeLeases(db, { id: leaseId });
    },
    deleteMany: (filter) => deleteClosedScopeLeases(db, filter),
    async createResource(input) {
      if (input.content && input.content.byteLength > limits.maxFileBytes) {
        throw new LeaseholdError(
          Code.ResourceExhausted,
          `content: ${input.content.byteLength} bytes is over the server's file limit of ${limits.maxFileBytes} bytes`,
          { reason: "FILE_TOO_LARGE" },
        );
      }
      const sha256 = input.content ? createHash("sha256").update(input.content).digest("hex") : undefined;
      const result = await insertResource(db, clock, { ...input, ...(sha256 ? { sha256 } : {}) });
      if ("refused" in result) throw refused(input.leaseId ?? "", result, `create a ${input.kind} in it`);
      return result;
    },
    async getResource(id) {
      const resource = await findResource(db, id);
      if (!resource) throw LeaseholdError.notFound("resource", id);
      return resource;
    },
    async listResources(filter, size, pageToken) {
      const cursor = decodePageToken(pageToken, filter);
      const rows = await listResources(db, filter, cursor?.after, size + 1);
      return toPage(rows, size, (l) => l.id, filter);
    },
    async readFile(id) {
      const content = await readFileContent(db, id);
      if (!content) throw LeaseholdError.notFound("file", id);
      return content;
    },
    async deleteResource(id) {
      const outcome = await deleteWorkspaceResource(db, id);
      if (outcome === "not_found") throw LeaseholdError.notFound("resource", id);
      if (outcome === "lease_owned") {
        throw LeaseholdError.failedPrecondition(
          "RESOURCE_LEASE_OWNED",
          `resource ${id} belongs to an open lease; roll the lease back (or promote it first) instead`,
          { type: "OWNERSHIP", subject: `resources/${id}`, description: "ownership is LEASE" },
        );
      }
    },
    expireDue,
    start() {
      timer = setInterval(() => {
        if (running) return;
        running = expireDue()
          .catch((error: unknown) => log.warn({ err: error }, "scope lease expiry failed; retrying"))
          .finally(() => {
            running = undefined;
          });
      }, 1000);
      timer.unref();
    },
    async close() {
      clearInterval(timer);
      await running;
    },
    [Symbol.asyncDispose]() {
      return this.close();
    },
  };
}
