import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import { scriptedWorkerServer } from "../helpers/scripted-worker.js";

describe("the agent SDK, when the server refuses a completion as INVALID", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("fails the action with the server's reason instead of dropping a lease the server still holds", async () => {
    // A server whose limits are not the ones the agent fitted its report to (another version).
    const refusal = "completion.succeeded.output: must be at most 1 MiB as JSON";
    const server = await scriptedWorkerServer({ refuseFirstCompletion: refusal });
    cleanups.push(server.close);
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: async () => ({ rows: 3 }),
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    await server.acked;
    server.send({ message: { case: "grant", value: { actionId: "a1", epoch: 1n, attempt: 1 } } });
    const completions = () =>
      server.requests.flatMap((r) =>
        (r.message.case === "batch" ? r.message.value.messages : [r]).flatMap((m) =>
          m.message.case === "completion" ? [m.message.value] : [],
        ),
      );
    await server.until(() => completions().length === 2);
    const [first, second] = completions();
    expect(first?.outcome.case).toBe("succeeded");
    expect(second).toMatchObject({ actionId: "a1", epoch: 1n });
    expect(second?.outcome).toMatchObject({
      case: "failed",
      value: { message: `the server refused this action's output: ${refusal}`, retryable: false },
    });
    // Once: the failure is answered, and the lease is no longer listed.
    await server.until(() =>
      events.some(
        (e) => e.type === "finished" && e.actionId === "a1" && e.outcome === "failed" && e.accepted,
      ),
    );
    expect(events.filter((e) => e.type === "finished")).toHaveLength(1);
  });
});
