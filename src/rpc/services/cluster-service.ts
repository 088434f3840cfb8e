import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Logger } from "pino";
import type { Access } from "../../auth/access.js";
import { LeaseholdError } from "../../errors.js";
import {
  ClusterHealth,
  type ClusterSchema,
  ClusterService,
  type WorkerSchema,
  WorkerState,
} from "../../gen/leasehold/v1/cluster_pb.js";
import type { Clock } from "../../store/clock.js";
import { type ClusterRecord, listClusters, resumeExpiries } from "../../store/clusters.js";
import type { Db } from "../../store/database.js";
import { forgetWorker } from "../../store/queries/forget-workers.js";
import { listWorkers, type WorkerState as StoreState, type WorkerRecord } from "../../store/workers.js";
import { type ChangeFeed, EVENTS_TOPIC } from "../../work/change-feed.js";
import type { LeaseManager } from "../../work/lease-manager.js";
import { toPage } from "../../work/page.js";
import { decodePageToken, issuedFor, pageSize } from "../../work/page-token.js";
import { bind, type ServiceBinding } from "../server.js";
import { checkFilterName, checkLength, checkName, requireId, Violations } from "../validate.js";

/**
 * The ClusterService handlers: what the database says about clusters and
 * workers, and the operators' changes to them. Rights are checked in the cluster of the worker or cluster a call
 * touches.
 */
export function clusterServiceBinding(deps: {
  db: Db;
  clock: Clock;
  leases: LeaseManager;
  feed: ChangeFeed;
  /** Where each change an operator makes (drain, undrain, forget, resume expiries) is logged, as an audit line. */
  log: Logger;
}): ServiceBinding {
  const { db, clock, leases, feed, log } = deps;
  const getWorker = async (workerId: string) => {
    const [worker] = await listWorkers(db, { workerId }, undefined, 1);
    if (!worker) throw LeaseholdError.notFound("worker", workerId);
    return worker;
  };
  /** The worker if `access` may read it; NOT_FOUND, as for an unknown id, if not: ids are no oracle. */
  const visibleWorker = async (access: Access, workerId: string) => {
    const worker = await getWorker(workerId);
    access.requireVisible("worker.read", worker.cluster, () => LeaseholdError.notFound("worker", workerId));
    return worker;
  };
  return bind(ClusterService, {
    async listClusters(_request, ctx) {
      const readable = (await listClusters(db, clock)).filter((c) => ctx.access.can("cluster.read", c.name));
      return { clusters: readable.map(toProtoCluster) };
    },
    async listWorkers(request, ctx) {
      ctx.access.requireListScope("worker.read", request.cluster);
      checkFilterName("cluster", request.cluster);
      let state: StoreState | undefined;
      if (request.state !== WorkerState.UNSPECIFIED) {
        const name = WorkerState[request.state];
        if (name === undefined)
          throw LeaseholdError.invalidArgument("state", `is not a known WorkerState (${request.state})`);
        state = name as StoreState;
      }
      const filter = { cluster: request.cluster || undefined, state };
      const size = pageSize(request.pageSize);
      const cursor = decodePageToken(request.pageToken, issuedFor("workers", filter));
      const rows = await listWorkers(db, filter, cursor?.after, size + 1);
      const page = toPage(rows, size, (w) => w.workerId, issuedFor("workers", filter));
      return { workers: page.items.map(toProtoWorker), nextPageToken: page.nextPageToken };
    },
    async getWorker(request, ctx) {
      const worker = await visibleWorker(ctx.access, requireId("worker_id", request.workerId));
      return { worker: toProtoWorker(worker) };
    },
    async drainWorker(request, ctx) {
      const workerId = requireId("worker_id", request.workerId);
      const v = new Violations();
      checkLength(v, "reason", request.reason, 1024);
      v.throwIfAny();
      ctx.access.require("worker.drain", (await visibleWorker(ctx.access, workerId)).cluster);
      const outcome = await leases.drain(workerId, request.reason, ctx.access.actor);
      if (outcome === "not found") throw LeaseholdError.notFound("worker", workerId);
      if (outcome === "no session") {
        throw LeaseholdError.failedPrecondition(
          "WORKER_NOT_CONNECTED",
          `worker ${workerId} has no live session: nothing to drain (a drain lasts as long as the worker's session, and its next session is granted work); drain it while its agent runs`,
          { type: "WORKER_STATE", subject: `workers/${workerId}`, description: "no live session" },
        );
      }
      log.info(
        { principal: ctx.access.actor, workerId, reason: request.reason, outcome },
        "audit: drain worker",
      );
      return { worker: toProtoWorker(await getWorker(workerId)) };
    },
    async undrainWorker(request, ctx) {
      const workerId = requireId("worker_id", request.workerId);
      const v = new Violations();
      checkLength(v, "reason", request.reason, 1024);
      v.throwIfAny();
      ctx.access.require("worker.drain", (await visibleWorker(ctx.access, workerId)).cluster);
      const outcome = await leases.undrain(workerId, request.reason, ctx.access.actor);
      if (outcome === "not found") throw LeaseholdError.notFound("worker", workerId);
      if (outcome === "no session") {
        throw LeaseholdError.failedPrecondition(
          "WORKER_NOT_CONNECTED",
          `worker ${workerId} has no live session: nothing to undrain (a drain ends with the worker's session, and its next session is granted work)`,
          { type: "WORKER_STATE", subject: `workers/${workerId}`, description: "no live session" },
        );
      }
      log.info(
        { principal: ctx.access.actor, workerId, reason: request.reason, outcome },
        "audit: undrain worker",
      );
      // "not draining" is an answer too: the worker as it is, taking work.
      return { worker: toProtoWorker(await getWorker(workerId)), drainEnded: outcome === "undrained" };
    },
    async forgetWorker(request, ctx) {
      const workerId = requireId("worker_id", request.workerId);
      const v = new Violations();
      checkLength(v, "reason", request.reason, 1024);
      v.throwIfAny();
      const worker = await visibleWorker(ctx.access, workerId);
      ctx.access.require("worker.forget", worker.cluster);
      const outcome = await forgetWorker(db, workerId, request.reason, ctx.access.actor);
      if (outcome === "not found") throw LeaseholdError.notFound("worker", workerId);
      if (outcome === "live") {
        throw LeaseholdError.failedPrecondition(
          "WORKER_SESSION_LIVE",
          `worker ${workerId} has a live session (connected, or in grace until its deadline): stop its agent, ` +
            "or drain it and let it finish, and forget it once its session has ended",
          { type: "WORKER_STATE", subject: `workers/${workerId}`, description: "live session" },
        );
      }
      log.info(
        { principal: ctx.access.actor, workerId, cluster: worker.cluster, reason: request.reason },
        "audit: forget worker",
      );
      feed.publish(EVENTS_TOPIC);
      return { worker: toProtoWorker(worker) };
    },
    async resumeExpiries(request, ctx) {
      const v = new Violations();
      checkName(v, "cluster", request.cluster);
      checkLength(v, "reason", request.reason, 1024);
      v.throwIfAny();
      ctx.access.require("cluster.resume_expiries", request.cluster);
      const outcome = await resumeExpiries(db, clock, request.cluster, request.reason, ctx.access.actor);
      if (outcome === "not found") throw LeaseholdError.notFound("cluster", request.cluster);
      if (outcome === "not partitioned") {
        throw LeaseholdError.failedPrecondition(
          "CLUSTER_NOT_PARTITIONED",
          `cluster ${request.cluster} is not partitioned: its lease expiries are not paused`,
          { type: "CLUSTER_STATE", subject: `clusters/${request.cluster}`, description: "not partitioned" },
        );
      }
      log.info(
        { principal: ctx.access.actor, cluster: request.cluster, reason: request.reason, outcome },
        "audit: resume expiries",
      );
      if (outcome === "resumed") feed.publish(EVENTS_TOPIC);
      const [cluster] = await listClusters(db, clock, request.cluster);
      return { cluster: cluster ? toProtoCluster(cluster) : { name: request.cluster } };
    },
  });
}

function toProtoCluster(c: ClusterRecord): MessageInitShape<typeof ClusterSchema> {
  return {
    name: c.name,
    health: ClusterHealth[c.health],
    healthReason: c.healthReason,
    connectedWorkers: c.connectedWorkers,
    workersInGrace: c.workersInGrace,
    queuedActions: c.queuedActions,
    leasedActions: c.leasedActions,
    recentExpiries: c.recentExpiries,
    ...(c.partitionedAt ? { partitionedTime: timestampFromDate(c.partitionedAt) } : {}),
    expiriesPaused: c.expiriesPaused,
  };
}

function toProtoWorker(w: WorkerRecord): MessageInitShape<typeof WorkerSchema> {
  return {
    workerId: w.workerId,
    cluster: w.cluster,
    capacity: w.capacity,
    labels: { ...w.labels },
    state: WorkerState[w.state],
    ...(w.session
      ? {
          session: {
            sessionId: w.session.sessionId,
            startTime: timestampFromDate(w.session.startedAt),
            deadline: timestampFromDate(w.session.deadline),
            ...(w.session.streamLostAt ? { streamLostTime: timestampFromDate(w.session.streamLostAt) } : {}),
            serverId: w.session.serverId ?? "",
          },
          lastSeenTime: timestampFromDate(w.session.lastHeardAt),
        }
      : { lastSeenTime: timestampFromDate(w.lastSeenAt) }),
    heldLeases: w.heldLeases.map((l) => ({ actionId: l.actionId, epoch: BigInt(l.epoch) })),
    draining: w.draining,
    agentVersion: w.agentVersion,
  };
}
