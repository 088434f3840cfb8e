import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterHealth, ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import { runCli } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { statusDetails } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const GRACE_MS = 10_000;

/**
 * A worker id belongs to the cluster its record is in: a hello moving it to
 * another cluster needs the right to run it in both (worker.proto, Hello).
 * An agent of one cluster must not end another cluster's sessions, take its
 * worker ids, or lift its partition pause (SPEC rule 10) that way.
 */
describe("moving a worker to another cluster", () => {
  let clock: FakeClock;
  let t: TestServer;
  let dir: string;
  let workers: TestWorker[];
  const tokens = new Map<string, string>();

  const as = (principal: string) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${tokens.get(principal) ?? ""}`);
    return { metadata };
  };
  const worker = async (
    principal: string,
    workerId: string,
    cluster: string,
    held: { actionId: string; epoch: bigint }[] = [],
  ) => {
    const w = await connectWorker(
      t.address,
      { workerId, cluster, capacity: 1, heldLeases: held },
      as(principal),
    );
    workers.push(w);
    return w;
  };
  /** The status a hello is refused with, or undefined if it was welcomed. */
  const refusal = async (principal: string, workerId: string, cluster: string) => {
    try {
      await worker(principal, workerId, cluster);
      return undefined;
    } catch (e) {
      const s = e as { code: number; details: string; metadata: grpc.Metadata };
      return { code: s.code, reason: statusDetails(s.metadata).reason, details: s.details };
    }
  };
  const tick = () => t.server.leases.tick;
  const submit = async (cluster: string) =>
    (await t.client(ActionService).submitAction({ cluster }, as("op"))).action?.id ?? "";
  const action = async (id: string) =>
    (await t.client(ActionService).getAction({ actionId: id }, as("op"))).action;
  const cluster = async (name: string) =>
    (await t.client(ClusterService).listClusters({}, as("op"))).clusters.find((c) => c.name === name);
  const clusterOf = async (workerId: string) =>
    (await t.client(ClusterService).getWorker({ workerId }, as("op"))).worker?.cluster;
  const expired = async () =>
    (await t.client(EventService).listEvents({ kind: EventKind.LEASE_EXPIRED }, as("op"))).events.map(
      (e) => e.actionId,
    );
  const waitForEvent = async (workerId: string, kind: EventKind) => {
    for await (const _ of t.client(EventService).watchEvents({ workerId, kind, afterSequence: 0n }, as("op")))
      return;
  };
  /**
   * Three workers of cluster ca, as `principal`, each holding one lease; the
   * first two lose their streams and pass their deadlines, so ca is
   * partitioned and its expiries paused.
   */
  const partitioned = async (principal: string, ids: [string, string, string]) => {
    const ws = [];
    for (const id of ids) ws.push(await worker(principal, id, "ca"));
    for (const _ of ids) await submit("ca");
    await tick().dispatch();
    const grants = await Promise.all(ws.map((w) => w.next("grant")));
    const [lostA, lostB, alive] = ws as [TestWorker, TestWorker, TestWorker];
    lostA.drop();
    lostB.drop();
    await waitForEvent(ids[0], EventKind.STREAM_LOST);
    await waitForEvent(ids[1], EventKind.STREAM_LOST);
    clock.advance(GRACE_MS + 1000);
    await alive.heartbeat(1);
    await tick().renew();
    await tick().reap();
    expect(await cluster("ca")).toMatchObject({ health: ClusterHealth.PARTITIONED, expiriesPaused: true });
    return { grants, alive };
  };

  beforeEach(async () => {
    clock = createFakeClock();
    workers = [];
    dir = mkdtempSync(join(tmpdir(), "leasehold-moves-"));
    const file = join(dir, "tokens.yaml");
    const add = (principal: string, role: "agent" | "operator", clusters: string[], workerIds = "*") =>
      tokens.set(principal, addStaticToken(file, { principal, bindings: [{ role, clusters, workerIds }] }));
    add("agent-a", "agent", ["ca"], "a-*");
    // The default worker_ids, in cluster cb only: the squatter of the security report.
    add("agent-b", "agent", ["cb"]);
    // Allowed to run any worker in both clusters: a fleet moved from one to the other.
    add("fleet", "agent", ["ca", "cb"]);
    add("op", "operator", ["*"]);
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s", authTokens: file },
      overrides: { clock, timers: false },
    });
  });
  afterEach(async () => {
    for (const w of workers) w.drop();
    await t[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  it("refuses an agent of another cluster, and leaves the partitioned cluster's pause and sessions alone", async () => {
    const { grants, alive } = await partitioned("agent-a", ["a-1", "a-2", "a-3"]);
    const refused = await refusal("agent-b", "a-1", "cb");
    expect(refused).toMatchObject({ code: Code.PermissionDenied, reason: "PERMISSION_DENIED" });
    expect(refused?.details).toMatch(
      /^"agent-b" lacks the right worker\.connect for worker "a-1" in cluster "ca", where that worker is registered/,
    );
    await alive.heartbeat(2);
    await tick().renew();
    await tick().reap();
    // Still paused: nothing expired, a-1 is still ca's, and its lease still at its first epoch.
    expect(await cluster("ca")).toMatchObject({ health: ClusterHealth.PARTITIONED, expiriesPaused: true });
    expect(await expired()).toEqual([]);
    expect(await clusterOf("a-1")).toBe("ca");
    // The CLI's list says why its workers in grace are kept past their deadlines.
    const listed = await runCli([
      "--server",
      t.address,
      "--token",
      tokens.get("op") ?? "",
      "workers",
      "list",
    ]);
    expect(listed.code).toBe(0);
    expect(listed.stdout).toMatch(/^a-1 +ca +IN_GRACE /m);
    expect(listed.stdout).toContain(
      "cluster ca is partitioned: its expiries are paused, so sessions past their deadline are kept " +
        "(leasehold clusters resume-expiries ca reaps them)",
    );
    const [first] = grants;
    if (!first) throw new Error("a grant expected");
    expect(await action(first.actionId)).toMatchObject({ state: ActionState.LEASED, epoch: 1n });
    // a-1's own agent comes back and resumes its lease: nobody locked it out.
    const back = await worker("agent-a", "a-1", "ca", [{ actionId: first.actionId, epoch: first.epoch }]);
    expect(back.welcome).toMatchObject({ sessionResumed: true, resumed: [{ actionId: first.actionId }] });
  });

  it("refuses an agent of another cluster the id of an offline worker, which its own agent then gets back", async () => {
    const gone = await worker("agent-a", "a-9", "ca");
    gone.goodbye();
    await waitForEvent("a-9", EventKind.SESSION_CLOSED);
    expect(await refusal("agent-b", "a-9", "cb")).toMatchObject({
      code: Code.PermissionDenied,
      reason: "PERMISSION_DENIED",
    });
    expect(await clusterOf("a-9")).toBe("ca");
    expect((await worker("agent-a", "a-9", "ca")).welcome.sessionResumed).toBe(false);
  });

  it("moves a worker for a principal allowed in both clusters, ending only its own paused session", async () => {
    const { grants } = await partitioned("fleet", ["f-1", "f-2", "f-3"]);
    // The operator may run workers anywhere, but f-2's paused session is not its own: refused, kept.
    expect(await refusal("op", "f-2", "cb")).toMatchObject({
      code: Code.PermissionDenied,
      reason: "SESSION_OWNED_BY_OTHER",
    });
    expect(await clusterOf("f-2")).toBe("ca");
    expect(await expired()).toEqual([]);
    // The fleet's own f-1 comes back in cb: its old session ends there, as documented.
    const moved = await worker("fleet", "f-1", "cb");
    expect(moved.welcome.sessionResumed).toBe(false);
    expect(await clusterOf("f-1")).toBe("cb");
    expect(await expired()).toEqual([grants[0]?.actionId]);
  });
});
