import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { agentEvents, finishedOf, processWarnings } from "../helpers/agent-events.js";
import { startTestServer } from "../helpers/server.js";

describe("an SDK agent's observers cannot break it", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("an onEvent and an onGuarantee that throw on every call leave heartbeats and handlers running, and are told as process warnings", async () => {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const warnings = processWarnings();
    cleanups.push(warnings.stop);
    const events = agentEvents();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "observed",
      // Seen first, then thrown: the throw on `connected` used to come before the first
      // heartbeat, and the one on `grant` before the handler started.
      onEvent: (event: AgentEvent) => {
        events.onEvent(event);
        throw new Error(`observer broke on ${event.type}`);
      },
      onGuarantee: () => {
        throw new Error("watchdog broke");
      },
      handler: async () => ({ done: true }),
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    const finished = await events.until(finishedOf(action?.id ?? ""));
    expect(finished).toMatchObject({ outcome: "succeeded", accepted: true });
    expect((await api.getAction({ actionId: action?.id ?? "" })).action?.state).toBe(ActionState.SUCCEEDED);
    await warnings.until(
      "leasehold agent observed: onEvent (connected event) threw, and the agent went on: observer broke on connected",
    );
    await warnings.until(
      "leasehold agent observed: onEvent (grant event) threw, and the agent went on: observer broke on grant",
    );
    await warnings.until(
      "leasehold agent observed: onGuarantee threw, and the agent went on: watchdog broke",
    );
    await agent.close({ timeoutMs: 1000 });
  });
});
