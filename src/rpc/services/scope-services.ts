import type { MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { LeaseholdError } from "../../errors.js";
import { CloseReason, type LeaseSchema, LeaseService, LeaseState } from "../../gen/leasehold/v1/lease_pb.js";
import { Ownership, type ResourceSchema, ResourceService } from "../../gen/leasehold/v1/resource_pb.js";
import type { ScopeLeaseService } from "../../scope/scope-lease-service.js";
import type { ResourceRecord, ScopeLeaseRecord, ScopeLeaseState } from "../../store/scope-leases.js";
import type { JsonObject } from "../../work/action.js";
import type { EventService as Events } from "../../work/event-service.js";
import { pageSize } from "../../work/page-token.js";
import { bind, type ServiceBinding } from "../server.js";
import { checkLength, checkName, durationField, requireId, Violations } from "../validate.js";
import { toProtoEvent } from "./event-service.js";

const DAY_MS = 24 * 60 * 60_000;
/** Bytes per DownloadFile message. */
const CHUNK_BYTES = 64 * 1024;

/**
 * LeaseService over the scope-lease service. WaitLease and CollectOutputs
 * need deployments run by agents, which are not built yet: they answer
 * UNIMPLEMENTED.
 */
export function leaseServiceBinding(scope: ScopeLeaseService, events: Events): ServiceBinding {
  return bind(LeaseService, {
    async createLease(request) {
      const v = new Violations();
      checkName(v, "runtime", request.runtime);
      checkLength(v, "label", request.label, 128);
      checkLength(v, "request_id", request.requestId, 128);
      const ttlMs = request.ttl ? durationField(v, "ttl", request.ttl, 0, 365 * DAY_MS) : undefined;
      if (ttlMs !== undefined && ttlMs < 1000) v.add("ttl", "must be at least 1s");
      v.throwIfAny();
      const lease = await scope.create({
        runtime: request.runtime,
        label: request.label,
        ttlMs,
        requestId: request.requestId || undefined,
      });
      return { lease: toProtoLease(lease) };
    },
    async getLease(request) {
      return { lease: toProtoLease(await scope.get(requireId("lease_id", request.leaseId))) };
    },
    async listLeases(request) {
      let state: ScopeLeaseState | undefined;
      if (request.state !== LeaseState.UNSPECIFIED) {
        const name = LeaseState[request.state];
        if (name === undefined)
          throw LeaseholdError.invalidArgument("state", `is not a known LeaseState (${request.state})`);
        state = name as ScopeLeaseState;
      }
      const filter = { state, label: request.label || undefined, runtime: request.runtime || undefined };
      const page = await scope.list(filter, pageSize(request.pageSize), request.pageToken);
      return { leases: page.items.map(toProtoLease), nextPageToken: page.nextPageToken };
    },
    async promoteResource(request) {
      const v = new Violations();
      if (request.leaseId === "") v.add("lease_id", "is required");
      if (request.kind === "") v.add("kind", "is required");
      if (request.resourceId === "") v.add("resource_id", "is required");
      v.throwIfAny();
      return {
        resource: toProtoResource(await scope.promote(request.leaseId, request.kind, request.resourceId)),
      };
    },
    async commitLease(request) {
      const closed = await scope.commit(requireId("lease_id", request.leaseId));
      return { lease: toProtoLease(closed.lease), keptResources: closed.resources.length };
    },
    async rollbackLease(request) {
      const closed = await scope.rollback(requireId("lease_id", request.leaseId));
      return { lease: toProtoLease(closed.lease), destroyedResources: closed.resources.length };
    },
    async deleteLease(request) {
      await scope.delete(requireId("lease_id", request.leaseId));
      return {};
    },
    async deleteLeases(request) {
      const deleted = await scope.deleteMany({
        label: request.label || undefined,
        closedBefore: request.closedBefore ? timestampDate(request.closedBefore) : undefined,
      });
      return { deleted };
    },
    async setResult(request) {
      const leaseId = requireId("lease_id", request.leaseId);
      if (request.result === undefined)
        throw LeaseholdError.invalidArgument("result", "is required (a JSON object)");
      return { lease: toProtoLease(await scope.setResult(leaseId, request.result as JsonObject)) };
    },
    async debugLease(request) {
      const leaseId = requireId("lease_id", request.leaseId);
      if (request.eventLimit < 0 || request.eventLimit > 1000) {
        throw LeaseholdError.invalidArgument("event_limit", "must be between 0 and 1000 (0 means 50)");
      }
      const lease = await scope.get(leaseId);
      const resources = await scope.listResources({ leaseId }, 1000, "");
      const page = await events.list({ leaseId }, 1000, "");
      const recent = page.items.slice(-(request.eventLimit || 50));
      return {
        lease: toProtoLease(lease),
        resources: resources.items.map(toProtoResource),
        deployments: [],
        events: recent.map(toProtoEvent),
      };
    },
  });
}

/** ResourceService over the scope-lease service. CreateDeployment awaits deployments on agents: UNIMPLEMENTED. */
export function resourceServiceBinding(scope: ScopeLeaseService): ServiceBinding {
  return bind(ResourceService, {
    async createFile(request) {
      const v = new Violations();
      if (request.name === "") v.add("name", "is required");
      checkLength(v, "name", request.name, 512);
      checkLength(v, "content_type", request.contentType, 256);
      v.throwIfAny();
      const resource = await scope.createResource({
        kind: "file",
        leaseId: request.leaseId || undefined,
        name: request.name,
        content: request.content,
        ...(request.contentType ? { contentType: request.contentType } : {}),
      });
      return { resource: toProtoResource(resource) };
    },
    async createObject(request) {
      const v = new Violations();
      checkName(v, "kind", request.kind);
      if (request.kind === "file" || request.kind === "deployment") {
        v.add("kind", `"${request.kind}" has its own create call; pick another kind for a generic object`);
      }
      v.throwIfAny();
      const resource = await scope.createResource({
        kind: request.kind,
        leaseId: request.leaseId || undefined,
        body: (request.body ?? {}) as JsonObject,
      });
      return { resource: toProtoResource(resource) };
    },
    async getResource(request) {
      return {
        resource: toProtoResource(await scope.getResource(requireId("resource_id", request.resourceId))),
      };
    },
    async listResources(request) {
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
      const page = await scope.listResources(filter, pageSize(request.pageSize), request.pageToken);
      return { resources: page.items.map(toProtoResource), nextPageToken: page.nextPageToken };
    },
    async *downloadFile(request) {
      const content = await scope.readFile(requireId("resource_id", request.resourceId));
      for (let at = 0; at < content.byteLength; at += CHUNK_BYTES) {
        yield { chunk: content.subarray(at, at + CHUNK_BYTES) };
      }
    },
    async deleteResource(request) {
      await scope.deleteResource(requireId("resource_id", request.resourceId));
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
  };
}

function toProtoResource(r: ResourceRecord): MessageInitShape<typeof ResourceSchema> {
  const body: MessageInitShape<typeof ResourceSchema>["body"] =
    r.kind === "file"
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
