import { afterEach, describe, expect, it } from "vitest";
import { createAgent, type JsonObject } from "../../src/agent/index.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { agentEvents, type Finished, finishedOf } from "../helpers/agent-events.js";
import { cuttableProxy } from "../helpers/cuttable-proxy.js";
import { deferred } from "../helpers/deferred.js";
import { intercepting } from "../helpers/intercept-db.js";
import { startTestServer } from "../helpers/server.js";

describe("an SDK handler's progress reports", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("are coalesced per action: thousands of calls send the first, then only the latest, and the stream stays up", async () => {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = agentEvents();
    const calls = 10_000;
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "chatty",
      onEvent: events.onEvent,
      handler: async (ctx) => {
        for (let i = 0; i < calls; i++) ctx.progress("counting", { i }, i === 10 ? { from: 10 } : undefined);
        return { counted: calls };
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    await events.until(finishedOf(action?.id ?? ""));
    const got = (await api.getAction({ actionId: action?.id ?? "" })).action;
    expect(got).toMatchObject({ state: ActionState.SUCCEEDED, output: { counted: calls } });
    // The latest call's details won.
    expect(got?.phaseDetails).toEqual({ i: calls - 1 });
    const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    const progress = /^leasehold_reports_total\{kind="progress",result="accepted"\} (\d+)$/m.exec(text);
    // The first call, sent at once, and the one left waiting, sent before the completion.
    expect(Number(progress?.[1])).toBe(2);
    expect(events.seen.filter((e) => e.type === "connected")).toHaveLength(1);
  });

  it("made while the stream is down are kept and sent after the reconnect, before the failure: the next attempt gets the checkpoint", async () => {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "5s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const [host, port] = t.address.split(":") as [string, string];
    const proxy = await cuttableProxy(host, Number(port));
    cleanups.push(() => proxy.close());
    const events = agentEvents();
    const started = deferred();
    const offline = deferred();
    const checkpoints: (JsonObject | undefined)[] = [];
    const agent = createAgent({
      address: `127.0.0.1:${proxy.port}`,
      cluster: "east",
      workerId: "offline",
      initialBackoffMs: 50,
      onEvent: events.onEvent,
      handler: async (ctx) => {
        checkpoints.push(ctx.checkpoint);
        if (ctx.attempt > 1) return { resumedFrom: ctx.checkpoint ?? null };
        ctx.progress("starting", {}, { step: 1 });
        started.resolve();
        await offline.promise;
        // Reported while the agent is not connected, then the attempt fails (to be retried).
        ctx.progress("halfway", { percent: 50 }, { step: 2 });
        throw new Error("upstream went away");
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
    const api = t.client(ActionService);
    const { action } = await api.submitAction({
      cluster: "east",
      retryPolicy: { maxAttempts: 2, initialBackoff: { seconds: 0n, nanos: 1_000_000 } },
    });
    await started.promise;
    proxy.cut();
    await events.until((e) => e.type === "disconnected");
    offline.resolve();
    proxy.restore();
    await events.until((e): e is Finished => e.type === "finished" && e.epoch === 2);
    const got = (await api.getAction({ actionId: action?.id ?? "" })).action;
    expect(got).toMatchObject({ state: ActionState.SUCCEEDED, output: { resumedFrom: { step: 2 } } });
    expect(checkpoints).toEqual([undefined, { step: 2 }]);
  });

  it("answered UNAVAILABLE after the completion went out, is never sent after it: no fenced progress of an action that ended", {
    timeout: 60_000,
  }, async () => {
    // The progress statement (record-progress.ts) and the completion's (finish-actions.ts).
    const PROGRESS = /update actions a set\s+phase = case/;
    const COMPLETION = /f_input as \(/;
    const progressSeen = deferred();
    const failProgress = deferred();
    const completionSeen = deferred();
    const applyCompletion = deferred();
    let progressStatements = 0;
    const t = await startTestServer({
      config: { heartbeatInterval: "250ms", gracePeriod: "10s" },
      overrides: {
        wrapDb: intercepting(async (text, execute) => {
          if (PROGRESS.test(text)) {
            progressStatements += 1;
            if (progressStatements === 1) {
              // The first progress waits until the completion is at the server, then fails as a
              // database that went away fails: the server answers it UNAVAILABLE.
              progressSeen.resolve();
              await failProgress.promise;
              throw new Error("Connection terminated unexpectedly");
            }
          }
          if (COMPLETION.test(text)) {
            // Applied only after the agent's resend of an UNAVAILABLE progress would have gone out.
            completionSeen.resolve();
            await applyCompletion.promise;
          }
          return execute();
        }),
      },
    });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = agentEvents();
    /** Waiters for the next heartbeat acks: an ack says the server read what the agent sent before that heartbeat. */
    const ackWaiters = new Set<() => void>();
    const acks = (n: number) =>
      new Promise<void>((resolve) => {
        let left = n;
        const one = () => {
          if (--left > 0) return;
          ackWaiters.delete(one);
          resolve();
        };
        ackWaiters.add(one);
      });
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "resend",
      onEvent: events.onEvent,
      onGuarantee: () => {
        for (const w of [...ackWaiters]) w();
      },
      handler: async (ctx) => {
        ctx.progress("halfway", { percent: 50 });
        await progressSeen.promise;
        // Returns while that progress waits for its answer: the completion goes out after it.
        return { done: true };
      },
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "east" });
    const actionId = action?.id ?? "";
    await progressSeen.promise;
    // Acks of heartbeats sent after the completion: the server has read it (it waits behind the progress).
    await acks(3);
    failProgress.resolve();
    await completionSeen.promise;
    // Well past the agent's half-second resend of the progress answered UNAVAILABLE.
    await acks(6);
    applyCompletion.resolve();
    const finished = await events.until(finishedOf(actionId));
    expect(finished).toMatchObject({ outcome: "succeeded", accepted: true });
    // The goodbye is confirmed once every report the agent sent is answered: a late progress too.
    expect(await agent.close({ timeoutMs: 1000 })).toMatchObject({ goodbye: true });
    // The progress answered UNAVAILABLE was not sent again after the completion: the server
    // applied no second one, and fenced none (a fenced progress reads as split-brain).
    const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    expect(text).not.toMatch(/^leasehold_reports_total\{kind="progress",result="fenced"\} [1-9]/m);
    expect(progressStatements).toBe(1);
    const got = (await api.getAction({ actionId })).action;
    expect(got).toMatchObject({ state: ActionState.SUCCEEDED, output: { done: true } });
  });
});
