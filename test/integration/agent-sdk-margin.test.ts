import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import { agentEvents, processWarnings } from "../helpers/agent-events.js";
import { startTestServer } from "../helpers/server.js";

describe("an SDK agent's selfFenceMarginMs", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it.each([-1, Number.NaN, Number.POSITIVE_INFINITY])("is refused by createAgent when it is %s", (margin) => {
    expect(() =>
      createAgent({
        address: "127.0.0.1:1",
        cluster: "east",
        workerId: "margin",
        selfFenceMarginMs: margin,
        handler: async () => undefined,
      }),
    ).toThrow(`createAgent: selfFenceMarginMs must be a number of milliseconds of at least 0, not ${margin}`);
  });

  it("too large for the server's grace period is said, as an event and a process warning, instead of running nothing in silence", async () => {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const warnings = processWarnings();
    cleanups.push(warnings.stop);
    const events = agentEvents();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "margin",
      selfFenceMarginMs: 2600,
      onEvent: events.onEvent,
      handler: async () => undefined,
    });
    cleanups.push(() => agent.close({ timeoutMs: 100 }));
    const warning = await events.until(
      (e): e is Extract<AgentEvent, { type: "warning" }> => e.type === "warning",
    );
    expect(warning.message).toMatch(
      /^selfFenceMarginMs \(2600 ms\) leaves no guarantee to start work under: the server at .* grants a grace period of 3000 ms with heartbeats every 500 ms, .* Use a margin below 2500 ms\.$/,
    );
    await warnings.until(`leasehold agent margin: ${warning.message}`);
  });
});
