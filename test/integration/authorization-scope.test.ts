import type * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RoleBinding } from "../../src/auth/access.js";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { type Resource, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { as, policyAccess } from "../helpers/principals.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus, statusDetails } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

const binding = (role: RoleBinding["role"], clusters: string[], workerIds = "*"): RoleBinding => ({
  role,
  clusters,
  workerIds,
});

/** Who each test principal is; the server's test seam maps `x-test-principal` to these. */
const POLICY: Record<string, RoleBinding[]> = {
  alice: [binding("submitter", ["cluster-a"])],
  bob: [binding("submitter", ["cluster-a"])],
  carol: [binding("submitter", ["cluster-b"])],
  ops: [binding("operator", ["cluster-a"])],
  reader: [binding("reader", ["cluster-a"])],
  "agent-p": [binding("agent", ["cluster-a"], "wa-*")],
  "agent-q": [binding("agent", ["cluster-a"], "wa-*")],
  admin: [binding("operator", ["*"])],
  "agent-c": [binding("agent", ["cluster-c"])],
  "agent-b": [binding("agent", ["cluster-b"], "wb-*")],
  "ops-b": [binding("operator", ["cluster-b"])],
  "ops-c": [binding("operator", ["cluster-c"])],
  // Globs: `_` and `%` are no wildcards of theirs, as they are of SQL's LIKE.
  "reader-glob": [binding("reader", ["*-a"])],
  "reader-like": [binding("reader", ["cluster%*", "cluster_?"])],
};

describe("authorization by cluster, owner and session", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer({
      overrides: {
        accessOf: policyAccess(POLICY),
      },
    });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("keeps a submitter of cluster A out of cluster B: submit is PERMISSION_DENIED naming the right and cluster; get, cancel, watch and explain answer NOT_FOUND as for an unknown id", async () => {
    const actions = t.client(ActionService);
    const denied = await expectStatus(
      actions.submitAction({ cluster: "cluster-b" }, as("alice")),
      Code.PermissionDenied,
      /"alice" lacks the right action\.submit in cluster "cluster-b"/,
    );
    expect(denied.reason).toBe("PERMISSION_DENIED");

    const { action } = await actions.submitAction({ cluster: "cluster-b" }, as("admin"));
    const id = action?.id ?? "";
    // Another cluster's action and an id that never was look alike: ids are no oracle.
    const unknown = "00000000-0000-4000-8000-000000000000";
    for (const actionId of [id, unknown]) {
      const notFound = new RegExp(`^action "${actionId}" not found$`);
      const gone = await expectStatus(actions.getAction({ actionId }, as("alice")), Code.NotFound, notFound);
      expect(gone.reason).toBe("ACTION_NOT_FOUND");
      await expectStatus(actions.cancelAction({ actionId }, as("alice")), Code.NotFound, notFound);
      await expectStatus(actions.explainAction({ actionId }, as("alice")), Code.NotFound, notFound);
      const watch = async () => {
        for await (const _ of actions.watchAction({ actionId }, as("alice"))) return;
      };
      await expectStatus(watch, Code.NotFound, notFound);
    }
  });

  it("cancels in bulk only what the caller may cancel: a submitter's own actions, an operator's anyone's", async () => {
    const actions = t.client(ActionService);
    const submit = async (who: string) =>
      (await actions.submitAction({ cluster: "cluster-a", runId: "bulk-owners" }, as(who))).action?.id ?? "";
    const alices = [await submit("alice"), await submit("alice")];
    const bobs = await submit("bob");
    // bob names alice's actions and his own: only his is matched; alice's are left as they were.
    const byBob = await actions.cancelActions(
      { cluster: "cluster-a", actionIds: [...alices, bobs], reason: "mine" },
      as("bob"),
    );
    expect(byBob).toMatchObject({ cancelledIds: [bobs], cancelRequestedIds: [], more: false });
    for (const id of alices)
      expect((await actions.getAction({ actionId: id }, as("alice"))).action?.state).toBe(ActionState.QUEUED);
    // Nor does his run-wide cancel reach them; an operator's does.
    expect(
      (await actions.cancelActions({ cluster: "cluster-a", runId: "bulk-owners" }, as("bob"))).cancelledIds,
    ).toEqual([]);
    expect(
      (await actions.cancelActions({ cluster: "cluster-a", runId: "bulk-owners" }, as("ops"))).cancelledIds,
    ).toEqual(alices);
    // Another cluster's actions are out of reach, as they are one by one.
    await expectStatus(
      actions.cancelActions({ cluster: "cluster-b", all: true }, as("alice")),
      Code.PermissionDenied,
      /"alice" lacks the right action\.cancel\.own in cluster "cluster-b"/,
    );
  });

  it("lets a submitter cancel only its own actions, and an operator anyone's; events name the actor", async () => {
    const actions = t.client(ActionService);
    const { action } = await actions.submitAction({ cluster: "cluster-a" }, as("alice"));
    const id = action?.id ?? "";
    expect(action?.createdBy).toBe("alice");

    await expectStatus(
      actions.cancelAction({ actionId: id }, as("bob")),
      Code.PermissionDenied,
      /"bob" lacks the right action\.cancel\.any in cluster "cluster-a".*created by "alice"/,
    );
    const cancelled = await actions.cancelAction({ actionId: id, reason: "ops says no" }, as("ops"));
    expect(cancelled.action?.state).toBe(ActionState.CANCELLED);

    const { events } = await t
      .client(EventService)
      .listEvents({ actionId: id, cluster: "cluster-a" }, as("reader"));
    expect(events.map((e) => [e.kind, e.actor])).toEqual([
      [EventKind.ACTION_SUBMITTED, "alice"],
      [EventKind.ACTION_CANCELLED, "ops"],
    ]);

    // The owner itself may cancel its own.
    const own = await actions.submitAction({ cluster: "cluster-a" }, as("bob"));
    const mine = await actions.cancelAction({ actionId: own.action?.id ?? "" }, as("bob"));
    expect(mine.action?.state).toBe(ActionState.CANCELLED);
  });

  it("makes a reader scoped to some clusters name one when it lists (events aside: see below)", async () => {
    const actions = t.client(ActionService);
    const clusters = t.client(ClusterService);
    await expectStatus(
      actions.listActions({}, as("reader")),
      Code.PermissionDenied,
      /action\.read in every cluster; name one of its clusters/,
    );
    await expectStatus(
      actions.listActions({ cluster: "cluster-b" }, as("reader")),
      Code.PermissionDenied,
      /action\.read in cluster "cluster-b"/,
    );
    const listed = await actions.listActions({ cluster: "cluster-a" }, as("reader"));
    expect(listed.actions.every((a) => a.cluster === "cluster-a")).toBe(true);
    await expectStatus(
      clusters.listWorkers({}, as("reader")),
      Code.PermissionDenied,
      /worker\.read in every/,
    );
    // An operator of every cluster lists without a filter; ListClusters shows a scoped reader its own only.
    expect((await actions.listActions({}, as("admin"))).actions.length).toBeGreaterThan(0);
    const seen = (await clusters.listClusters({}, as("reader"))).clusters.map((c) => c.name);
    expect(seen).toContain("cluster-a");
    expect(seen).not.toContain("cluster-b");
  });

  it("shows a reader scoped to some clusters the events of those clusters when it names none; another cluster's action has none, as an unknown id", async () => {
    const actions = t.client(ActionService);
    const events = t.client(EventService);
    const { action: mine } = await actions.submitAction({ cluster: "cluster-a" }, as("alice"));
    const { action: theirs } = await actions.submitAction({ cluster: "cluster-b" }, as("admin"));
    const all = (await events.listEvents({ newestFirst: true, pageSize: 1000 }, as("reader"))).events;
    expect(all.length).toBeGreaterThan(0);
    expect(all.every((e) => e.cluster === "cluster-a")).toBe(true);
    expect(all.map((e) => e.actionId)).toContain(mine?.id);
    // Its own action's history by id alone, as GetAction finds it.
    const own = await events.listEvents({ actionId: mine?.id ?? "" }, as("reader"));
    expect(own.events.map((e) => EventKind[e.kind])).toEqual(["ACTION_SUBMITTED"]);
    for (const actionId of [theirs?.id ?? "", "00000000-0000-4000-8000-000000000000"])
      expect((await events.listEvents({ actionId }, as("reader"))).events).toEqual([]);
    await expectStatus(
      events.listEvents({ cluster: "cluster-b" }, as("reader")),
      Code.PermissionDenied,
      /event\.read in cluster "cluster-b"/,
    );
    const globbed = (await events.listEvents({ newestFirst: true, pageSize: 1000 }, as("reader-glob")))
      .events;
    expect(globbed.map((e) => e.actionId)).toContain(mine?.id);
    expect(globbed.every((e) => e.cluster === "cluster-a")).toBe(true);
    expect((await events.listEvents({}, as("reader-like"))).events).toEqual([]);

    // A watch sends the same: the next event of cluster-a, never one of cluster-b.
    const abort = new AbortController();
    const watch = events.watchEvents(
      { afterSequence: all[0]?.sequence ?? 0n },
      { ...as("reader"), signal: abort.signal },
    );
    await actions.submitAction({ cluster: "cluster-b" }, as("admin"));
    const { action: next } = await actions.submitAction({ cluster: "cluster-a" }, as("alice"));
    for await (const m of watch) {
      expect(m.event).toMatchObject({ cluster: "cluster-a", actionId: next?.id });
      break;
    }
    abort.abort();
    // Nothing left queued for the workers of the tests below.
    const ids = (...a: (typeof mine)[]) => a.map((x) => x?.id ?? "");
    await actions.cancelActions({ cluster: "cluster-a", actionIds: ids(mine, next) }, as("admin"));
    await actions.cancelActions({ cluster: "cluster-b", actionIds: ids(theirs) }, as("admin"));
  });

  it("keeps an agent to its clusters and worker-id pattern", async () => {
    await expect(
      connectWorker(t.address, { workerId: "wa-x", cluster: "cluster-b", capacity: 1 }, as("agent-p")),
    ).rejects.toMatchObject({
      code: Code.PermissionDenied,
      message: expect.stringMatching(/worker\.connect for worker "wa-x" in cluster "cluster-b"/),
    });
    await expect(
      connectWorker(t.address, { workerId: "other-1", cluster: "cluster-a", capacity: 1 }, as("agent-p")),
    ).rejects.toMatchObject({
      code: Code.PermissionDenied,
      message: expect.stringMatching(/worker "other-1" in cluster "cluster-a"/),
    });
    // A submitter is not an agent at all.
    await expect(
      connectWorker(t.address, { workerId: "wa-s", cluster: "cluster-a", capacity: 1 }, as("alice")),
    ).rejects.toMatchObject({ code: Code.PermissionDenied });
  });

  it("refuses a hello from another principal for a worker's session and leaves the session, lease, epoch and stream untouched", async () => {
    const hello = { workerId: "wa-1", cluster: "cluster-a", capacity: 1 };
    const real = await connectWorker(t.address, hello, as("agent-p"));
    const { action } = await t.client(ActionService).submitAction({ cluster: "cluster-a" }, as("alice"));
    const id = action?.id ?? "";
    const grant = await real.next("grant", (g) => g.actionId === id);
    await real.heartbeat(1, [{ actionId: id, epoch: grant.epoch }]);
    const clusters = t.client(ClusterService);
    const before = (await clusters.getWorker({ workerId: "wa-1" }, as("ops"))).worker;
    // To carol, who may not read cluster-a, it looks like a worker that never was.
    await expectStatus(
      clusters.getWorker({ workerId: "wa-1" }, as("carol")),
      Code.NotFound,
      /^worker "wa-1" not found$/,
    );

    // Same worker id, cluster and held leases, another principal with the same rights.
    const intruder = connectWorker(
      t.address,
      { ...hello, heldLeases: [{ actionId: id, epoch: grant.epoch }] },
      as("agent-q"),
    );
    const refused = await intruder.then(
      () => undefined,
      (error: { code: number; message: string; metadata: grpc.Metadata }) => error,
    );
    expect(refused).toMatchObject({
      code: Code.PermissionDenied,
      message: expect.stringMatching(/opened by another principal/),
    });
    expect(statusDetails(refused?.metadata).reason).toBe("SESSION_OWNED_BY_OTHER");

    // The real worker's stream still works, with the same session, lease and epoch.
    await real.heartbeat(2, [{ actionId: id, epoch: grant.epoch }]);
    expect(real.received.some((m) => m.message.case === "revoke")).toBe(false);
    const after = (await clusters.getWorker({ workerId: "wa-1" }, as("ops"))).worker;
    expect(after?.session?.sessionId).toBe(before?.session?.sessionId);
    expect(after?.state).toBe(before?.state);
    expect(after?.heldLeases).toEqual([{ ...before?.heldLeases[0] }]);
    const current = (await t.client(ActionService).getAction({ actionId: id }, as("ops"))).action;
    expect(current).toMatchObject({ state: ActionState.LEASED, epoch: grant.epoch });

    const result = await real.complete(grant, { output: { ok: true } });
    expect(result.accepted).toBe(true);
    const events = await t
      .client(EventService)
      .listEvents({ workerId: "wa-1", cluster: "cluster-a" }, as("reader"));
    const kinds = events.events.map((e) => [EventKind[e.kind], e.actor]);
    expect(kinds).toContainEqual(["SESSION_STARTED", "agent-p"]);
    expect(kinds).toContainEqual(["ACTION_SUCCEEDED", "agent-p"]);
    // Nothing of the refused hello was recorded.
    expect(events.events.some((e) => e.actor === "agent-q")).toBe(false);
    expect(kinds).not.toContainEqual(["SESSION_TAKEN_OVER", "agent-p"]);

    // The owning principal still takes its session over.
    const again = await connectWorker(t.address, hello, as("agent-p"));
    expect(again.welcome.sessionResumed).toBe(true);
    expect(again.welcome.sessionId).toBe(before?.session?.sessionId);
    expect((await real.ended).code).toBe(Code.Aborted);
    again.goodbye();
    await again.ended;
  });

  it("lets an operator of a worker's cluster forget it once its session ended, freeing its id for any cluster", async () => {
    const clusters = t.client(ClusterService);
    // agent-c's pattern is the default `*`: it takes the id team b names its workers with.
    const squatter = await connectWorker(
      t.address,
      { workerId: "wb-8", cluster: "cluster-c", capacity: 1 },
      as("agent-c"),
    );
    const hello = { workerId: "wb-8", cluster: "cluster-b", capacity: 1 };
    await expect(connectWorker(t.address, hello, as("agent-b"))).rejects.toMatchObject({
      code: Code.PermissionDenied,
      message: expect.stringMatching(
        /worker "wb-8" in cluster "cluster-c", where that worker is registered.*an operator of "cluster-c" frees the id at once with ForgetWorker/,
      ),
    });

    // Not while its session lives, connected or (stream dropped) in grace.
    const live = await expectStatus(
      clusters.forgetWorker({ workerId: "wb-8" }, as("ops-c")),
      Code.FailedPrecondition,
      /worker wb-8 has a live session .*stop its agent/,
    );
    expect(live.reason).toBe("WORKER_SESSION_LIVE");
    squatter.drop();
    await squatter.ended;
    await expectStatus(
      clusters.forgetWorker({ workerId: "wb-8" }, as("ops-c")),
      Code.FailedPrecondition,
      /has a live session/,
    );
    const back = await connectWorker(
      t.address,
      { workerId: "wb-8", cluster: "cluster-c", capacity: 1 },
      as("agent-c"),
    );
    back.goodbye();
    await back.ended;

    // Team b's operator cannot see the worker of cluster c, so to it the id is unknown.
    await expectStatus(
      clusters.forgetWorker({ workerId: "wb-8" }, as("ops-b")),
      Code.NotFound,
      /^worker "wb-8" not found$/,
    );
    const forgotten = await clusters.forgetWorker({ workerId: "wb-8", reason: "team b's id" }, as("ops-c"));
    expect(forgotten.worker).toMatchObject({ workerId: "wb-8", cluster: "cluster-c" });
    await expectStatus(clusters.getWorker({ workerId: "wb-8" }, as("admin")), Code.NotFound, /not found/);
    const { events } = await t
      .client(EventService)
      .listEvents({ workerId: "wb-8", kind: EventKind.WORKER_FORGOTTEN }, as("admin"));
    expect(events.map((e) => [e.cluster, e.actor, e.message])).toEqual([
      ["cluster-c", "ops-c", "worker wb-8 forgotten (its id is free): team b's id"],
    ]);

    // The id is free: team b's agent registers it in its own cluster.
    const own = await connectWorker(t.address, hello, as("agent-b"));
    expect((await clusters.getWorker({ workerId: "wb-8" }, as("ops-b"))).worker?.cluster).toBe("cluster-b");
    own.goodbye();
    await own.ended;
    await expectStatus(clusters.forgetWorker({ workerId: "wb-8" }, as("ops-c")), Code.NotFound, /not found/);
  });

  it("checks scope leases by runtime and creator, and records who changed them", async () => {
    const leases = t.client(LeaseService);
    const resources = t.client(ResourceService);
    await expectStatus(
      leases.createLease({ runtime: "cluster-b" }, as("alice")),
      Code.PermissionDenied,
      /lease\.create in cluster "cluster-b"/,
    );
    const { lease } = await leases.createLease({ runtime: "cluster-a" }, as("alice"));
    const leaseId = lease?.id ?? "";
    expect(lease?.createdBy).toBe("alice");
    // To carol, who may not read cluster-a, it looks like a lease that never was.
    const leaseNotFound = new RegExp(`^lease "${leaseId}" not found$`);
    await expectStatus(leases.getLease({ leaseId }, as("carol")), Code.NotFound, leaseNotFound);
    await expectStatus(leases.commitLease({ leaseId }, as("carol")), Code.NotFound, leaseNotFound);
    await expectStatus(
      resources.createObject({ leaseId, kind: "note" }, as("bob")),
      Code.PermissionDenied,
      /lease\.use\.any in cluster "cluster-a"/,
    );
    const { resource } = await resources.createObject({ leaseId, kind: "note" }, as("alice"));
    const noteId = resource?.id ?? "";
    expect((await resources.getResource({ resourceId: noteId }, as("reader"))).resource?.id).toBe(noteId);
    const { resource: file } = await resources.createFile(
      { leaseId, name: "log.txt", content: new TextEncoder().encode("hi") },
      as("alice"),
    );
    await expectStatus(
      leases.setResult({ leaseId, result: { passed: true } }, as("bob")),
      Code.PermissionDenied,
      /lease\.use\.any in cluster "cluster-a"/,
    );
    await leases.setResult({ leaseId, result: { passed: true } }, as("alice"));
    await expectStatus(
      leases.commitLease({ leaseId }, as("bob")),
      Code.PermissionDenied,
      /lease\.use\.any in cluster "cluster-a"/,
    );
    await leases.promoteResource({ leaseId, kind: "note", resourceId: noteId }, as("alice"));
    await leases.commitLease({ leaseId }, as("alice"));
    // Committed, the note is workspace-owned but still in cluster-a: its creator deletes it.
    await resources.deleteResource({ resourceId: noteId }, as("alice"));
    await expectStatus(
      leases.deleteLease({ leaseId }, as("alice")),
      Code.PermissionDenied,
      // alice holds lease.delete nowhere: the adapter refuses before the handler looks.
      /lease\.delete in any cluster/,
    );
    await leases.deleteLease({ leaseId }, as("ops"));
    // Two more closed leases go at once with DeleteLeases: one event each.
    const others: string[] = [];
    for (const _ of [1, 2]) {
      const other = (await leases.createLease({ runtime: "cluster-a" }, as("alice"))).lease?.id ?? "";
      await leases.rollbackLease({ leaseId: other }, as("alice"));
      others.push(other);
    }
    expect((await leases.deleteLeases({ runtime: "cluster-a" }, as("ops"))).deleted).toBe(2);

    // Scope lease and resource events carry the runtime as their cluster: a scoped reader finds them by it.
    const { events } = await t
      .client(EventService)
      .listEvents({ cluster: "cluster-a", pageSize: 1000 }, as("reader"));
    const ofLease = events.filter((e) => e.leaseId === leaseId);
    expect(ofLease.map((e) => [EventKind[e.kind], e.actor])).toEqual([
      ["SCOPE_LEASE_CREATED", "alice"],
      ["RESOURCE_CREATED", "alice"],
      ["RESOURCE_CREATED", "alice"],
      ["SCOPE_LEASE_RESULT_SET", "alice"],
      ["RESOURCE_PROMOTED", "alice"],
      ["SCOPE_LEASE_COMMITTED", "alice"],
      ["RESOURCE_DELETED", "alice"],
      ["SCOPE_LEASE_DELETED", "ops"],
    ]);
    expect(ofLease.filter((e) => e.kind === EventKind.RESOURCE_CREATED).map((e) => e.details)).toEqual([
      { resource_id: noteId, kind: "note" },
      { resource_id: file?.id, kind: "file", name: "log.txt" },
    ]);
    expect(ofLease.find((e) => e.kind === EventKind.RESOURCE_DELETED)?.details).toEqual({
      resource_id: noteId,
      kind: "note",
    });
    const bulk = events.filter((e) => e.kind === EventKind.SCOPE_LEASE_DELETED && others.includes(e.leaseId));
    expect(bulk.map((e) => [e.leaseId, e.actor, e.details])).toEqual(
      others.map((id) => [id, "ops", { label: "", state: "ROLLED_BACK" }]),
    );
  });

  it("keeps what a commit kept in its lease's cluster after the lease's record is deleted", async () => {
    const leases = t.client(LeaseService);
    const resources = t.client(ResourceService);
    const leaseId = (await leases.createLease({ runtime: "cluster-a" }, as("alice"))).lease?.id ?? "";
    const content = new TextEncoder().encode("kept");
    const fileId =
      (await resources.createFile({ leaseId, name: "kept.txt", content }, as("alice"))).resource?.id ?? "";
    const noteId = (await resources.createObject({ leaseId, kind: "note" }, as("alice"))).resource?.id ?? "";
    await leases.commitLease({ leaseId }, as("alice"));
    await leases.deleteLease({ leaseId }, as("ops"));

    const download = async (principal: string) => {
      const chunks: Uint8Array[] = [];
      for await (const m of resources.downloadFile({ resourceId: fileId }, as(principal)))
        chunks.push(m.chunk);
      return Buffer.concat(chunks).toString();
    };
    // Rights in cluster-a alone suffice, as while the record existed.
    for (const resourceId of [fileId, noteId])
      expect((await resources.getResource({ resourceId }, as("reader"))).resource?.id).toBe(resourceId);
    expect(await download("reader")).toBe("kept");
    // Rights elsewhere do not: the resources are cluster-a's, not every cluster's.
    // (and to carol, who may not read them, they look like ids that never were).
    for (const resourceId of [fileId, noteId]) {
      const notFound = new RegExp(`^resource "${resourceId}" not found$`);
      await expectStatus(resources.getResource({ resourceId }, as("carol")), Code.NotFound, notFound);
      await expectStatus(resources.deleteResource({ resourceId }, as("carol")), Code.NotFound, notFound);
    }
    await expectStatus(download("carol"), Code.NotFound, new RegExp(`^resource "${fileId}" not found$`));
    // Another submitter of cluster-a may use only its own leases' resources; the lease's creator
    // still may, as while the record existed.
    await expectStatus(
      resources.deleteResource({ resourceId: noteId }, as("bob")),
      Code.PermissionDenied,
      /"bob" lacks the right lease\.use\.any in cluster "cluster-a": it may change only what it created, and this was created by "alice"/,
    );
    await resources.deleteResource({ resourceId: noteId }, as("alice"));
    await resources.deleteResource({ resourceId: fileId }, as("ops"));
    await expectStatus(
      resources.getResource({ resourceId: fileId }, as("reader")),
      Code.NotFound,
      /not found/,
    );
  });

  it("lists a lease's resources by its cluster, NOT_FOUND for a lease that never was, and says why a list without one needs every cluster", async () => {
    const leases = t.client(LeaseService);
    const resources = t.client(ResourceService);
    // No such lease: NOT_FOUND for everyone, whatever their clusters.
    for (const principal of ["reader", "admin"])
      await expectStatus(
        resources.listResources({ leaseId: "no-such-lease" }, as(principal)),
        Code.NotFound,
        /lease "no-such-lease" not found/,
      );
    // Its record deleted, the lease's kept resources are listed in its cluster, from theirs.
    const leaseId = (await leases.createLease({ runtime: "cluster-a" }, as("alice"))).lease?.id ?? "";
    const noteId = (await resources.createObject({ leaseId, kind: "note" }, as("alice"))).resource?.id ?? "";
    await leases.commitLease({ leaseId }, as("alice"));
    await leases.deleteLease({ leaseId }, as("ops"));
    const listed = await resources.listResources({ leaseId }, as("reader"));
    expect(listed.resources.map((r) => r.id)).toEqual([noteId]);
    // To carol, who may not read cluster-a, it is a lease that never was.
    await expectStatus(
      resources.listResources({ leaseId }, as("carol")),
      Code.NotFound,
      new RegExp(`^lease "${leaseId}" not found$`),
    );
    // Nor does a deployment's input tell her whether a file of cluster-a exists.
    const fileId =
      (
        await resources.createFile(
          {
            leaseId: (await leases.createLease({ runtime: "cluster-a" }, as("alice"))).lease?.id ?? "",
            name: "in.txt",
            content: new Uint8Array([1]),
          },
          as("alice"),
        )
      ).resource?.id ?? "";
    const carolsLease = (await leases.createLease({ runtime: "cluster-b" }, as("carol"))).lease?.id ?? "";
    for (const id of [fileId, "00000000-0000-4000-8000-000000000000"])
      await expectStatus(
        resources.createDeployment(
          {
            leaseId: carolsLease,
            spec: {
              containers: [{ name: "c", command: { argv: ["true"] } }],
              inputs: [{ fileId: id, path: "in.txt" }],
            },
          },
          as("carol"),
        ),
        Code.InvalidArgument,
        new RegExp(`spec\\.inputs\\[0\\]\\.file_id: no file resource "${id}"`),
      );
    // A resource of no cluster (made outside any lease) is seen only by who reads every cluster.
    const loose = (await resources.createObject({ kind: "note" }, as("admin"))).resource?.id ?? "";
    expect((await resources.getResource({ resourceId: loose }, as("admin"))).resource?.id).toBe(loose);
    const looseMissing = new RegExp(`^resource "${loose}" not found$`);
    await expectStatus(
      resources.getResource({ resourceId: loose }, as("carol")),
      Code.NotFound,
      looseMissing,
    );
    await expectStatus(
      resources.deleteResource({ resourceId: loose }, as("carol")),
      Code.NotFound,
      looseMissing,
    );
    await expectStatus(
      resources.listResources({}, as("reader")),
      Code.PermissionDenied,
      /"reader" lacks the right resource\.read in every cluster: listing resources without a lease_id lists every cluster's; name a lease_id$/,
    );
  });

  it("lets an agent download the inputs of a deployment its session holds leased, and no other file", async () => {
    const leases = t.client(LeaseService);
    const resources = t.client(ResourceService);
    const leaseId = (await leases.createLease({ runtime: "cluster-a" }, as("alice"))).lease?.id ?? "";
    const upload = async (name: string, text: string) =>
      (await resources.createFile({ leaseId, name, content: new TextEncoder().encode(text) }, as("alice")))
        .resource?.id ?? "";
    const input = await upload("input.txt", "the input");
    const other = await upload("other.txt", "not an input");
    const { resource } = await resources.createDeployment(
      {
        leaseId,
        spec: {
          containers: [{ name: "c", command: { argv: ["true"] } }],
          inputs: [{ fileId: input, path: "in/input.txt" }],
        },
      },
      as("alice"),
    );
    const actionId = resource?.body.case === "deployment" ? resource.body.value.actionId : "";
    expect(actionId).not.toBe("");
    const download = async (principal: string, resourceId: string) => {
      const chunks: Uint8Array[] = [];
      for await (const m of resources.downloadFile({ resourceId }, as(principal))) chunks.push(m.chunk);
      return Buffer.concat(chunks).toString();
    };
    const notAnInput = (principal: string, file: string) =>
      new RegExp(
        `"${principal}" lacks the right file\\.download\\.input for file "${file}": it is not an input of a deployment whose action is leased to a session "${principal}" opened`,
      );

    // Queued, the deployment is nobody's yet.
    const queued = await expectStatus(
      download("agent-p", input),
      Code.PermissionDenied,
      notAnInput("agent-p", input),
    );
    expect(queued.reason).toBe("PERMISSION_DENIED");

    const p = await connectWorker(
      t.address,
      { workerId: "wa-dl-p", cluster: "cluster-a", capacity: 1 },
      as("agent-p"),
    );
    const grant = await p.next("grant", (g) => g.actionId === actionId);
    expect(await download("agent-p", input)).toBe("the input");
    // Not a reader: the lease's other file stays closed to it.
    await expectStatus(download("agent-p", other), Code.PermissionDenied, notAnInput("agent-p", other));

    // Another agent principal of the same cluster, with a live session of its own but not this lease.
    const q = await connectWorker(
      t.address,
      { workerId: "wa-dl-q", cluster: "cluster-a", capacity: 1 },
      as("agent-q"),
    );
    await expectStatus(download("agent-q", input), Code.PermissionDenied, notAnInput("agent-q", input));
    // A reader of the cluster reads either file, as before.
    expect(await download("reader", other)).toBe("not an input");

    // A submitter cannot hand an agent a deployment of its own making that names other files.
    await expectStatus(
      t.client(ActionService).submitAction(
        {
          cluster: "cluster-a",
          payload: {
            deployment: { id: "forged", leaseId, spec: { inputs: [{ fileId: other, path: "x" }] } },
          },
        },
        as("alice"),
      ),
      Code.InvalidArgument,
      /^payload\.deployment: is reserved for deployments of scope leases; create them with ResourceService\.CreateDeployment/,
    );

    // Once the lease is over, so is the agent's access to its input.
    expect((await p.complete(grant, { output: {} })).accepted).toBe(true);
    await expectStatus(download("agent-p", input), Code.PermissionDenied, notAnInput("agent-p", input));

    p.goodbye();
    q.goodbye();
    await Promise.all([p.ended, q.ended]);
    await leases.rollbackLease({ leaseId }, as("alice"));
  });

  it("answers an agent that uploads into a lease outside its clusters as for a lease that never was", async () => {
    const { lease } = await t.client(LeaseService).createLease({ runtime: "cluster-b" }, as("admin"));
    const leaseId = lease?.id ?? "";
    const upload = (id: string) =>
      t
        .client(ResourceService)
        .createFile({ leaseId: id, name: "out.txt", content: new Uint8Array() }, as("agent-p"));
    for (const id of [leaseId, "00000000-0000-4000-8000-000000000000"]) {
      const missing = await expectStatus(upload(id), Code.NotFound, new RegExp(`^lease "${id}" not found$`));
      expect(missing.reason).toBe("LEASE_NOT_FOUND");
    }
  });

  it("lets an agent add a file to a lease only as the output of a run its session holds", async () => {
    const leases = t.client(LeaseService);
    const resources = t.client(ResourceService);
    const leaseId = (await leases.createLease({ runtime: "cluster-a" }, as("alice"))).lease?.id ?? "";
    const file = (principal: string, name: string, outputOf?: { deploymentId: string; epoch: bigint }) =>
      resources.createFile(
        { leaseId, name, content: new TextEncoder().encode(name), ...(outputOf ? { outputOf } : {}) },
        as(principal),
      );

    const nameOf = (r: Resource | undefined) => (r?.body.case === "file" ? r.body.value.name : "");

    // No run named: the agent role alone gives no right to add files to a client's lease.
    const planted = await expectStatus(
      file("agent-q", "run.sh"),
      Code.PermissionDenied,
      /"agent-q" lacks the right resource\.create in cluster "cluster-a": an agent adds files only as the outputs of a run its session holds; send output_of/,
    );
    expect(planted.reason).toBe("PERMISSION_DENIED");
    expect(planted.info).toMatchObject({
      principal: "agent-q",
      right: "resource.create",
      cluster: "cluster-a",
    });

    const { resource } = await resources.createDeployment(
      { leaseId, spec: { containers: [{ name: "c", command: { argv: ["true"] } }] } },
      as("alice"),
    );
    const deploymentId = resource?.id ?? "";
    const actionId = resource?.body.case === "deployment" ? resource.body.value.actionId : "";
    const p = await connectWorker(
      t.address,
      { workerId: "wa-out-p", cluster: "cluster-a", capacity: 1 },
      as("agent-p"),
    );
    const grant = await p.next("grant", (g) => g.actionId === actionId);
    const run = { deploymentId, epoch: grant.epoch };
    // The run's agent saves its outputs; another agent naming that run is not its holder.
    expect(nameOf((await file("agent-p", "out.txt", run)).resource)).toBe("out.txt");
    const notHeld = await expectStatus(
      file("agent-q", "forged.txt", run),
      Code.FailedPrecondition,
      /not saved/,
    );
    expect(notHeld.reason).toBe("RUN_NOT_HELD");
    // Even the holder needs to name the run for each file.
    await expectStatus(file("agent-p", "loose.txt"), Code.PermissionDenied, /send output_of/);
    // The lease's owner adds files as before, without output_of.
    expect(nameOf((await file("alice", "notes.txt")).resource)).toBe("notes.txt");
    const names = (await resources.listResources({ leaseId }, as("alice"))).resources.map(nameOf);
    expect(names.filter((n) => n !== "").sort()).toEqual(["notes.txt", "out.txt"]);

    expect((await p.complete(grant, { output: {} })).accepted).toBe(true);
    p.goodbye();
    await p.ended;
    await leases.rollbackLease({ leaseId }, as("alice"));
  });

  it("records who created and deleted resources outside a lease; a deployment's event carries its runtime", async () => {
    const resources = t.client(ResourceService);
    const events = t.client(EventService);
    // Without a lease an object belongs to no cluster: creating it takes resource.create everywhere.
    await expectStatus(
      resources.createObject({ kind: "note" }, as("alice")),
      Code.PermissionDenied,
      /resource\.create in every cluster: without a lease_id \(or runtime\) the resource would belong to no cluster; create it in a lease$/,
    );
    const note = (await resources.createObject({ kind: "note" }, as("admin"))).resource?.id ?? "";
    const deployment =
      (
        await resources.createDeployment(
          { runtime: "cluster-a", spec: { containers: [{ name: "c", command: { argv: ["true"] } }] } },
          as("alice"),
        )
      ).resource?.id ?? "";
    await resources.deleteResource({ resourceId: note }, as("admin"));
    await resources.deleteResource({ resourceId: deployment }, as("admin"));

    const created = await events.listEvents(
      { kind: EventKind.RESOURCE_CREATED, pageSize: 1000 },
      as("admin"),
    );
    expect(created.events.find((e) => e.details?.resource_id === note)).toMatchObject({
      actor: "admin",
      cluster: "",
      leaseId: "",
    });
    const { events: inA } = await events.listEvents({ cluster: "cluster-a", pageSize: 1000 }, as("reader"));
    const ofDeployment = inA.filter((e) => e.details?.resource_id === deployment);
    expect(ofDeployment.map((e) => [EventKind[e.kind], e.actor])).toEqual([
      ["DEPLOYMENT_CREATED", "alice"],
      ["RESOURCE_DELETED", "admin"],
    ]);
    const deleted = await events.listEvents(
      { kind: EventKind.RESOURCE_DELETED, pageSize: 1000 },
      as("admin"),
    );
    expect(deleted.events.find((e) => e.details?.resource_id === note)).toMatchObject({
      actor: "admin",
      cluster: "",
    });
  });

  it("keeps request ids per principal: the same id gives each principal its own action, and a retry its own one back", async () => {
    const actions = t.client(ActionService);
    const request = { requestId: "shared-rid-1", cluster: "cluster-a", payload: { step: "build" } };
    // carol (cluster-b) uses the id first: it claims nothing for anyone else.
    const carols = await actions.submitAction({ ...request, cluster: "cluster-b" }, as("carol"));
    expect(carols).toMatchObject({ created: true, action: { createdBy: "carol", cluster: "cluster-b" } });
    const alices = await actions.submitAction(request, as("alice"));
    expect(alices).toMatchObject({ created: true, action: { createdBy: "alice", cluster: "cluster-a" } });
    // bob sends the very same request as alice: a new action of his own, not hers.
    const bobs = await actions.submitAction(request, as("bob"));
    expect(bobs).toMatchObject({ created: true, action: { createdBy: "bob", requestId: "shared-rid-1" } });
    const ids = new Set([carols.action?.id, alices.action?.id, bobs.action?.id]);
    expect(ids.size).toBe(3);

    // Each principal's retry finds its own action.
    const retried = await actions.submitAction(request, as("alice"));
    expect({ created: retried.created, id: retried.action?.id }).toEqual({
      created: false,
      id: alices.action?.id,
    });
    expect((await actions.submitAction(request, as("bob"))).action?.id).toBe(bobs.action?.id);
    // bob can cancel the action his submission returned: it is his.
    const cancelled = await actions.cancelAction({ actionId: bobs.action?.id ?? "" }, as("bob"));
    expect(cancelled.action?.state).toBe(ActionState.CANCELLED);

    // Reusing the id for a different request names only the caller's own action.
    const reused = await expectStatus(
      actions.submitAction({ ...request, priority: 5 }, as("alice")),
      Code.AlreadyExists,
      new RegExp(`already used for a different request \\(action ${alices.action?.id}\\)`),
    );
    expect(reused.reason).toBe("REQUEST_ID_REUSED");
    expect(reused.message).not.toContain(carols.action?.id);
    expect(reused.message).not.toContain(bobs.action?.id);
  });

  it("keeps lease request ids per principal: two principals with one id get two leases, neither learns the other's", async () => {
    const leases = t.client(LeaseService);
    const request = { runtime: "cluster-a", label: "nightly", requestId: "shared-lease-rid" };
    const carols = (await leases.createLease({ ...request, runtime: "cluster-b" }, as("carol"))).lease;
    const alices = (await leases.createLease(request, as("alice"))).lease;
    const bobs = (await leases.createLease(request, as("bob"))).lease;
    expect([carols?.createdBy, alices?.createdBy, bobs?.createdBy]).toEqual(["carol", "alice", "bob"]);
    expect(new Set([carols?.id, alices?.id, bobs?.id]).size).toBe(3);

    expect((await leases.createLease(request, as("alice"))).lease?.id).toBe(alices?.id);
    expect((await leases.createLease(request, as("bob"))).lease?.id).toBe(bobs?.id);
    // bob uses the lease he got back: it is his own.
    await leases.rollbackLease({ leaseId: bobs?.id ?? "" }, as("bob"));

    const reused = await expectStatus(
      leases.createLease({ ...request, label: "other" }, as("alice")),
      Code.AlreadyExists,
      new RegExp(`already used for a different lease \\(${alices?.id}\\)`),
    );
    expect(reused.reason).toBe("REQUEST_ID_REUSED");
    expect(reused.message).not.toContain(carols?.id);
    expect(reused.message).not.toContain(bobs?.id);
    await leases.rollbackLease({ leaseId: alices?.id ?? "" }, as("alice"));
    await leases.rollbackLease({ leaseId: carols?.id ?? "" }, as("carol"));
  });

  it("places a deployment created without a lease in its runtime: its scoped creator gets and deletes it there, not one elsewhere", async () => {
    const resources = t.client(ResourceService);
    const spec = { containers: [{ name: "c", command: { argv: ["true"] } }] };
    const inA = (await resources.createDeployment({ runtime: "cluster-a", spec }, as("alice"))).resource;
    const inB = (await resources.createDeployment({ runtime: "cluster-b", spec }, as("carol"))).resource;
    const aId = inA?.id ?? "";
    const bId = inB?.id ?? "";

    expect((await resources.getResource({ resourceId: aId }, as("alice"))).resource?.id).toBe(aId);
    expect((await resources.getResource({ resourceId: aId }, as("reader"))).resource?.id).toBe(aId);
    await expectStatus(
      resources.getResource({ resourceId: bId }, as("alice")),
      Code.NotFound,
      new RegExp(bId),
    );
    await expectStatus(
      resources.deleteResource({ resourceId: bId }, as("alice")),
      Code.NotFound,
      new RegExp(bId),
    );
    // In its runtime, another submitter may not delete what alice created; an operator there may.
    await expectStatus(
      resources.deleteResource({ resourceId: aId }, as("bob")),
      Code.PermissionDenied,
      /"bob" lacks the right lease\.use\.any in cluster "cluster-a".*created by "alice"/,
    );

    await resources.deleteResource({ resourceId: aId }, as("alice"));
    await expectStatus(
      resources.getResource({ resourceId: aId }, as("alice")),
      Code.NotFound,
      new RegExp(aId),
    );
    // carol, scoped to cluster-b, does the same with hers.
    expect((await resources.getResource({ resourceId: bId }, as("carol"))).resource?.id).toBe(bId);
    await resources.deleteResource({ resourceId: bId }, as("carol"));
    const { events } = await t
      .client(EventService)
      .listEvents({ cluster: "cluster-b", kind: EventKind.RESOURCE_DELETED, pageSize: 1000 }, as("admin"));
    expect(events.find((e) => e.details?.resource_id === bId)).toMatchObject({ actor: "carol" });
  });
});
