/**
 * The Leasehold agent SDK: what a cluster agent imports.
 *
 * ```ts
 * import { createAgent } from "leasehold/agent";
 * const agent = createAgent({ address: "127.0.0.1:50051", cluster: "east", workerId: "w1", handler });
 * ```
 */

export type { ClientSecurity } from "../rpc/client-security.js";
/** What a handler returns, and what payloads, checkpoints and details are: a JSON object. */
export type { JsonObject } from "../work/action.js";
export {
  type ActionContext,
  ActionFailure,
  type Agent,
  type AgentEvent,
  type AgentOptions,
  type CloseResult,
  createAgent,
  LeaseLost,
} from "./agent.js";
export { type CommandPayload, commandHandler, parseCommandPayload } from "./command-handler.js";
export {
  type AllowedCommand,
  type CommandAllowList,
  type CommandPolicy,
  type CommandRequest,
  commandLine,
  commandPolicy,
  GUARDED_ENV,
  hasDotDotSegment,
  isCommandAllowed,
  isEnvNameAllowed,
  requireAllowedCommand,
  resolveProgram,
} from "./command-policy.js";
export {
  createDeploymentHandler,
  type DeploymentHandlerOptions,
  isDeploymentPayload,
} from "./deployment-handler.js";
// What keeps a killed or paused agent's commands from running on (see commandHandler).
export { type FenceKeeper, keptBy, startFenceKeeper } from "./fence-keeper.js";
export { createProcessRegistry, type ProcessRegistry } from "./process-registry.js";
