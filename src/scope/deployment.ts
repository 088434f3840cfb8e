import type { ResourceRecord } from "../store/scope-leases.js";
import type { ActionRecord, JsonObject } from "../work/action.js";

/** A deployment's lifecycle phase (DeploymentPhase in resource.proto). */
export type DeploymentPhase = "PENDING" | "STARTING" | "READY" | "STOPPING" | "STOPPED" | "FAILED";

/** The observed state of one container, as the agent reported it. */
export interface ContainerView {
  readonly name: string;
  /** waiting | running | exited */
  readonly state: string;
  readonly exitCode: number;
  readonly message: string;
}

/** A deployment as clients see it: its spec and the state of the action that runs it. */
export interface DeploymentView {
  readonly id: string;
  readonly leaseId: string | null;
  /** The DeploymentSpec in the proto3 JSON mapping. */
  readonly spec: JsonObject;
  readonly phase: DeploymentPhase;
  readonly containers: readonly ContainerView[];
  readonly actionId: string;
  readonly message: string;
  readonly outputFileIds: readonly string[];
  /** The epoch of its action's latest lease: which run this is (0 before the first). */
  readonly epoch: number;
}

/** An entry of a deployment's outputs_dir its agent did not save (SkippedOutput in lease.proto). */
export interface SkippedOutputView {
  /** Under outputs_dir, "/"-separated. */
  readonly path: string;
  /** 0 for what is not a regular file. */
  readonly sizeBytes: number;
  readonly reason: string;
}

/** Phases after which a deployment never changes again. */
export const FINAL_PHASES: ReadonlySet<DeploymentPhase> = new Set(["STOPPED", "FAILED"]);

/** The payload of a deployment's action: what the reference agent runs. */
export interface DeploymentPayload {
  readonly deployment: { readonly id: string; readonly leaseId: string; readonly spec: JsonObject };
}

/** Progress phases the reference agent reports, mapped to deployment phases. */
const REPORTED: Record<string, DeploymentPhase> = {
  starting: "STARTING",
  ready: "READY",
  stopping: "STOPPING",
};

/**
 * Derives a deployment's phase from its action: queued → PENDING; leased →
 * the phase the agent last reported (STARTING until it says more, STOPPING
 * once outputs were asked for); succeeded or cancelled → STOPPED; failed →
 * FAILED. Container states come from the agent's last report, or its final
 * one once the action ended; an action that ended without one (destroyed,
 * cancelled) shows the containers of its last report stopped, not running.
 */
export function deploymentView(resource: ResourceRecord, action: ActionRecord | undefined): DeploymentView {
  const spec = resource.body ?? {};
  const base = {
    id: resource.id,
    leaseId: resource.leaseId,
    spec,
    actionId: resource.actionId ?? "",
    epoch: action?.epoch ?? 0,
  };
  if (!action) {
    return { ...base, phase: "STOPPED", containers: [], message: "its action is gone", outputFileIds: [] };
  }
  const final = finalReport(action);
  const finalContainers = containersOf(final);
  const last = finalContainers ?? containersOf(action.phaseDetails) ?? waiting(spec);
  // Ended without a final report of its containers (destroyed, cancelled, its run lost): the last
  // progress report would show them running forever.
  const reported =
    finalContainers === undefined && action.state !== "QUEUED" && action.state !== "LEASED"
      ? last.map(settled)
      : last;
  const outputFileIds = stringList(final?.outputFileIds);
  switch (action.state) {
    case "QUEUED":
      return {
        ...base,
        phase: "PENDING",
        containers: waiting(spec),
        message:
          action.attemptCount > 0
            ? `waiting for an agent of ${action.cluster} (attempt ${action.attemptCount} was lost)`
            : `waiting for an agent of ${action.cluster}`,
        outputFileIds: [],
      };
    case "LEASED": {
      const phase =
        action.stopReason === "COLLECT_OUTPUTS" ? "STOPPING" : (REPORTED[action.phase] ?? "STARTING");
      return {
        ...base,
        phase,
        containers: reported,
        message: `run by worker ${action.workerId} (epoch ${action.epoch})`,
        outputFileIds: [],
      };
    }
    case "SUCCEEDED":
      return { ...base, phase: "STOPPED", containers: reported, message: "stopped", outputFileIds };
    case "CANCELLED":
      return {
        ...base,
        phase: "STOPPED",
        containers: reported,
        message: action.failureReason,
        outputFileIds,
      };
    case "FAILED":
      return { ...base, phase: "FAILED", containers: reported, message: action.failureReason, outputFileIds };
  }
}

/** What the agent reported as the deployment's action ended: its output, or its failure's details. */
function finalReport(action: ActionRecord): JsonObject | null | undefined {
  return (action.state === "FAILED" ? action.lastError?.details : action.output) as
    | JsonObject
    | null
    | undefined;
}

/**
 * What the agent of an ended deployment reported it did not save: the
 * reference agent's `skipped` list of `{name, sizeBytes, reason}` (a size
 * not reported is 0). Entries without a name are left out.
 */
export function skippedOutputsOf(action: ActionRecord | undefined): SkippedOutputView[] {
  const list = action ? finalReport(action)?.skipped : undefined;
  if (!Array.isArray(list)) return [];
  return list.flatMap((item: unknown) => {
    const o = (typeof item === "object" && item !== null ? item : {}) as Record<string, unknown>;
    if (typeof o.name !== "string" || o.name === "") return [];
    const size = typeof o.sizeBytes === "number" && Number.isSafeInteger(o.sizeBytes) ? o.sizeBytes : 0;
    return [{ path: o.name, sizeBytes: Math.max(0, size), reason: String(o.reason ?? "") }];
  });
}

/**
 * A container of an ended deployment as its last report left it: one still running then was
 * stopped with it (how it exited was not reported); one still waiting never started. Why the
 * deployment ended is its own message.
 */
function settled(c: ContainerView): ContainerView {
  if (c.state === "exited") return c;
  if (c.state === "running") {
    return { ...c, state: "exited", message: "stopped with the deployment; its exit was not reported" };
  }
  return { ...c, message: c.message || "never started" };
}

function containersOf(details: JsonObject | null | undefined): ContainerView[] | undefined {
  const list = details?.containers;
  if (!Array.isArray(list)) return undefined;
  return list.flatMap((c: unknown) => {
    if (typeof c !== "object" || c === null) return [];
    const o = c as Record<string, unknown>;
    return [
      {
        name: String(o.name ?? ""),
        state: String(o.state ?? ""),
        exitCode: typeof o.exitCode === "number" ? o.exitCode : 0,
        message: typeof o.message === "string" ? o.message : "",
      },
    ];
  });
}

function waiting(spec: JsonObject): ContainerView[] {
  const list = Array.isArray(spec.containers) ? (spec.containers as { name?: unknown }[]) : [];
  return list.map((c) => ({ name: String(c.name ?? ""), state: "waiting", exitCode: 0, message: "" }));
}

const stringList = (value: unknown): string[] =>
  Array.isArray(value) ? value.filter((v): v is string => typeof v === "string") : [];
