import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import { RevokeReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { deferred } from "../helpers/deferred.js";
import { type ScriptedResponse as Response, scriptedWorkerServer } from "../helpers/scripted-worker.js";

describe("the agent SDK, granted an action again while its old handler stops", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it.each([
    [1, "runs"],
    [2, "runs"],
    [1, "closes"],
    [2, "closes"],
  ] as const)(
    "starts the new grant only once the old handler of the same action has returned (%i slots, then %s)",
    async (capacity, then) => {
      const server = await scriptedWorkerServer();
      cleanups.push(server.close);
      const log: string[] = [];
      const firstStopping = deferred();
      const letFirstReturn = deferred();
      const secondStarted = deferred();
      const otherStarted = deferred();
      const letOtherReturn = deferred();
      const seen: AgentEvent[] = [];
      const grantSeen = new Map<number, () => void>();
      const agent = createAgent({
        address: server.address,
        workerId: "w1",
        cluster: "east",
        capacity,
        onEvent: (e) => {
          seen.push(e);
          if (e.type === "grant") grantSeen.get(e.epoch)?.();
        },
        handler: async (ctx) => {
          if (ctx.actionId === "b1") {
            // Another action, finishing while the agent closes.
            otherStarted.resolve();
            await letOtherReturn.promise;
            log.push("b1 done");
            return {};
          }
          log.push(`start ${ctx.epoch}`);
          if (ctx.epoch === 1) {
            // It honours the abort, but takes a while to tear down (a container's stop).
            await new Promise<void>((resolve) =>
              ctx.signal.addEventListener("abort", () => {
                firstStopping.resolve();
                void letFirstReturn.promise.then(resolve);
              }),
            );
            log.push("end 1");
            return {};
          }
          secondStarted.resolve();
          return { ok: true };
        },
      });
      cleanups.push(() => agent.close({ timeoutMs: 1000 }));
      await server.acked;
      const grant = (epoch: bigint): Response => ({
        message: { case: "grant", value: { actionId: "a1", epoch, attempt: Number(epoch) } },
      });
      server.send(grant(1n));
      await new Promise<void>((r) => grantSeen.set(1, r));
      // The server ends the lease (the session expired while its stream was down, say) and,
      // the slot being free on its side, grants the action again at once.
      server.send({
        message: { case: "revoke", value: { actionId: "a1", epoch: 1n, reason: RevokeReason.EXPIRED } },
      });
      await firstStopping.promise;
      const secondGranted = new Promise<void>((r) => grantSeen.set(2, r));
      server.send(grant(2n));
      await secondGranted;
      // The guarantee is fresh (60 s), so only the stopping handler keeps the new one waiting.
      expect(log).toEqual(["start 1"]);
      if (then === "closes") {
        // The agent closes meanwhile: it waits for the stopping handler too (its goodbye comes
        // after it; a heartbeat a second later finds none yet), and gives the new grant back unrun.
        if (capacity > 1) {
          server.send({ message: { case: "grant", value: { actionId: "b1", epoch: 1n, attempt: 1 } } });
          await otherStarted.promise;
        }
        const closed = agent.close({ timeoutMs: 30_000 }).then(() => log.push("closed"));
        if (capacity > 1) {
          // Its report is answered while the old handler still stops: no goodbye for that.
          const reported = server.next("completion");
          letOtherReturn.resolve();
          await reported;
        }
        await server.next("heartbeat");
        expect(server.received).not.toContain("goodbye");
        letFirstReturn.resolve();
        await closed;
        expect(log).toEqual(["start 1", ...(capacity > 1 ? ["b1 done"] : []), "end 1", "closed"]);
        return;
      }
      letFirstReturn.resolve();
      await secondStarted.promise;
      expect(log).toEqual(["start 1", "end 1", "start 2"]);
    },
  );
});
