import { createHash } from "node:crypto";
import type { Logger } from "pino";
import { Code, LeaseholdError, quote } from "../errors.js";
import { requestHash } from "../request-hash.js";
import { findActions, listAttempts } from "../store/actions.js";
import type { Clock } from "../store/clock.js";
import type { Db } from "../store/database.js";
import { cancelDeploymentActions, type EndedActions, requestOutputs } from "../store/deployments.js";
import { leasedInputClusters } from "../store/queries/leased-input-clusters.js";
import { readFileChunk } from "../store/queries/read-file-chunk.js";
import {
  type Closed,
  closeScopeLease,
  countLeaseResources,
  deleteClosedScopeLeases,
  deleteWorkspaceResource,
  deploymentActionIds,
  expireScopeLeases,
  findRequestedResource,
  findResource,
  findResources,
  findScopeLease,
  insertDeployment,
  insertResource,
  insertScopeLease,
  type LeaseRefusal,
  listResourcePage,
  listResources,
  listScopeLeases,
  lockOpen,
  type NewResource,
  promoteResource,
  type RequestIdReused,
  type ResourceFilter,
  type ResourceRecord,
  renewScopeLease,
  type ScopeLeaseRecord,
  type ScopeLeaseState,
  setScopeLeaseResult,
} from "../store/scope-leases.js";
import { ACTION_DEFAULTS, type ActionRecord, type JsonObject } from "../work/action.js";
import { actionTopic, type ChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "../work/change-feed.js";
import { failureLog } from "../work/failure-log.js";
import { type PAGE_BYTES, type Page, toPage } from "../work/page.js";
import { decodePageToken, issuedFor } from "../work/page-token.js";
import type { RevokeReason } from "../work/worker-messages.js";
import {
  type DeploymentPayload,
  type DeploymentView,
  deploymentView,
  FINAL_PHASES,
  type SkippedOutputView,
  skippedOutputsOf,
} from "./deployment.js";

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

/** A CreateDeployment request, by the principal `actor`. */
export interface DeploymentInput {
  readonly leaseId: string | undefined;
  readonly runtime: string | undefined;
  readonly spec: JsonObject;
  readonly actor: string;
  readonly requestId?: string | undefined;
}

/** The hash a deployment's request id is stored with: of the request, all but the id. */
const deploymentRequestHash = (input: DeploymentInput) => requestHash({ ...input, requestId: undefined });

/**
 * Scope leases (SPEC §3): the transaction boundary around the resources of a
 * run. `actor` arguments name the principal whose call it is: recorded as the
 * creator (`createdBy`) and on the events the change writes.
 */
export interface ScopeLeaseService extends AsyncDisposable {
  /**
   * Opens a lease on `runtime`. `requestId` is the actor's own idempotency
   * key: the same request again returns the lease it opened, a different one
   * is ALREADY_EXISTS, and another principal's use of the id opens a new lease.
   */
  create(input: {
    runtime: string;
    label: string;
    ttlMs: number | undefined;
    requestId: string | undefined;
    actor: string;
  }): Promise<ScopeLeaseRecord>;
  get(id: string): Promise<ScopeLeaseRecord>;
  /**
   * The lease, if it is open (its TTL may have passed: the operation itself
   * refuses that); else FAILED_PRECONDITION LEASE_CLOSED naming its state, as
   * the operation `what` would be refused. For checks that would otherwise
   * fail first for a reason the closed state explains (inputs it destroyed).
   */
  requireOpen(id: string, what: string): Promise<ScopeLeaseRecord>;
  /**
   * One page of leases. With `sizeOf` (a lease's size as the caller sends
   * it), the page also ends before that size passes {@link PAGE_BYTES}, with
   * a next page token; it always holds one lease.
   */
  list(
    filter: { state?: ScopeLeaseState | undefined; label?: string | undefined; runtime?: string | undefined },
    pageSize: number,
    pageToken: string,
    sizeOf?: (lease: ScopeLeaseRecord) => number,
  ): Promise<Page<ScopeLeaseRecord>>;
  promote(leaseId: string, kind: string, resourceId: string, actor: string): Promise<ResourceRecord>;
  /**
   * Moves an open lease's TTL rollback to `ttlMs` from now (its own TTL when
   * undefined); FAILED_PRECONDITION LEASE_CLOSED once it closed or its TTL
   * passed, INVALID_ARGUMENT past the server's maximum TTL.
   */
  renew(leaseId: string, ttlMs: number | undefined, actor: string): Promise<ScopeLeaseRecord>;
  commit(leaseId: string, actor: string): Promise<Closed>;
  rollback(leaseId: string, actor: string): Promise<Closed>;
  setResult(leaseId: string, result: JsonObject, actor: string): Promise<ScopeLeaseRecord>;
  /**
   * Forgets a closed lease; FAILED_PRECONDITION if it is open, or committed
   * with a deployment it kept that has not ended (its outputs still arrive).
   */
  delete(leaseId: string, actor: string): Promise<void>;
  /**
   * Forgets every closed lease matching `filter`; returns how many, how many
   * open leases it matches (none with `closedBefore`), and how many committed
   * ones whose kept deployments have not ended: those it left.
   */
  deleteMany(
    filter: {
      label?: string | undefined;
      runtime?: string | undefined;
      closedBefore?: Date | undefined;
    },
    actor: string,
  ): Promise<{ deleted: number; skippedOpen: number; skippedRunning: number }>;
  /**
   * Creates a file or object; `input.actor` is recorded on its `resource_created` event.
   * With `requestId` (the actor's idempotency key), a retry of the same request returns
   * the resource the first call created, and the key's reuse for another request is
   * ALREADY_EXISTS REQUEST_ID_REUSED.
   */
  createResource(
    input: Omit<NewResource, "sha256" | "request"> & { readonly requestId?: string | undefined },
  ): Promise<ResourceRecord>;
  getResource(id: string): Promise<ResourceRecord>;
  /**
   * The deployment an earlier call of `input.actor` with the same request id
   * and the same request created, if it still exists: what a retry of
   * {@link createDeployment} answers, whatever became of its lease since.
   * ALREADY_EXISTS REQUEST_ID_REUSED when that earlier request differed.
   */
  earlierDeployment(input: DeploymentInput): Promise<ResourceRecord | undefined>;
  /** The resources among `ids` that exist, by id, read at one moment (one statement). */
  findResources(ids: readonly string[]): Promise<Map<string, ResourceRecord>>;
  /**
   * One page of resources, with the deployments among them. With `sizeOf` (a
   * resource's size as the caller sends it, with its deployment's view), the
   * page also ends before that size passes {@link PAGE_BYTES}, with a next
   * page token; it always holds one resource.
   */
  listResources(
    filter: ResourceFilter,
    pageSize: number,
    pageToken: string,
    sizeOf?: (resource: ResourceRecord, deployment: DeploymentView | undefined) => number,
  ): Promise<ResourcePage>;
  /**
   * The first {@link SNAPSHOT_RESOURCES} resources created in lease `leaseId`,
   * oldest first, in full, and how many it has in all: for a snapshot of the
   * lease, which chooses what of them it sends.
   */
  resourcesOf(leaseId: string): Promise<{ readonly items: ResourceRecord[]; readonly total: number }>;
  /**
   * The actions of the deployments created in lease `leaseId`, the newest
   * first, at most `limit`, including those its close destroyed.
   */
  deploymentActionsOf(leaseId: string, limit: number): Promise<string[]>;
  /**
   * File `id`'s content in chunks of `chunkBytes` (the last one shorter; none
   * for an empty file), each read from the database only when the one before
   * it has been taken: a download holds one chunk at a time, and one whose
   * caller stops taking them reads nothing more. NOT_FOUND if there is no
   * such file, and also if it is deleted before its last chunk was read: a
   * download cut short never looks whole.
   */
  fileChunks(id: string, chunkBytes: number): AsyncGenerator<Uint8Array, void, undefined>;
  /**
   * The clusters where file `fileId` is an input of a deployment whose action
   * is leased right now to a live session `principal` opened; empty if none.
   */
  inputLeasedTo(fileId: string, principal: string): Promise<string[]>;
  deleteResource(id: string, actor: string): Promise<void>;
  /**
   * Creates a deployment and queues the action that runs it on an agent of its runtime;
   * `requestId` as for {@link createResource}.
   */
  createDeployment(input: DeploymentInput): Promise<ResourceRecord>;
  /** The deployments among `resources`, with their observed state, by resource id. */
  deploymentsOf(resources: readonly ResourceRecord[]): Promise<Map<string, DeploymentView>>;
  /**
   * The lease's deployments after every change until all are READY, one
   * stopped or failed, or `timeoutMs` passed. The last item has `done`.
   */
  wait(leaseId: string, timeoutMs: number, signal: AbortSignal): AsyncIterable<WaitUpdate>;
  /**
   * Asks the lease's deployments to save their outputs and stop, waits up to
   * `timeoutMs` for them to finish, and returns the ids of the files saved
   * and what their agents reported they did not save.
   */
  collectOutputs(
    leaseId: string,
    timeoutMs: number,
    signal: AbortSignal,
    actor: string,
  ): Promise<{ fileIds: string[]; skipped: SkippedOutputView[] }>;
  /** Rolls back leases past their TTL now (the loop does it every second). */
  expireDue(): Promise<string[]>;
  /** Starts the expiry loop. */
  start(): void;
  close(): Promise<void>;
}

/** A page of resources, with the deployments among them by resource id. */
export interface ResourcePage extends Page<ResourceRecord> {
  readonly deployments: ReadonlyMap<string, DeploymentView>;
}

/** One message of {@link ScopeLeaseService.wait}. */
export interface WaitUpdate {
  readonly deployment: DeploymentView;
  readonly done: boolean;
  readonly timedOut: boolean;
}

/** How the scope-lease service reaches the agents holding deployments' work leases. */
export interface LeaseHolders {
  /** The lease stays valid; the holder is asked to do something (COLLECT_OUTPUTS). */
  revoke(
    sessionId: string,
    token: { actionId: string; epoch: number },
    reason: RevokeReason,
    message: string,
  ): void;
  /** The lease ended on the server; the holder must stop. */
  ended(
    sessionId: string,
    token: { actionId: string; epoch: number },
    reason: RevokeReason,
    message: string,
  ): void;
}

/** How often waiters look again without a wake-up (changes made by other processes). */
const POLL_MS = 1000;

/** How many of a lease's resources a snapshot (DebugLease) lists. */
export const SNAPSHOT_RESOURCES = 1000;
/** Leases past their TTL one statement rolls back. */
const EXPIRE_BATCH = 100;

export function createScopeLeaseService(deps: {
  db: Db;
  clock: Clock;
  feed: ChangeFeed;
  log: Logger;
  limits?: ScopeLimits;
  holders?: LeaseHolders;
}): ScopeLeaseService {
  const { db, clock, feed, log, holders } = deps;
  const limits = deps.limits ?? SCOPE_DEFAULTS;
  let timer: NodeJS.Timeout | undefined;
  let running: Promise<unknown> | undefined;

  const notFound = (id: string) => LeaseholdError.notFound("lease", id);

  /**
   * FAILED_PRECONDITION naming the lease's state, for any refused operation.
   * `what` is the operation; `changes` says whether it would change the lease
   * (a wait does not, so it is refused for not being open, not for being unchangeable).
   */
  const refused = (leaseId: string, refusal: LeaseRefusal, what: string, changes = true): LeaseholdError => {
    if (refusal.refused === "not_found") return notFound(leaseId);
    const lease = refusal.lease;
    // Still OPEN in its row, but past its TTL: the expiry is rolling it back, and nothing may change it.
    const expiring = lease.state === "OPEN";
    const state = expiring
      ? "past its TTL and being rolled back"
      : `${lease.state}${lease.closeReason === "EXPIRED" ? " (its TTL passed)" : ""}`;
    const rule = changes ? "only an open lease within its TTL can be changed" : "it must be open";
    return LeaseholdError.failedPrecondition(
      "LEASE_CLOSED",
      `cannot ${what}: lease ${leaseId} is ${state}; ${rule}`,
      {
        type: "LEASE_STATE",
        subject: `leases/${leaseId}`,
        description: expiring ? "state is OPEN, past its TTL" : `state is ${lease.state}`,
      },
    );
  };
  const isRefusal = (value: object): value is LeaseRefusal => "refused" in value;
  /** ALREADY_EXISTS for a request id the caller used before for a different create request. */
  const reused = (requestId: string | undefined, refusal: RequestIdReused): LeaseholdError =>
    new LeaseholdError(
      Code.AlreadyExists,
      `request_id ${quote(requestId ?? "")} was already used for a different request (resource ${refusal.resourceId}); use a new request_id for a new resource`,
      {
        reason: "REQUEST_ID_REUSED",
        metadata: { resource_id: refusal.resourceId, request_id: requestId ?? "" },
      },
    );

  /**
   * Once a destroy committed: tells the holders of its deployments' leases to
   * stop, and wakes the watchers of every action it ended (WatchAction,
   * WaitLease), a queued one's too, which no holder would otherwise report.
   */
  function revokeEnded(ended: EndedActions, reason: RevokeReason, message: string): void {
    for (const r of ended.revokes)
      holders?.ended(r.sessionId, { actionId: r.actionId, epoch: r.epoch }, reason, message);
    for (const id of ended.actionIds) feed.publish(actionTopic(id));
  }

  /**
   * Rolls back every lease past its TTL, {@link EXPIRE_BATCH} a statement: a
   * thousand that expire together take ten statements, not ten turns of the
   * once-a-second loop (they stayed open past their TTL meanwhile).
   */
  async function expireDue(): Promise<string[]> {
    const all: string[] = [];
    for (;;) {
      const { ids, runtimes, destroyed, ended } = await expireScopeLeases(db, clock, EXPIRE_BATCH);
      if (ids.length > 0) {
        log.info(
          { leases: ids, runtimes, resourcesDestroyed: destroyed, actionsCancelled: ended.actionIds.length },
          "scope leases rolled back: their TTL passed",
        );
        revokeEnded(ended, "ROLLED_BACK", "the deployment's scope lease was rolled back: its TTL passed");
        all.push(...ids);
      }
      if (ids.length < EXPIRE_BATCH) break;
    }
    if (all.length > 0) feed.publish(EVENTS_TOPIC);
    return all;
  }

  async function close(leaseId: string, how: "COMMITTED" | "ROLLED_BACK", actor: string): Promise<Closed> {
    const result = await closeScopeLease(db, clock, leaseId, how, actor);
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
    revokeEnded(result.ended, "ROLLED_BACK", `the deployment's scope lease ${leaseId} was rolled back`);
    feed.publish(EVENTS_TOPIC);
    return result;
  }

  async function deploymentsOf(resources: readonly ResourceRecord[]): Promise<Map<string, DeploymentView>> {
    const deployments = resources.filter((r) => r.kind === "deployment" && r.actionId);
    const actions = await findActions(
      db,
      deployments.map((r) => r.actionId as string),
    );
    return new Map(deployments.map((r) => [r.id, deploymentView(r, actions.get(r.actionId as string))]));
  }

  /** The lease's deployments; FAILED_PRECONDITION unless it has one and is open. */
  async function openDeployments(leaseId: string, what: string, changes = true): Promise<ResourceRecord[]> {
    const lease = await findScopeLease(db, leaseId);
    if (!lease) throw notFound(leaseId);
    if (lease.state !== "OPEN") throw refused(leaseId, { refused: "closed", lease }, what, changes);
    const found = await listResources(
      db,
      { leaseId, kind: "deployment", ownership: "LEASE" },
      undefined,
      1000,
    );
    if (found.length === 0) {
      // One promoted out of the lease is the workspace's now: say so, rather than ask for another.
      const [promoted] = await listResources(
        db,
        { leaseId, kind: "deployment", ownership: "WORKSPACE" },
        undefined,
        1,
      );
      // Read by gRPC clients and by the CLI's users alike: it names the call and the command.
      throw LeaseholdError.failedPrecondition(
        "NO_DEPLOYMENT",
        promoted
          ? `cannot ${what}: lease ${leaseId} owns no deployment: ${promoted.id} was promoted out of it and is no longer the lease's (GetResource shows its phase)`
          : `cannot ${what}: lease ${leaseId} owns no deployment; create one with CreateDeployment first ` +
              `(leasehold deployment create --lease ${leaseId} --spec <file>)`,
        { type: "LEASE_CONTENT", subject: `leases/${leaseId}`, description: "no deployment" },
      );
    }
    return found;
  }

  /**
   * Resolves at the next change of any of `actionIds` (this process's
   * wake-ups), after POLL_MS at most (other processes' changes), or on abort.
   */
  function nextChange(actionIds: readonly string[], signal: AbortSignal, untilMs: number): Promise<void> {
    return new Promise((resolve) => {
      const offs: (() => void)[] = [];
      let timer: NodeJS.Timeout | undefined;
      const done = () => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        for (const off of offs) off();
        resolve();
      };
      timer = setTimeout(done, Math.max(0, Math.min(POLL_MS, untilMs - Date.now())));
      signal.addEventListener("abort", done);
      for (const id of actionIds) offs.push(feed.subscribe(actionTopic(id), done));
      if (signal.aborted) done();
    });
  }

  async function* wait(leaseId: string, timeoutMs: number, signal: AbortSignal): AsyncIterable<WaitUpdate> {
    const resources = await openDeployments(leaseId, "wait for it", false);
    const actionIds = resources.map((r) => r.actionId as string);
    const until = Date.now() + timeoutMs;
    const seen = new Map<string, string>();
    for (;;) {
      const actions = await findActions(db, actionIds);
      const views = resources.map((r) => deploymentView(r, actions.get(r.actionId as string)));
      const ended = views.find((v) => FINAL_PHASES.has(v.phase));
      const allReady = views.every((v) => v.phase === "READY");
      const timedOut = !ended && !allReady && Date.now() >= until;
      const last =
        ended ?? (timedOut ? views.find((v) => v.phase !== "READY") : allReady ? views.at(-1) : undefined);
      for (const view of views) {
        const signature = JSON.stringify([view.phase, view.containers, view.message]);
        if (view === last || seen.get(view.id) === signature) continue;
        seen.set(view.id, signature);
        yield { deployment: view, done: false, timedOut: false };
      }
      if (last) {
        yield { deployment: last, done: true, timedOut };
        return;
      }
      if (signal.aborted) return;
      await nextChange(actionIds, signal, until);
    }
  }

  async function collectOutputs(
    leaseId: string,
    timeoutMs: number,
    signal: AbortSignal,
    actor: string,
  ): Promise<{ fileIds: string[]; skipped: SkippedOutputView[] }> {
    const resources = await openDeployments(leaseId, "collect outputs");
    const actionIds = resources.map((r) => r.actionId as string);
    /** The run each action was asked to save, by action: its epoch and worker. */
    const asked = new Map<string, { readonly epoch: number; readonly workerId: string }>();
    /**
     * Asks the holders of these (leased) actions to save and stop, while the
     * lease is open: a lease committed meanwhile keeps its deployments running.
     */
    const ask = async (ids: readonly string[]) => {
      const rows = await db.transaction(async (tx) => {
        const refusal = await lockOpen(tx as unknown as Db, clock, leaseId);
        if (refusal) throw refused(leaseId, refusal, "collect outputs");
        return requestOutputs(tx as unknown as Db, ids, actor);
      });
      for (const r of rows) asked.set(r.actionId, { epoch: r.epoch, workerId: r.workerId });
      for (const r of rows) {
        holders?.revoke(
          r.sessionId,
          { actionId: r.actionId, epoch: r.epoch },
          "COLLECT_OUTPUTS",
          "save the outputs, then stop",
        );
        feed.publish(actionTopic(r.actionId));
      }
      if (rows.length > 0) feed.publish(EVENTS_TOPIC);
    };
    await ask(actionIds);
    const until = Date.now() + timeoutMs;
    for (;;) {
      const actions = await findActions(db, actionIds);
      await failIfRunLost(actions);
      // Never started: it has nothing to save, and is cancelled. One queued again after a run
      // that was lost (its agent lost or gone, OUTPUTS_LOST's case) is not: cancelling it would
      // answer "no outputs" for a deployment that ran, and it would never run again. It is waited
      // for, and its next run asked like the others once granted (a new attempt clears the request).
      const queued = [...actions.values()]
        .filter((a) => a.state === "QUEUED" && a.attemptCount === 0)
        .map((a) => a.id);
      if (queued.length > 0) {
        await db.transaction(async (tx) => {
          // Not in a lease committed (which keeps its deployments) or rolled back meanwhile.
          const refusal = await lockOpen(tx as unknown as Db, clock, leaseId);
          if (refusal) throw refused(leaseId, refusal, "collect outputs");
          await cancelDeploymentActions(
            tx as unknown as Db,
            queued,
            "outputs were collected before it ran",
            actor,
            "queued",
          );
        });
        for (const id of queued) feed.publish(actionTopic(id));
      }
      const unasked = [...actions.values()].filter((a) => a.state === "LEASED" && a.stopReason === null);
      if (unasked.length > 0) await ask(unasked.map((a) => a.id));
      const views = resources.map((r) => deploymentView(r, actions.get(r.actionId as string)));
      if (views.every((v) => FINAL_PHASES.has(v.phase))) {
        // Rolled back meanwhile (or its TTL passed)? Then what they saved went with it: an empty
        // success would read as "no outputs". Past its TTL counts as closed, as for every change
        // to a lease (lockOpen). Committed meanwhile: the commit kept what they saved, before it
        // and after (insertResource), and the answer says what that is.
        const refusal = await lockOpen(db, clock, leaseId);
        if (refusal && !(refusal.refused === "closed" && refusal.lease.state === "COMMITTED"))
          throw refused(leaseId, refusal, "collect outputs");
        const skipped = resources.flatMap((r) => skippedOutputsOf(actions.get(r.actionId as string)));
        return { fileIds: views.flatMap((v) => v.outputFileIds), skipped };
      }
      if (Date.now() >= until) {
        // A pending one says what it waits for (an agent to run it again).
        const pending = views
          .filter((v) => !FINAL_PHASES.has(v.phase))
          .map((v) => `${v.id} (${v.phase}${v.phase === "PENDING" ? `: ${v.message}` : ""})`);
        throw new LeaseholdError(
          Code.DeadlineExceeded,
          `deployments ${pending.join(", ")} did not save their outputs within ${timeoutMs / 1000}s; ` +
            "check the agent running them (DebugLease), or call again with a longer timeout",
        );
      }
      await nextChange(actionIds, signal, until);
      // Ended from outside (the server shutting down, the client gone): its reason is the answer.
      // A shutdown is UNAVAILABLE (SHUTTING_DOWN), which clients try again: the request to save is
      // stored, and the next call picks up where this one was. Never DEADLINE_EXCEEDED, which
      // says the deployments were too slow, and is not tried again.
      signal.throwIfAborted();
    }

    /**
     * A run asked to save that ended without finishing (its lease expired: the agent was lost; or
     * it gave the lease back) took what it wrote with it. An empty answer would read as "saved no
     * files", and asking its next run would stop that one before it has done anything.
     */
    async function failIfRunLost(actions: ReadonlyMap<string, ActionRecord>): Promise<void> {
      for (const [actionId, run] of asked) {
        const action = actions.get(actionId);
        if (!action || (action.state === "LEASED" && action.epoch === run.epoch)) continue;
        const attempt = (await listAttempts(db, actionId)).find((t) => t.epoch === run.epoch);
        if (attempt?.outcome !== "LEASE_EXPIRED" && attempt?.outcome !== "RELEASED") continue;
        const resource = resources.find((r) => r.actionId === actionId);
        const how =
          attempt.outcome === "LEASE_EXPIRED"
            ? "its lease expired (the agent was lost)"
            : "its agent gave the lease back";
        throw new LeaseholdError(
          Code.Aborted,
          `deployment ${resource?.id ?? actionId} stopped before it saved its outputs: its run on worker ${quote(run.workerId)} ` +
            `(epoch ${run.epoch}) ended when ${how}, and what it wrote went with it. The deployment runs again; ` +
            "call CollectOutputs again to collect what its next run saves",
          { reason: "OUTPUTS_LOST", metadata: { resource_id: resource?.id ?? "", action_id: actionId } },
        );
      }
    }
  }

  /** INVALID_ARGUMENT TTL_OVER_MAXIMUM for a TTL past the server's --lease-max-ttl. */
  function requireTtlWithinMaximum(ttlMs: number): void {
    if (ttlMs <= limits.maxTtlMs) return;
    const description = `must be at most ${limits.maxTtlMs / 1000}s (the server's maximum, its --lease-max-ttl)`;
    // The maximum in metadata too: a client tells its user what to ask for without reading prose.
    throw new LeaseholdError(Code.InvalidArgument, `ttl: ${description}`, {
      reason: "TTL_OVER_MAXIMUM",
      metadata: { max_ttl: `${limits.maxTtlMs / 1000}s` },
      fieldViolations: [{ field: "ttl", description }],
    });
  }

  return {
    async create(input) {
      const ttlMs = input.ttlMs ?? limits.defaultTtlMs;
      requireTtlWithinMaximum(ttlMs);
      const { lease, created } = await insertScopeLease(db, clock, { ...input, ttlMs });
      if (
        !created &&
        (lease.runtime !== input.runtime || lease.label !== input.label || lease.ttlMs !== ttlMs)
      ) {
        throw new LeaseholdError(
          Code.AlreadyExists,
          `request_id ${quote(input.requestId ?? "")} was already used for a different lease (${lease.id}); use a new request_id for a new lease`,
          {
            reason: "REQUEST_ID_REUSED",
            metadata: { lease_id: lease.id, request_id: input.requestId ?? "" },
          },
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
    async requireOpen(id, what) {
      const lease = await findScopeLease(db, id);
      if (!lease) throw notFound(id);
      if (lease.state !== "OPEN") throw refused(id, { refused: "closed", lease }, what);
      return lease;
    },
    async list(filter, size, pageToken, sizeOf) {
      const cursor = decodePageToken(pageToken, issuedFor("leases", filter));
      // One row more than asked tells whether another page exists.
      const { items, cut } = await listScopeLeases(db, filter, cursor?.after, size + 1);
      return toPage(items, size, (l) => l.id, issuedFor("leases", filter), { more: cut, sizeOf });
    },
    async promote(leaseId, kind, resourceId, actor) {
      const result = await promoteResource(db, clock, leaseId, kind, resourceId, actor);
      if ("refused" in result) {
        if (result.refused === "no_resource") {
          throw new LeaseholdError(
            Code.NotFound,
            `lease ${leaseId} owns no ${kind} ${JSON.stringify(resourceId)}; check the kind and id`,
            { reason: "RESOURCE_NOT_IN_LEASE" },
          );
        }
        throw refused(leaseId, result, `promote ${kind} ${resourceId}`);
      }
      feed.publish(EVENTS_TOPIC);
      return result;
    },
    async renew(leaseId, ttlMs, actor) {
      if (ttlMs !== undefined) requireTtlWithinMaximum(ttlMs);
      const result = await renewScopeLease(db, clock, leaseId, ttlMs, actor);
      if (isRefusal(result)) {
        // Past its TTL but not rolled back yet: roll it back now, then say so (as a close does).
        if (result.refused === "closed" && result.lease.state === "OPEN") await expireDue();
        const lease = result.refused === "closed" ? await findScopeLease(db, leaseId) : undefined;
        throw refused(leaseId, lease ? { refused: "closed", lease } : result, "renew");
      }
      feed.publish(EVENTS_TOPIC);
      return result;
    },
    commit: (leaseId, actor) => close(leaseId, "COMMITTED", actor),
    rollback: (leaseId, actor) => close(leaseId, "ROLLED_BACK", actor),
    async setResult(leaseId, result, actor) {
      const lease = await setScopeLeaseResult(db, leaseId, result, actor);
      if (!lease) throw notFound(leaseId);
      feed.publish(EVENTS_TOPIC);
      return lease;
    },
    async delete(leaseId, actor) {
      // One statement decides, from one snapshot: a read before it could find the lease, and
      // another server delete it before this one did (answered OK for a delete that did nothing).
      const { deleted, skippedOpen, skippedRunning, running } = await deleteClosedScopeLeases(
        db,
        { id: leaseId },
        actor,
      );
      if (skippedOpen > 0) {
        throw LeaseholdError.failedPrecondition(
          "LEASE_OPEN",
          `lease ${leaseId} is OPEN; commit or roll it back first (delete only forgets closed leases)`,
          { type: "LEASE_STATE", subject: `leases/${leaseId}`, description: "state is OPEN" },
        );
      }
      if (skippedRunning > 0) {
        // As Kubernetes keeps an owner with a foreground-deletion finalizer until its dependents
        // are gone: the record is what the deployment's outputs are saved into after the commit.
        const what = running
          ? `deployment ${running.deploymentId}, which its commit kept, has not ended (its action is ${running.state})`
          : "a deployment its commit kept has not ended";
        throw LeaseholdError.failedPrecondition(
          "DEPLOYMENT_RUNNING",
          `cannot delete lease ${leaseId}: ${what}, and the files it saves as its outputs go into this lease; ` +
            "delete again once it has ended, or stop it first (DeleteResource on the deployment)",
          {
            type: "LEASE_CONTENT",
            subject: `resources/${running?.deploymentId ?? ""}`,
            description: `deployment kept by the commit has not ended${running ? ` (action ${running.state})` : ""}`,
          },
        );
      }
      if (deleted === 0) throw notFound(leaseId);
      feed.publish(EVENTS_TOPIC);
    },
    async deleteMany(filter, actor) {
      const result = await deleteClosedScopeLeases(db, filter, actor);
      if (result.deleted > 0) feed.publish(EVENTS_TOPIC);
      return result;
    },
    async createResource(input) {
      if (input.content && input.content.byteLength > limits.maxFileBytes) {
        // Named: an agent saving a deployment's outputs uploads many, and its operator reads which.
        const name = input.name ?? "";
        const description = `file ${quote(name)} (${input.content.byteLength} bytes) is over the server's file limit of ${limits.maxFileBytes} bytes (its --max-file-size)`;
        throw new LeaseholdError(Code.ResourceExhausted, `content: ${description}`, {
          reason: "FILE_TOO_LARGE",
          metadata: {
            name,
            size_bytes: String(input.content.byteLength),
            limit_bytes: String(limits.maxFileBytes),
          },
          fieldViolations: [{ field: "content", description }],
        });
      }
      const sha256 = input.content ? createHash("sha256").update(input.content).digest("hex") : undefined;
      const requestId = input.requestId;
      // The request as sent, its content by hash: a retry of the same file, not just of the name.
      const sent = { ...input, requestId: undefined, content: undefined, sha256 };
      const request = requestId ? { id: requestId, hash: requestHash(sent) } : undefined;
      const result = await insertResource(db, clock, { ...input, ...(sha256 ? { sha256 } : {}), request });
      if ("refused" in result && result.refused === "request_id_reused") throw reused(requestId, result);
      if ("refused" in result && result.refused === "run_not_held") {
        const run = input.outputOf;
        throw LeaseholdError.failedPrecondition(
          "RUN_NOT_HELD",
          `file ${quote(input.name ?? "")} not saved: the run of deployment ${quote(run?.deploymentId ?? "")} at epoch ${run?.epoch} ` +
            `is not a run of lease ${input.leaseId ?? ""} held by a live session ${quote(input.actor)} opened ` +
            "(it was lost, ended, or was never its); what a lost run saved is discarded, and the next run saves its own",
          {
            type: "RUN",
            subject: `resources/${run?.deploymentId ?? ""}`,
            description: `epoch ${run?.epoch} is not held by ${input.actor}`,
          },
        );
      }
      if ("refused" in result) throw refused(input.leaseId ?? "", result, `create a ${input.kind} in it`);
      feed.publish(EVENTS_TOPIC);
      return result;
    },
    async getResource(id) {
      const resource = await findResource(db, id);
      if (!resource) throw LeaseholdError.notFound("resource", id);
      return resource;
    },
    findResources: (ids) => findResources(db, ids),
    async earlierDeployment(input) {
      if (!input.requestId) return undefined;
      const earlier = await findRequestedResource(db, input.actor, input.requestId);
      if (earlier && earlier.requestHash !== deploymentRequestHash(input))
        throw reused(input.requestId, { refused: "request_id_reused", resourceId: earlier.id });
      return earlier;
    },
    async listResources(filter, size, pageToken, sizeOf) {
      const cursor = decodePageToken(pageToken, issuedFor("resources", filter));
      const { items, cut } = await listResourcePage(db, filter, cursor?.after, size + 1);
      // The views are sent with the resources, so they are measured with them.
      const deployments = await deploymentsOf(items.slice(0, size));
      const measure = sizeOf && ((r: ResourceRecord) => sizeOf(r, deployments.get(r.id)));
      const page = toPage(items, size, (r) => r.id, issuedFor("resources", filter), {
        more: cut,
        sizeOf: measure,
      });
      return { ...page, deployments };
    },
    deploymentActionsOf: (leaseId, limit) => deploymentActionIds(db, leaseId, limit),
    async resourcesOf(leaseId) {
      const items = await listResources(db, { leaseId }, undefined, SNAPSHOT_RESOURCES);
      const total = items.length < SNAPSHOT_RESOURCES ? items.length : await countLeaseResources(db, leaseId);
      return { items, total };
    },
    async *fileChunks(id, chunkBytes) {
      let offset = 0;
      let size = 0;
      do {
        const chunk = await readFileChunk(db, id, offset, chunkBytes);
        if (!chunk && offset === 0) throw LeaseholdError.notFound("file", id);
        if (!chunk) {
          throw new LeaseholdError(
            Code.NotFound,
            `file ${quote(id)} not found: it was deleted during the download, after ${offset} of its ${size} bytes; what arrived is not the whole file`,
            { reason: "FILE_NOT_FOUND", metadata: { file: id } },
          );
        }
        size = chunk.sizeBytes;
        if (chunk.bytes.byteLength > 0) yield chunk.bytes;
        offset += chunkBytes;
      } while (offset < size);
    },
    inputLeasedTo(fileId, principal) {
      return leasedInputClusters(db, fileId, principal);
    },
    async deleteResource(id, actor) {
      const deleted = await deleteWorkspaceResource(db, id, actor);
      const outcome = deleted.outcome;
      if (deleted.outcome === "deleted") {
        // The lease is over, not to be confirmed: the agent stops and reports nothing. Destroyed as
        // a rollback destroys it (README), and said so: SUPERSEDED would tell the agent that
        // another worker owns it now.
        revokeEnded(deleted.ended, "ROLLED_BACK", `deployment ${id} was deleted`);
        feed.publish(EVENTS_TOPIC);
      }
      if (outcome === "not_found") throw LeaseholdError.notFound("resource", id);
      if (outcome === "lease_owned") {
        throw LeaseholdError.failedPrecondition(
          "RESOURCE_LEASE_OWNED",
          `resource ${id} belongs to an open lease; roll the lease back (or promote it first) instead`,
          { type: "OWNERSHIP", subject: `resources/${id}`, description: "ownership is LEASE" },
        );
      }
    },
    async createDeployment(input) {
      const requestId = input.requestId;
      const result = await insertDeployment(db, clock, {
        ...input,
        request: requestId ? { id: requestId, hash: deploymentRequestHash(input) } : undefined,
        action: (deploymentId, runtime) => ({
          requestId: undefined,
          requestHash: undefined,
          runId: input.leaseId ?? "",
          cluster: runtime,
          labelSelector: {},
          payload: {
            deployment: { id: deploymentId, leaseId: input.leaseId ?? "", spec: input.spec },
          } satisfies DeploymentPayload,
          priority: 0,
          // A deployment that fails stays failed; a lost agent's deployment is started again elsewhere.
          retryPolicy: { ...ACTION_DEFAULTS.retryPolicy, maxAttempts: 1 },
          maxSystemRetries: ACTION_DEFAULTS.maxSystemRetries,
        }),
      });
      if ("refused" in result && result.refused === "request_id_reused") throw reused(requestId, result);
      if ("refused" in result) throw refused(input.leaseId ?? "", result, "create a deployment in it");
      feed.publish(QUEUE_TOPIC);
      feed.publish(EVENTS_TOPIC);
      return result;
    },
    deploymentsOf,
    wait,
    collectOutputs,
    expireDue,
    start() {
      // Logged once per outage, not every second.
      const expiries = failureLog(log, {
        failed: "scope lease expiry failed; retrying every second",
        still: "scope lease expiry still failing",
        again: "scope lease expiry works again",
      });
      timer = setInterval(() => {
        if (running) return;
        running = expireDue()
          .then(
            () => expiries.worked(),
            (error: unknown) => expiries.failed(error),
          )
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
