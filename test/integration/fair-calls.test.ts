import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { errorInfoOf, retryDelayMsOf } from "../../src/rpc/status.js";
import { MAX_RETRY_DELAY_MS, MIN_RETRY_DELAY_MS } from "../../src/rpc/unary-calls.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { startTestServer, type TestServer, waitForLog } from "../helpers/server.js";

/** Calls the server serves at once, and lets wait, in these tests. */
const RUNNING = 2;
const WAITING = 24;

/**
 * Fair turns for unary calls (rpc/unary-calls.ts, rpc/fair-queue.ts): one
 * principal keeping many calls in flight has its own calls refused when the
 * waiting room is full, and another principal's call gets in and is served
 * in the next round, not behind the flood's backlog.
 */
describe.runIf(runsDriverNeutralTests())("fair turns between callers", () => {
  let t: TestServer;
  let dir: string;
  const tokens = new Map<string, string>();
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-fair-"));
    const tokensFile = join(dir, "tokens.yaml");
    for (const team of ["team-a", "team-b"])
      tokens.set(
        team,
        addStaticToken(tokensFile, {
          principal: team,
          bindings: [{ role: "reader", clusters: ["*"], workerIds: "*" }],
        }),
      );
    t = await startTestServer({
      config: { authTokens: tokensFile },
      overrides: { limits: { maxUnaryCalls: RUNNING, maxUnaryWaiting: WAITING } },
    });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const metadataOf = (team: string) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${tokens.get(team)}`);
    return metadata;
  };

  it("serves another principal's call in the next round while one principal floods, and refuses the flood", async () => {
    // Each team on its own connection, as from its own process.
    const own = { "grpc.use_local_subchannel_pool": 1 };
    const flooder = createClient(ActionService, t.address, undefined, own);
    const victim = createClient(ActionService, t.address, undefined, own);
    try {
      // Connected, and its credentials checked, before the flood.
      await victim.listActions({ cluster: "busy" }, { metadata: metadataOf("team-b") });
      const teamA = metadataOf("team-a");
      let flooding = true;
      /** team-a's calls served, in the order their answers came. */
      let floodServed = 0;
      const refusals: unknown[] = [];
      // team-a keeps 48 calls in flight, more than are served and may wait, until told to stop.
      const flood = async () => {
        while (flooding) {
          await flooder.listActions({ cluster: "busy" }, { metadata: teamA }).then(
            () => {
              floodServed += 1;
            },
            (error: unknown) => {
              refusals.push(error);
            },
          );
        }
      };
      const flooders = Array.from({ length: 48 }, flood);
      // The waiting room is full: team-a has been refused.
      const refusedLine = await waitForLog(
        t.logs,
        (l) => typeof l.msg === "string" && l.msg.startsWith("unary call refused"),
      );
      // Logged with whose call it was.
      expect(refusedLine).toMatchObject({
        principal: "team-a",
        method: "leasehold.v1.ActionService/ListActions",
        peer: expect.stringMatching(/^127\.0\.0\.1:\d+$/),
      });
      const servedBefore = floodServed;
      await expect(
        victim.listActions({ cluster: "busy" }, { metadata: metadataOf("team-b") }),
      ).resolves.toBeDefined();
      // team-a's calls answered while team-b's waited and ran: fewer than the calls team-a had
      // waiting when it came (first come first served, team-b's call would have waited for all of
      // them, had it got in at all).
      const servedMeanwhile = floodServed - servedBefore;
      flooding = false;
      await Promise.all(flooders);
      expect(servedMeanwhile).toBeLessThan(WAITING);

      expect(refusals.length).toBeGreaterThan(0);
      const refusal = refusals[0] as grpc.ServiceError;
      expect(refusal.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
      expect(refusal.details).toMatch(/^this caller \(principal "team-a"\) has \d+ calls waiting their turn/);
      expect(errorInfoOf(refusal)).toMatchObject({
        reason: "UNARY_CALLS_OVER_LIMIT",
        metadata: {
          running_limit: String(RUNNING),
          waiting_limit: String(WAITING),
          caller: 'principal "team-a"',
        },
      });
      const delay = retryDelayMsOf(refusal);
      expect(delay).toBeGreaterThanOrEqual(MIN_RETRY_DELAY_MS);
      expect(delay).toBeLessThanOrEqual(MAX_RETRY_DELAY_MS);
    } finally {
      flooder.close();
      victim.close();
    }
  });
});
