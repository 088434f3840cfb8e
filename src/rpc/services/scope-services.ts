import { fromJson, type MessageInitShape, toJson } from "@bufbuild/protobuf";
import { type Duration, durationFromMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { type Access, permissionDenied, type Right } from "../../auth/access.js";
import { Code, LeaseholdError, quote } from "../../errors.js";
import { EventSchema } from "../../gen/leasehold/v1/event_pb.js";
import {
  CloseReason,
  type DebugLeaseResponseSchema,
  LeaseSchema,
  LeaseService,
  LeaseState,
} from "../../gen/leasehold/v1/lease_pb.js";
import {
  DeploymentPhase,
  DeploymentSchema,
  type DeploymentSpec,
  DeploymentSpecSchema,
  Ownership,
  ResourceSchema,
  ResourceService,
} from "../../gen/leasehold/v1/resource_pb.js";
import type { DeploymentView } from "../../scope/deployment.js";
import { fitSnapshot } from "../../scope/lease-snapshot.js";
import { probeUrlRefusal } from "../../scope/probe-url.js";
import type { ScopeLeaseService } from "../../scope/scope-lease-service.js";
import type { ResourceRecord, ScopeLeaseRecord, ScopeLeaseState } from "../../store/scope-leases.js";
import type { JsonObject } from "../../work/action.js";
import type { EventRecord } from "../../work/event.js";
import type { EventService as Events } from "../../work/event-service.js";
import { pageSize } from "../../work/page-token.js";
import { encodedSize } from "../encoded-size.js";
import { bind, type ServiceBinding } from "../server.js";
import {
  checkFileName,
  checkFilterName,
  checkLength,
  checkName,
  durationField,
  requireId,
  Violations,
} from "../validate.js";
import { toProtoEvent } from "./event-service.js";

const DAY_MS = 24 * 60 * 60_000;
/** Bytes per DownloadFile message. */
const CHUNK_BYTES = 64 * 1024;

/**
 * The lease `leaseId` once `access` may use it: `lease.use.own` if the caller
 * created it, `lease.use.any` otherwise, in its runtime. NOT_FOUND first if
 * there is no such lease.
 */
async function usableLease(scope: ScopeLeaseService, access: Access, leaseId: string) {
  const lease = await visibleLease(scope, access, leaseId);
  access.requireOwned("lease.use", lease.runtime, lease.createdBy);
  return lease;
}

/** The lease `leaseId` once `access` holds `right` in its runtime. */
async function leaseWith(scope: ScopeLeaseService, access: Access, right: Right, leaseId: string) {
  const lease = await visibleLease(scope, access, leaseId);
  access.require(right, lease.runtime);
  return lease;
}

/**
 * The lease `leaseId` if `access` may read it; NOT_FOUND, as for an id that
 * does not exist, if it may not: ids are no oracle for another cluster's leases.
 */
async function visibleLease(scope: ScopeLeaseService, access: Access, leaseId: string) {
  const lease = await scope.get(leaseId);
  access.requireVisible("lease.read", lease.runtime, () => LeaseholdError.notFound("lease", leaseId));
  return lease;
}

/**
 * The lease a resource was created in, if it still exists. Promoted and
 * committed resources keep their lease id, so they stay in its cluster.
 */
async function leaseOf(
  scope: ScopeLeaseService,
  leaseId: string | null,
): Promise<ScopeLeaseRecord | undefined> {
  if (!leaseId) return undefined;
  return scope.get(leaseId).catch((error: unknown) => {
    if (error instanceof LeaseholdError && error.reason === "LEASE_NOT_FOUND") return undefined;
    throw error;
  });
}

/** Where a resource belongs, for rights: its cluster, and who may use it as its own. */
interface ResourceHome {
  readonly runtime: string;
  readonly createdBy: string;
}

/**
 * Where a resource belongs: the lease it was created in while that lease's
 * record exists (its runtime, its creator). Once the record is deleted (a
 * commit's kept resources outlive it), the runtime stored with the resource,
 * with a deployment's creator, or a file's or object's lease's creator (""
 * for rows older than migration 0016: only `.any` rights reach those). A deployment created without a lease belongs to
 * its runtime and creator. A file or object created without a lease belongs
 * to no cluster: undefined.
 */
async function homeOf(
  scope: ScopeLeaseService,
  resource: Pick<ResourceRecord, "leaseId"> & Partial<Pick<ResourceRecord, "runtime" | "createdBy">>,
): Promise<ResourceHome | undefined> {
  const lease = await leaseOf(scope, resource.leaseId);
  if (lease) return lease;
  if (resource.runtime) return { runtime: resource.runtime, createdBy: resource.createdBy ?? "" };
  return undefined;
}

/**
 * `right` in the cluster a resource belongs to ({@link homeOf}); in every
 * cluster when none. With `missing`, a caller without the right there (or,
 * for a resource of no cluster, in every cluster) gets that (the NOT_FOUND of
 * an unknown id) instead of PERMISSION_DENIED.
 */
async function requireOnResource(
  scope: ScopeLeaseService,
  access: Access,
  right: Right,
  resource: Parameters<typeof homeOf>[1],
  missing?: () => Error,
): Promise<void> {
  const home = await homeOf(scope, resource);
  if (home && missing) access.requireVisible(right, home.runtime, missing);
  else if (home) access.require(right, home.runtime);
  else if (missing) {
    // What belongs to no cluster is seen only by a caller holding the right in every cluster.
    if (access.clustersWith(right) !== undefined) throw missing();
  } else
    access.requireEverywhere(right, "this resource was made outside any lease, and belongs to no cluster");
}

/**
 * ListResources' check: `resource.read` in the cluster of lease `leaseId`:
 * its runtime, or once its record is deleted, the runtime its kept resources
 * store; NOT_FOUND for a lease that has neither. Without a lease id the list
 * spans every cluster, and so must the right.
 */
async function requireList(scope: ScopeLeaseService, access: Access, leaseId: string): Promise<void> {
  if (!leaseId) {
    access.requireEverywhere(
      "resource.read",
      "listing resources without a lease_id lists every cluster's; name a lease_id",
    );
    return;
  }
  const lease = await leaseOf(scope, leaseId);
  // Every resource created in a lease stores that lease's runtime.
  const runtime = lease?.runtime ?? (await scope.listResources({ leaseId }, 1, "")).items[0]?.runtime;
  if (!runtime) throw LeaseholdError.notFound("lease", leaseId);
  access.requireVisible("resource.read", runtime, () => LeaseholdError.notFound("lease", leaseId));
}

/**
 * DownloadFile's check: `resource.read` in the file's cluster, as for
 * GetResource; otherwise `file.download.input`, which lets an agent fetch a
 * file only while it is an input of a deployment whose action is leased to a
 * live session the caller's principal opened (in a cluster where it holds the
 * right). Not any file of its clusters: an agent reads only what a
 * deployment's creator, checked by CreateDeployment for `resource.read` on
 * it, gave its deployment. Otherwise an agent gets PERMISSION_DENIED naming
 * the right, and another caller NOT_FOUND, as for an unknown id.
 */
async function requireDownload(
  scope: ScopeLeaseService,
  access: Access,
  file: ResourceRecord,
): Promise<void> {
  // An agent's refusal names the right it lacks; another caller learns nothing of a file it may not read.
  const agent = access.holdsAnywhere("file.download.input");
  try {
    await requireOnResource(
      scope,
      access,
      "resource.read",
      file,
      agent ? undefined : () => LeaseholdError.notFound("resource", file.id),
    );
    return;
  } catch (error) {
    const denied = error instanceof LeaseholdError && error.code === Code.PermissionDenied;
    if (!denied || !agent) throw error;
  }
  const clusters = await scope.inputLeasedTo(file.id, access.actor);
  if (clusters.some((cluster) => access.can("file.download.input", cluster))) return;
  throw permissionDenied(
    access.actor,
    "file.download.input",
    `for file ${quote(file.id)}: it is not an input of a deployment whose action is leased to a session ${quote(access.actor)} opened, in a cluster where it holds that right (nor does it hold resource.read on the file)`,
    { resource_id: file.id },
  );
}

/**
 * Checks a resource creation: `resource.create` in the lease's runtime and
 * the right to use the lease (its creator, or `lease.use.any`). A caller
 * without that right whose `file.upload` (an agent) covers the lease's
 * cluster may upload a file only naming `output_of`: the outputs of a run
 * its session holds, which the store checks (RUN_NOT_HELD). A resource without a
 * lease belongs to `runtime` when it has one (a deployment), else to no
 * cluster: then `resource.create` must be held in every cluster.
 */
async function requireCreate(
  scope: ScopeLeaseService,
  access: Access,
  leaseId: string,
  options: {
    readonly upload?: boolean;
    /** The upload names the run it is an output of (CreateFileRequest.output_of). */
    readonly outputOf?: boolean;
    readonly runtime?: string;
  } = {},
): Promise<void> {
  if (!leaseId) {
    if (options.runtime) access.require("resource.create", options.runtime);
    else
      access.requireEverywhere(
        "resource.create",
        "without a lease_id (or runtime) the resource would belong to no cluster; create it in a lease",
      );
    return;
  }
  const lease = await scope.get(leaseId);
  // Ids are no oracle: a lease in a cluster where the caller may neither read leases nor upload
  // files looks like one that never was.
  if (!access.can("lease.read", lease.runtime) && !access.can("file.upload", lease.runtime))
    throw LeaseholdError.notFound("lease", leaseId);
  const asClient = () =>
    access.can("resource.create", lease.runtime) &&
    access.canOwned("lease.use", lease.runtime, lease.createdBy);
  if (options.upload && access.can("file.upload", lease.runtime) && !asClient()) {
    // The agent role adds files only as the outputs of a run its session holds (SPEC §5:
    // "only on leases its session holds"): the store checks the run (RUN_NOT_HELD); without
    // one, the agent would plant files in any open lease of its cluster.
    if (options.outputOf) return;
    throw permissionDenied(
      access.actor,
      "resource.create",
      `in cluster ${quote(lease.runtime)}: an agent adds files only as the outputs of a run its session holds; ` +
        "send output_of (the deployment id and the epoch of the lease on its action that the agent holds)",
      { cluster: lease.runtime },
    );
  }
  // An agent uploads with file.upload: the right it lacks is that one, not the submitter's.
  if (options.upload && access.holdsAnywhere("file.upload") && !access.can("resource.create", lease.runtime))
    throw permissionDenied(
      access.actor,
      "file.upload",
      `in cluster ${quote(lease.runtime)} (nor resource.create there)`,
      {
        cluster: lease.runtime,
      },
    );
  access.require("resource.create", lease.runtime);
  access.requireOwned("lease.use", lease.runtime, lease.createdBy);
}

/**
 * A lease's TTL in milliseconds (undefined when unset), at least 1s. No bound
 * of its own beyond what a number holds: the server's maximum
 * (--lease-max-ttl) is checked by the service, and a message naming another
 * bound would mislead. Kept and shown in milliseconds: a finer TTL is
 * refused, never rounded (0.9995s became 1s).
 */
const leaseTtlField = (v: Violations, ttl: Duration | undefined): number | undefined =>
  ttl ? durationField(v, "ttl", ttl, 0, Number.POSITIVE_INFINITY, 1000, { wholeMs: true }) : undefined;

/**
 * LeaseService over the scope-lease service. A lease's runtime is its cluster
 * for every right; using a lease (promote, commit, roll back, set a result,
 * collect outputs) needs `lease.use.own` on one's own leases or `lease.use.any`.
 */
export function leaseServiceBinding(scope: ScopeLeaseService, events: Events): ServiceBinding {
  return bind(LeaseService, {
    async createLease(request, ctx) {
      const v = new Violations();
      checkName(v, "runtime", request.runtime);
      checkLength(v, "label", request.label, 128);
      checkLength(v, "request_id", request.requestId, 128);
      const ttlMs = leaseTtlField(v, request.ttl);
      v.throwIfAny();
      ctx.access.require("lease.create", request.runtime);
      const lease = await scope.create({
        runtime: request.runtime,
        label: request.label,
        ttlMs,
        requestId: request.requestId || undefined,
        actor: ctx.access.actor,
      });
      return { lease: toProtoLease(lease) };
    },
    async getLease(request, ctx) {
      const lease = await leaseWith(scope, ctx.access, "lease.read", requireId("lease_id", request.leaseId));
      return { lease: toProtoLease(lease) };
    },
    async listLeases(request, ctx) {
      ctx.access.requireListScope("lease.read", request.runtime, "runtime");
      checkFilterName("runtime", request.runtime);
      let state: ScopeLeaseState | undefined;
      if (request.state !== LeaseState.UNSPECIFIED) {
        const name = LeaseState[request.state];
        if (name === undefined)
          throw LeaseholdError.invalidArgument("state", `is not a known LeaseState (${request.state})`);
        state = name as ScopeLeaseState;
      }
      const filter = { state, label: request.label || undefined, runtime: request.runtime || undefined };
      const page = await scope.list(filter, pageSize(request.pageSize), request.pageToken, (l) =>
        encodedSize(LeaseSchema, toProtoLease(l)),
      );
      return { leases: page.items.map(toProtoLease), nextPageToken: page.nextPageToken };
    },
    async promoteResource(request, ctx) {
      const v = new Violations();
      if (request.leaseId === "") v.add("lease_id", "is required");
      if (request.kind === "") v.add("kind", "is required");
      if (request.resourceId === "") v.add("resource_id", "is required");
      v.throwIfAny();
      await usableLease(scope, ctx.access, request.leaseId);
      const resource = await scope.promote(
        request.leaseId,
        request.kind,
        request.resourceId,
        ctx.access.actor,
      );
      const deployments = await scope.deploymentsOf([resource]);
      return { resource: toProtoResource(resource, deployments.get(resource.id)) };
    },
    async renewLease(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      const v = new Violations();
      const ttlMs = leaseTtlField(v, request.ttl);
      v.throwIfAny();
      await usableLease(scope, ctx.access, leaseId);
      return { lease: toProtoLease(await scope.renew(leaseId, ttlMs, ctx.access.actor)) };
    },
    async commitLease(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      await usableLease(scope, ctx.access, leaseId);
      const closed = await scope.commit(leaseId, ctx.access.actor);
      return { lease: toProtoLease(closed.lease), keptResources: closed.resources.length };
    },
    async rollbackLease(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      await usableLease(scope, ctx.access, leaseId);
      const closed = await scope.rollback(leaseId, ctx.access.actor);
      return { lease: toProtoLease(closed.lease), destroyedResources: closed.resources.length };
    },
    async deleteLease(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      await leaseWith(scope, ctx.access, "lease.delete", leaseId);
      await scope.delete(leaseId, ctx.access.actor);
      return {};
    },
    async deleteLeases(request, ctx) {
      const v = new Violations();
      if (request.runtime) checkName(v, "runtime", request.runtime);
      // An empty request is more likely a mistake than a wish to forget every closed lease.
      if (!request.runtime && !request.label && !request.closedBefore && !request.all)
        v.add("all", "must be true to delete every closed lease; or name a label, runtime or closed_before");
      v.throwIfAny();
      ctx.access.requireListScope("lease.delete", request.runtime, "runtime");
      const { deleted, skippedOpen, skippedRunning } = await scope.deleteMany(
        {
          label: request.label || undefined,
          runtime: request.runtime || undefined,
          closedBefore: request.closedBefore ? timestampDate(request.closedBefore) : undefined,
        },
        ctx.access.actor,
      );
      return { deleted, skippedOpen, skippedRunning };
    },
    async setResult(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      if (request.result === undefined)
        throw LeaseholdError.invalidArgument("result", "is required (a JSON object)");
      await usableLease(scope, ctx.access, leaseId);
      const lease = await scope.setResult(leaseId, request.result as JsonObject, ctx.access.actor);
      return { lease: toProtoLease(lease) };
    },
    async debugLease(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      if (request.eventLimit < 0 || request.eventLimit > 1000) {
        throw LeaseholdError.invalidArgument("event_limit", "must be between 0 and 1000 (0 means 50)");
      }
      const lease = await leaseWith(scope, ctx.access, "lease.debug", leaseId);
      const resources = await scope.resourcesOf(leaseId);
      const deployments = await scope.deploymentsOf(resources.items);
      const limit = request.eventLimit || 50;
      // The lease's events and its deployments' actions' (who ran each, at which epoch), newest
      // first: only as many of each as asked for are read, however many there are.
      // Those of deployments the lease's close destroyed too: after a rollback (every `lease run`
      // ends with one), who ran the deployment and why it failed is what one comes to ask.
      const actionIds = new Set([
        ...[...deployments.values()].map((d) => d.actionId),
        ...(await scope.deploymentActionsOf(leaseId, DEBUG_DEPLOYMENT_EVENTS)),
      ]);
      const filters = [
        { leaseId },
        ...[...actionIds].slice(0, DEBUG_DEPLOYMENT_EVENTS).map((actionId) => ({ actionId })),
      ];
      const pages = await Promise.all(filters.map((filter) => events.list(filter, limit, "", true)));
      const recent = [...new Map(pages.flatMap((p) => p.items).map((e) => [e.sequence, e])).values()]
        .sort((a, b) => b.sequence - a.sequence)
        .slice(0, limit);
      return {
        ...snapshotOf(lease, resources.items, deployments, recent.toReversed()),
        omittedResources: resources.total - resources.items.length,
      };
    },
    async *waitLease(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      const v = new Violations();
      const timeoutMs = durationField(v, "timeout", request.timeout, 5 * 60_000, DAY_MS);
      v.throwIfAny();
      await leaseWith(scope, ctx.access, "lease.read", leaseId);
      for await (const update of scope.wait(leaseId, timeoutMs, ctx.signal)) {
        yield {
          deployment: toProtoDeployment(update.deployment),
          done: update.done,
          timedOut: update.timedOut,
        };
      }
    },
    async collectOutputs(request, ctx) {
      const leaseId = requireId("lease_id", request.leaseId);
      const v = new Violations();
      // 0s is no timeout given, as proto3 reads a zero: it asked the deployments to stop and
      // gave up at once, leaving them STOPPING.
      const timeoutMs = durationField(v, "timeout", request.timeout, 60_000, 60 * 60_000) || 60_000;
      v.throwIfAny();
      await usableLease(scope, ctx.access, leaseId);
      const { fileIds, skipped } = await scope.collectOutputs(
        leaseId,
        timeoutMs,
        ctx.signal,
        ctx.access.actor,
      );
      return {
        fileIds,
        skipped: skipped.map((s) => ({ path: s.path, sizeBytes: BigInt(s.sizeBytes), reason: s.reason })),
      };
    },
  });
}

/**
 * Refuses a deployment that cannot be created now: in a lease that is not
 * open, with an input that names no file, or one the caller may not read
 * (the deployment's agent downloads its inputs).
 */
async function checkDeploymentCreate(
  scope: ScopeLeaseService,
  access: Access,
  leaseId: string,
  spec: DeploymentSpec,
): Promise<void> {
  // Before the inputs: a closed lease is why its own files named as inputs are gone (a
  // rollback destroyed them), and the refusal says its state, as it does without inputs.
  if (leaseId) await scope.requireOpen(leaseId, "create a deployment in it");
  const v = new Violations();
  const found = await scope.findResources(spec.inputs.map((input) => input.fileId));
  const inputs: ResourceRecord[] = [];
  for (const [i, input] of spec.inputs.entries()) {
    const file = found.get(input.fileId);
    if (file?.kind !== "file") v.add(`spec.inputs[${i}].file_id`, `no file resource ${quote(input.fileId)}`);
    else inputs.push(file);
  }
  // The check above ran before the inputs were read: a rollback (on any server) between the
  // two destroyed the lease's own files. A lease never opens again, so looking once more
  // after the read tells whether it was closed when they went missing: its state is the answer.
  if (leaseId && inputs.length < spec.inputs.length)
    await scope.requireOpen(leaseId, "create a deployment in it");
  v.throwIfAny();
  // A file the caller may not read is refused as one that does not exist: ids are no oracle.
  for (const file of inputs) {
    const i = spec.inputs.findIndex((input) => input.fileId === file.id);
    await requireOnResource(scope, access, "resource.read", file, () =>
      LeaseholdError.invalidArgument(`spec.inputs[${i}].file_id`, `no file resource ${quote(file.id)}`),
    );
  }
}

/**
 * ResourceService over the scope-lease service. A resource's cluster is the
 * runtime of the lease it was created in (kept after a promote or commit, and
 * after the lease's record is deleted: stored with the resource), or
 * a lease-less deployment's own runtime; a file or object without a lease
 * (workspace-owned from the start) needs the right in every cluster.
 */
export function resourceServiceBinding(scope: ScopeLeaseService): ServiceBinding {
  const withDeployments = async (resources: readonly ResourceRecord[]) => {
    const deployments = await scope.deploymentsOf(resources);
    return resources.map((r) => toProtoResource(r, deployments.get(r.id)));
  };
  return bind(ResourceService, {
    async createDeployment(request, ctx) {
      const v = new Violations();
      if (request.leaseId && request.runtime) {
        v.add("runtime", "must be empty when lease_id is set (the deployment runs on the lease's runtime)");
      } else if (!request.leaseId && !request.runtime) {
        v.add(
          "runtime",
          "is required without a lease_id: the cluster the deployment runs on (or set lease_id: it runs on the lease's runtime)",
        );
      } else if (!request.leaseId) {
        checkName(v, "runtime", request.runtime);
      }
      checkDeploymentSpec(v, request.spec);
      checkLength(v, "request_id", request.requestId, 128);
      v.throwIfAny();
      await requireCreate(scope, ctx.access, request.leaseId, { runtime: request.runtime });
      const spec = request.spec as DeploymentSpec;
      const input = {
        leaseId: request.leaseId || undefined,
        runtime: request.runtime || undefined,
        spec: toJson(DeploymentSpecSchema, spec) as JsonObject,
        actor: ctx.access.actor,
        requestId: request.requestId || undefined,
      };
      // A retry of a create that made its deployment is answered with it, whatever became of its
      // lease and inputs since (the first call checked them); the id's reuse for another request
      // is refused. Anything else is checked now, before it is created: a create that then finds
      // the request id taken (a concurrent call) answers in its transaction, and one whose earlier
      // deployment went meanwhile creates a new one, checked.
      let resource = await scope.earlierDeployment(input);
      if (!resource) {
        await checkDeploymentCreate(scope, ctx.access, request.leaseId, spec);
        resource = await scope.createDeployment(input);
      }
      const [created] = await withDeployments([resource]);
      return { resource: created };
    },
    async createFile(request, ctx) {
      const v = new Violations();
      checkFileName(v, "name", request.name);
      checkLength(v, "content_type", request.contentType, 256);
      const run = request.outputOf;
      if (run) {
        if (request.leaseId === "") v.add("lease_id", "is required with output_of (the deployment's lease)");
        if (run.deploymentId.trim() === "") v.add("output_of.deployment_id", "is required");
        else checkLength(v, "output_of.deployment_id", run.deploymentId, 128);
        if (run.epoch < 1n) v.add("output_of.epoch", "must be at least 1 (the epoch of the agent's lease)");
      }
      checkLength(v, "request_id", request.requestId, 128);
      v.throwIfAny();
      await requireCreate(scope, ctx.access, request.leaseId, { upload: true, outputOf: run !== undefined });
      const resource = await scope.createResource({
        kind: "file",
        leaseId: request.leaseId || undefined,
        name: request.name,
        content: request.content,
        ...(request.contentType ? { contentType: request.contentType } : {}),
        actor: ctx.access.actor,
        ...(run ? { outputOf: { deploymentId: run.deploymentId, epoch: Number(run.epoch) } } : {}),
        requestId: request.requestId || undefined,
      });
      return { resource: toProtoResource(resource) };
    },
    async createObject(request, ctx) {
      const v = new Violations();
      checkName(v, "kind", request.kind);
      if (request.kind === "file" || request.kind === "deployment") {
        v.add("kind", `"${request.kind}" has its own create call; pick another kind for a generic object`);
      }
      checkLength(v, "request_id", request.requestId, 128);
      v.throwIfAny();
      await requireCreate(scope, ctx.access, request.leaseId);
      const resource = await scope.createResource({
        kind: request.kind,
        leaseId: request.leaseId || undefined,
        body: (request.body ?? {}) as JsonObject,
        actor: ctx.access.actor,
        requestId: request.requestId || undefined,
      });
      return { resource: toProtoResource(resource) };
    },
    async getResource(request, ctx) {
      const resourceId = requireId("resource_id", request.resourceId);
      const resource = await scope.getResource(resourceId);
      await requireOnResource(scope, ctx.access, "resource.read", resource, () =>
        LeaseholdError.notFound("resource", resourceId),
      );
      const [found] = await withDeployments([resource]);
      return { resource: found };
    },
    async listResources(request, ctx) {
      await requireList(scope, ctx.access, request.leaseId);
      const ownership =
        request.ownership === Ownership.UNSPECIFIED
          ? undefined
          : ((Ownership[request.ownership] as "WORKSPACE" | "LEASE" | undefined) ??
            (() => {
              throw LeaseholdError.invalidArgument(
                "ownership",
                `is not a known Ownership (${request.ownership})`,
              );
            })());
      const filter = { leaseId: request.leaseId || undefined, kind: request.kind || undefined, ownership };
      const page = await scope.listResources(filter, pageSize(request.pageSize), request.pageToken, (r, d) =>
        encodedSize(ResourceSchema, toProtoResource(r, d)),
      );
      return {
        resources: page.items.map((r) => toProtoResource(r, page.deployments.get(r.id))),
        nextPageToken: page.nextPageToken,
      };
    },
    async *downloadFile(request, ctx) {
      const resourceId = requireId("resource_id", request.resourceId);
      const resource = await scope.getResource(resourceId);
      await requireDownload(scope, ctx.access, resource);
      if (resource.kind !== "file") {
        throw LeaseholdError.failedPrecondition(
          "NOT_A_FILE",
          `resource ${resourceId} is a ${resource.kind}, not a file: only files have content to download (GetResource returns its body)`,
          {
            type: "RESOURCE_KIND",
            subject: `resources/${resourceId}`,
            description: `kind is ${resource.kind}`,
          },
        );
      }
      // Each chunk is read when the adapter asks for it, once the ones before
      // it are (nearly) sent: a client that does not read holds this at its yield.
      for await (const chunk of scope.fileChunks(resourceId, CHUNK_BYTES)) yield { chunk };
    },
    async deleteResource(request, ctx) {
      const resourceId = requireId("resource_id", request.resourceId);
      // The lease's creator owns what was made in it; a lease-less deployment, whoever created it.
      const home = await homeOf(scope, await scope.getResource(resourceId));
      if (home) {
        const missing = () => LeaseholdError.notFound("resource", resourceId);
        ctx.access.requireVisible("resource.read", home.runtime, missing);
        ctx.access.requireOwned("lease.use", home.runtime, home.createdBy);
      } else {
        // What belongs to no cluster is seen only by a caller that reads every cluster.
        if (ctx.access.clustersWith("resource.read") !== undefined)
          throw LeaseholdError.notFound("resource", resourceId);
        ctx.access.requireEverywhere(
          "lease.use.any",
          "this resource was made outside any lease, and belongs to no cluster",
        );
      }
      await scope.deleteResource(resourceId, ctx.access.actor);
      return {};
    },
  });
}

const ts = (date: Date | null) => (date ? timestampFromDate(date) : undefined);

function toProtoLease(l: ScopeLeaseRecord): MessageInitShape<typeof LeaseSchema> {
  return {
    id: l.id,
    runtime: l.runtime,
    label: l.label,
    state: LeaseState[l.state],
    closeReason: l.closeReason ? CloseReason[l.closeReason] : CloseReason.UNSPECIFIED,
    ttl: durationFromMs(l.ttlMs),
    createTime: ts(l.createdAt),
    expireTime: ts(l.expiresAt),
    closeTime: ts(l.closedAt),
    ...(l.result ? { result: l.result as never } : {}),
    ownedResources: l.ownedResources,
    createdBy: l.createdBy,
  };
}

/**
 * DebugLease's answer, kept under PAGE_BYTES as sent by leaving out what
 * does not fit ({@link fitSnapshot} chooses, from each part's size).
 */
/** Of how many of a lease's deployments DebugLease reads the actions' events. */
const DEBUG_DEPLOYMENT_EVENTS = 32;

function snapshotOf(
  lease: ScopeLeaseRecord,
  resources: readonly ResourceRecord[],
  deployments: ReadonlyMap<string, DeploymentView>,
  events: readonly EventRecord[],
): MessageInitShape<typeof DebugLeaseResponseSchema> {
  const protoLease = toProtoLease(lease);
  const full = resources.map((r) => toProtoResource(r, deployments.get(r.id)));
  const bare = full.map((r) => ({ ...r, body: { case: undefined } }));
  const bareSizes = bare.map((r) => encodedSize(ResourceSchema, r));
  const views = [...deployments.values()].map(toProtoDeployment);
  const protoEvents = events.map(toProtoEvent);
  const fit = fitSnapshot({
    fixed: bareSizes.reduce((sum, size) => sum + size, encodedSize(LeaseSchema, protoLease)),
    bodies: full.map((r, i) => encodedSize(ResourceSchema, r) - (bareSizes[i] as number)),
    deployments: views.map((d) => encodedSize(DeploymentSchema, d)),
    events: protoEvents.map((e) => encodedSize(EventSchema, e)),
  });
  return {
    lease: protoLease,
    resources: full.map((r, i) => (fit.bodies.has(i) ? r : (bare[i] as typeof r))),
    deployments: views.filter((_, i) => fit.deployments.has(i)),
    events: protoEvents.slice(protoEvents.length - fit.events),
    omittedDeployments: views.length - fit.deployments.size,
    omittedEvents: protoEvents.length - fit.events,
    omittedResourceBodies: full.length - fit.bodies.size,
  };
}

function toProtoDeployment(d: DeploymentView): MessageInitShape<typeof DeploymentSchema> {
  return {
    id: d.id,
    spec: fromJson(DeploymentSpecSchema, d.spec as never, { ignoreUnknownFields: true }),
    phase: DeploymentPhase[d.phase],
    containers: d.containers.map((c) => ({ ...c })),
    actionId: d.actionId,
    message: d.message,
    outputFileIds: [...d.outputFileIds],
    epoch: BigInt(d.epoch),
  };
}

/** Shortest and longest readiness period or check timeout. */
const PROBE_MIN_MS = 100;
const PROBE_MAX_MS = 10 * 60_000;

/** A path inside the deployment's work directory: relative, without "..". */
function checkRelativePath(v: Violations, field: string, path: string, required: boolean): void {
  if (path === "") {
    if (required) v.add(field, "is required");
  } else if (path.startsWith("/") || path.split(/[\\/]/).includes("..")) {
    v.add(field, "must be a relative path inside the deployment's work directory (no leading '/', no '..')");
  } else checkLength(v, field, path, 1024);
}

function checkCommand(
  v: Violations,
  field: string,
  command: DeploymentSpec["containers"][number]["command"],
): void {
  if (!command || command.argv.length === 0 || command.argv[0] === "") {
    v.add(
      `${field}.argv`,
      'is required: the program and its arguments, e.g. ["python3", "-m", "http.server"]',
    );
    return;
  }
  for (const key of Object.keys(command.env)) {
    if (key === "" || key.includes("=")) v.add(`${field}.env`, `${quote(key)} is not a variable name`);
  }
  // The agent runs it inside the deployment's work directory, and refuses a cwd that leaves it.
  checkRelativePath(v, `${field}.cwd`, command.cwd, false);
}

/** Every violation of a DeploymentSpec, named by its field path. */
function checkDeploymentSpec(v: Violations, spec: DeploymentSpec | undefined): void {
  if (!spec) {
    v.add("spec", "is required: the containers to run");
    return;
  }
  if (spec.containers.length === 0) v.add("spec.containers", "must list at least one container");
  if (spec.containers.length > 32) v.add("spec.containers", "must list at most 32 containers");
  const names = new Set<string>();
  for (const [i, c] of spec.containers.entries()) {
    checkName(v, `spec.containers[${i}].name`, c.name, 63);
    if (names.has(c.name)) v.add(`spec.containers[${i}].name`, `${quote(c.name)} is used twice`);
    names.add(c.name);
    checkCommand(v, `spec.containers[${i}].command`, c.command);
  }
  const probe = spec.readinessProbe;
  if (probe) {
    const check = probe.check;
    if (check.case === undefined) v.add("spec.readiness_probe", "must set one of exec, tcp_port or http_get");
    else if (check.case === "exec") checkCommand(v, "spec.readiness_probe.exec", check.value);
    else if (check.case === "tcpPort" && (check.value < 1 || check.value > 65535)) {
      v.add("spec.readiness_probe.tcp_port", "must be a port number, 1–65535");
    } else if (check.case === "httpGet") {
      const refusal = /^https?:\/\/[^/]/.test(check.value)
        ? probeUrlRefusal(check.value)
        : "must be an http:// or https:// URL";
      if (refusal !== undefined) v.add("spec.readiness_probe.http_get", refusal);
    }
    durationField(v, "spec.readiness_probe.period", probe.period, 0, PROBE_MAX_MS, PROBE_MIN_MS);
    durationField(v, "spec.readiness_probe.timeout", probe.timeout, 0, PROBE_MAX_MS, PROBE_MIN_MS);
  }
  checkRelativePath(v, "spec.outputs_dir", spec.outputsDir, false);
  if (spec.inputs.length > 256) v.add("spec.inputs", "must list at most 256 files");
  const paths = new Set<string>();
  for (const [i, input] of spec.inputs.entries()) {
    if (input.fileId === "") v.add(`spec.inputs[${i}].file_id`, "is required");
    checkRelativePath(v, `spec.inputs[${i}].path`, input.path, true);
    if (paths.has(input.path)) v.add(`spec.inputs[${i}].path`, `${quote(input.path)} is used twice`);
    paths.add(input.path);
  }
}

function toProtoResource(
  r: ResourceRecord,
  deployment?: DeploymentView,
): MessageInitShape<typeof ResourceSchema> {
  const body: MessageInitShape<typeof ResourceSchema>["body"] = deployment
    ? { case: "deployment", value: toProtoDeployment(deployment) }
    : r.kind === "file"
      ? {
          case: "file",
          value: {
            name: r.name ?? "",
            sizeBytes: BigInt(r.sizeBytes ?? 0),
            sha256: r.sha256 ?? "",
            contentType: r.contentType ?? "",
          },
        }
      : { case: "object", value: (r.body ?? {}) as never };
  return {
    id: r.id,
    kind: r.kind,
    ownership: Ownership[r.ownership],
    leaseId: r.leaseId ?? "",
    createTime: ts(r.createdAt),
    body,
  };
}
