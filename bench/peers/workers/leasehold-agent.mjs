/**
 * A Leasehold agent process on the SDK (`src/agent`), with `capacity` slots
 * (and `prefetch` grants held beyond them) and a no-op handler (or, in hold mode, one that blocks until killed).
 * Started by the runner with `node --import tsx` from the repository root.
 */
import { createAgent } from "../../../src/agent/index.ts";
import { childMain, nowMs } from "../lib/child.mjs";

childMain(async (config, send) => {
  const agent = createAgent({
    address: config.address,
    cluster: config.queue,
    workerId: config.workerId,
    capacity: config.concurrency,
    prefetch: config.prefetch ?? 0,
    handler:
      config.mode === "hold"
        ? async (ctx) => {
            send({ type: "started", at: nowMs(), job: ctx.actionId });
            // Blocks until the process is killed (or the lease is lost).
            await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve, { once: true }));
            return undefined;
          }
        : async () => undefined,
    onEvent: (event) => {
      if (event.type === "connected") send({ type: "ready" });
    },
  });
  return { stop: () => agent.close({ timeoutMs: 1000 }) };
});
