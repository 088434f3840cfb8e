import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { errorReasonOf } from "../../src/rpc/status.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * The bound on unary calls the process serves at once (rpc/unary-calls.ts,
 * --max-unary-calls): past the calls served and those waiting, a call is
 * refused RESOURCE_EXHAUSTED (UNARY_CALLS_OVER_LIMIT) before any work;
 * worker streams never pass through it.
 */
describe.runIf(runsDriverNeutralTests())("the bound on unary calls", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer({ overrides: { limits: { maxUnaryCalls: 2, maxUnaryWaiting: 3 } } });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("serves as many calls as it may, queues a few, and refuses the rest saying why", async () => {
    const actions = t.client(ActionService);
    const worker = await connectWorker(t.address, { workerId: "w-busy", cluster: "busy", capacity: 1 });
    const calls = Promise.all(
      Array.from({ length: 40 }, () =>
        actions.listActions({ cluster: "busy" }).then(
          () => "OK",
          (error: unknown) => `${(error as { code?: number }).code}:${errorReasonOf(error)}`,
        ),
      ),
    );
    // A worker's stream is not a unary call: its hello and heartbeats never wait for a turn.
    const late = await connectWorker(t.address, { workerId: "w-late", cluster: "busy", capacity: 1 });
    await expect(worker.heartbeat(1)).resolves.toBeDefined();
    await expect(late.heartbeat(1)).resolves.toBeDefined();
    const outcomes = await calls;
    worker.goodbye();
    late.goodbye();
    const ok = outcomes.filter((o) => o === "OK").length;
    const refused = outcomes.filter((o) => o === "8:UNARY_CALLS_OVER_LIMIT").length;
    expect(ok + refused).toBe(40);
    // At least the first call and the three that waited.
    expect(ok).toBeGreaterThanOrEqual(4);
    expect(refused).toBeGreaterThan(0);
    const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
    expect(text).toContain(`leasehold_unary_calls_refused_total ${refused}`);
    expect(t.logs.some((l) => String(l.msg).startsWith("unary call refused"))).toBe(true);
    // Once they have ended, calls are served again.
    await expect(actions.listActions({ cluster: "busy" })).resolves.toBeDefined();
  });
});

describe.runIf(runsDriverNeutralTests())("the default bound on unary calls", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer();
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  /** `count` ListActions calls at once, on connections of 150 calls (a connection takes 256 streams). */
  async function burst(count: number): Promise<string[]> {
    const clients = Array.from({ length: Math.ceil(count / 150) }, () =>
      createClient(ActionService, t.address, undefined, { "grpc.use_local_subchannel_pool": 1 }),
    );
    try {
      return await Promise.all(
        Array.from({ length: count }, (_, i) =>
          (clients[i % clients.length] as (typeof clients)[number]).listActions({ cluster: "idle" }).then(
            () => "OK",
            (error: unknown) => `${errorReasonOf(error)}: ${(error as Error).message}`,
          ),
        ),
      );
    } finally {
      for (const c of clients) c.close();
    }
  }

  it("refuses none of 32 + 224 calls sent at once to an idle server", async () => {
    const outcomes = await burst(256);
    expect(outcomes.filter((o) => o !== "OK")).toEqual([]);
  });

  it("refuses calls past 32 + 224 saying how many it holds", async () => {
    const refusals = (await burst(300)).filter((o) => o !== "OK");
    expect(refusals.length).toBeGreaterThan(0);
    expect(refusals[0]).toMatch(
      /^UNARY_CALLS_OVER_LIMIT: .*this caller \(address 127\.0\.0\.1\) has \d+ calls waiting their turn, .*the server is serving \d+ calls and \d+ wait, 256 in all/,
    );
  });
});
