import type { Right } from "../auth/access.js";

/**
 * The right each method needs in at least one cluster before its handler
 * runs; the handler then checks the cluster (and owner) of what the call
 * touches. Keyed `package.Service/Method`; a list means any one of its
 * rights will do. A method missing here is refused
 * for every authenticated caller (deny by default), and the authorization
 * test fails for it.
 */
export const METHOD_RIGHTS: Readonly<Record<string, Right | readonly Right[]>> = {
  "leasehold.v1.ActionService/SubmitAction": "action.submit",
  // The handler checks action.submit in the cluster of every item.
  "leasehold.v1.ActionService/SubmitActions": "action.submit",
  "leasehold.v1.ActionService/GetAction": "action.read",
  "leasehold.v1.ActionService/ListActions": "action.read",
  "leasehold.v1.ActionService/CancelAction": "action.cancel.own",
  // The handler matches only the caller's own actions unless it holds action.cancel.any there.
  "leasehold.v1.ActionService/CancelActions": "action.cancel.own",
  "leasehold.v1.ActionService/WatchAction": "action.read",
  "leasehold.v1.ActionService/ExplainAction": "action.read",
  "leasehold.v1.ClusterService/ListClusters": "cluster.read",
  "leasehold.v1.ClusterService/ListWorkers": "worker.read",
  "leasehold.v1.ClusterService/GetWorker": "worker.read",
  "leasehold.v1.ClusterService/DrainWorker": "worker.drain",
  "leasehold.v1.ClusterService/UndrainWorker": "worker.drain",
  "leasehold.v1.ClusterService/ForgetWorker": "worker.forget",
  "leasehold.v1.ClusterService/ResumeExpiries": "cluster.resume_expiries",
  "leasehold.v1.EventService/ListEvents": "event.read",
  "leasehold.v1.EventService/WatchEvents": "event.read",
  "leasehold.v1.LeaseService/CreateLease": "lease.create",
  "leasehold.v1.LeaseService/GetLease": "lease.read",
  "leasehold.v1.LeaseService/ListLeases": "lease.read",
  "leasehold.v1.LeaseService/PromoteResource": "lease.use.own",
  "leasehold.v1.LeaseService/RenewLease": "lease.use.own",
  "leasehold.v1.LeaseService/CommitLease": "lease.use.own",
  "leasehold.v1.LeaseService/RollbackLease": "lease.use.own",
  "leasehold.v1.LeaseService/DeleteLease": "lease.delete",
  "leasehold.v1.LeaseService/DeleteLeases": "lease.delete",
  "leasehold.v1.LeaseService/SetResult": "lease.use.own",
  "leasehold.v1.LeaseService/DebugLease": "lease.debug",
  "leasehold.v1.LeaseService/WaitLease": "lease.read",
  "leasehold.v1.LeaseService/CollectOutputs": "lease.use.own",
  "leasehold.v1.ResourceService/CreateFile": ["resource.create", "file.upload"],
  "leasehold.v1.ResourceService/CreateDeployment": "resource.create",
  "leasehold.v1.ResourceService/CreateObject": "resource.create",
  "leasehold.v1.ResourceService/GetResource": "resource.read",
  "leasehold.v1.ResourceService/ListResources": "resource.read",
  // Agents: only the inputs of deployments their sessions hold (checked in the handler).
  "leasehold.v1.ResourceService/DownloadFile": ["resource.read", "file.download.input"],
  "leasehold.v1.ResourceService/DeleteResource": "lease.use.own",
  "leasehold.v1.WorkerService/Connect": "worker.connect",
};
