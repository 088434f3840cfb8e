import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RoleBinding } from "../../src/auth/access.js";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { Ownership, type Resource, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { as, policyAccess } from "../helpers/principals.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";

const submitter = (clusters: string[]): RoleBinding[] => [{ role: "submitter", clusters, workerIds: "*" }];
/** Two principals with the same rights: request ids are each one's own. */
const POLICY: Record<string, RoleBinding[]> = { alice: submitter(["*"]), bob: submitter(["*"]) };

const fileOf = (r: Resource | undefined) => (r?.body.case === "file" ? r.body.value : undefined);
const actionOf = (r: Resource | undefined) =>
  r?.body.case === "deployment" ? r.body.value.actionId : undefined;

/**
 * CreateFile, CreateObject and CreateDeployment with a request_id: a retry after a lost answer
 * gets the resource the first call made, never a second one (a second deployment would be a
 * second running copy).
 */
describe("request ids of resource creates", () => {
  let t: TestServer;
  const leases = () => t.client(LeaseService);
  const resources = () => t.client(ResourceService);
  const openLease = async (who = "alice") =>
    (await leases().createLease({ runtime: "east", ttl: { seconds: 600n } }, as(who))).lease?.id ?? "";
  const spec = (argv: string[]) => ({ containers: [{ name: "main", command: { argv } }] });
  /** The resource_created / deployment_created events of lease `leaseId`. */
  const createdEvents = async (leaseId: string) =>
    (await t.client(EventService).listEvents({ pageSize: 1000 }, as("alice"))).events.filter(
      (e) =>
        e.leaseId === leaseId &&
        (e.kind === EventKind.RESOURCE_CREATED || e.kind === EventKind.DEPLOYMENT_CREATED),
    );

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

  it("answers a retried CreateFile with the file it created, and refuses the key for other content", async () => {
    const leaseId = await openLease();
    const request = {
      leaseId,
      name: "a.txt",
      content: new TextEncoder().encode("one"),
      requestId: "upload-1",
    };
    const first = (await resources().createFile(request, as("alice"))).resource;
    const again = (await resources().createFile(request, as("alice"))).resource;
    expect(again?.id).toBe(first?.id);
    expect(fileOf(again)?.sha256).toBe(fileOf(first)?.sha256);
    const listed = await resources().listResources({ leaseId }, as("alice"));
    expect(listed.resources.map((r) => r.id)).toEqual([first?.id]);
    expect(await createdEvents(leaseId)).toHaveLength(1);

    const reused = await expectStatus(
      resources().createFile({ ...request, content: new TextEncoder().encode("two") }, as("alice")),
      Code.AlreadyExists,
      /request_id "upload-1" was already used for a different request \(resource .+\); use a new request_id/,
    );
    expect(reused.reason).toBe("REQUEST_ID_REUSED");
    expect(reused.info).toMatchObject({ resource_id: first?.id, request_id: "upload-1" });
  });

  it("matches a retried CreateObject whatever the order of its body's keys", async () => {
    const leaseId = await openLease();
    const first = (
      await resources().createObject(
        { leaseId, kind: "report", body: { a: 1, b: { c: "x", d: [1, 2] } }, requestId: "report-1" },
        as("alice"),
      )
    ).resource;
    const again = (
      await resources().createObject(
        { leaseId, kind: "report", body: { b: { d: [1, 2], c: "x" }, a: 1 }, requestId: "report-1" },
        as("alice"),
      )
    ).resource;
    expect(again?.id).toBe(first?.id);
    const reused = await expectStatus(
      resources().createObject(
        { leaseId, kind: "report", body: { a: 2 }, requestId: "report-1" },
        as("alice"),
      ),
      Code.AlreadyExists,
      /request_id "report-1" was already used for a different request/,
    );
    expect(reused.reason).toBe("REQUEST_ID_REUSED");
  });

  it("queues one deployment for a retried CreateDeployment, and still answers the retry after the commit", async () => {
    const leaseId = await openLease();
    const request = { leaseId, spec: spec(["sleep", "60"]), requestId: "deploy-1" };
    const first = (await resources().createDeployment(request, as("alice"))).resource;
    const again = (await resources().createDeployment(request, as("alice"))).resource;
    expect(again?.id).toBe(first?.id);
    expect(actionOf(again)).toBe(actionOf(first));
    const actions = await t.client(ActionService).listActions({ runId: leaseId }, as("alice"));
    expect(actions.actions.map((a) => a.id)).toEqual([actionOf(first)]);
    expect(await createdEvents(leaseId)).toHaveLength(1);

    await leases().commitLease({ leaseId }, as("alice"));
    // The answer to the first call was lost; the caller retries after its lease was committed.
    const afterCommit = (await resources().createDeployment(request, as("alice"))).resource;
    expect(afterCommit?.id).toBe(first?.id);
    expect(afterCommit?.ownership).toBe(Ownership.WORKSPACE);

    const reused = await expectStatus(
      resources().createDeployment({ ...request, spec: spec(["sleep", "61"]) }, as("alice")),
      Code.AlreadyExists,
      /request_id "deploy-1" was already used for a different request/,
    );
    expect(reused.info).toMatchObject({ resource_id: first?.id });
  });

  it("checks a create whose request id's deployment is gone as any create (its inputs)", async () => {
    const request = { runtime: "east", spec: spec(["sleep", "60"]), requestId: "deploy-checked" };
    const first = (await resources().createDeployment(request, as("alice"))).resource;
    await resources().deleteResource({ resourceId: first?.id ?? "" }, as("alice"));
    // Only a retry that finds the deployment of the same request skips the checks; this one
    // finds none (deleted), and names a file that is not there.
    const unchecked = {
      ...request,
      spec: { ...spec(["sleep", "60"]), inputs: [{ fileId: "no-such-file", path: "in.txt" }] },
    };
    const f = await expectStatus(
      resources().createDeployment(unchecked, as("alice")),
      Code.InvalidArgument,
      /no file resource "no-such-file"/,
    );
    expect(f.fields).toEqual(["spec.inputs[0].file_id"]);
  });

  it("makes one resource of concurrent creates with one key", async () => {
    const leaseId = await openLease();
    const request = { leaseId, spec: spec(["sleep", "60"]), requestId: "deploy-race" };
    const answers = await Promise.all(
      Array.from({ length: 6 }, () => resources().createDeployment(request, as("alice"))),
    );
    expect(new Set(answers.map((a) => a.resource?.id)).size).toBe(1);
    const actions = await t.client(ActionService).listActions({ runId: leaseId }, as("alice"));
    expect(actions.actions).toHaveLength(1);
  });

  it("keeps each principal's keys apart", async () => {
    const leaseId = await openLease("alice");
    const bobsLease = await openLease("bob");
    const mine = (
      await resources().createObject({ leaseId, kind: "note", requestId: "shared-key" }, as("alice"))
    ).resource;
    const bobs = (
      await resources().createObject({ leaseId: bobsLease, kind: "note", requestId: "shared-key" }, as("bob"))
    ).resource;
    expect(bobs?.id).not.toBe(mine?.id);
    expect(bobs?.leaseId).toBe(bobsLease);
  });

  it("frees the key with the resource: a retry into a rolled-back lease is LEASE_CLOSED", async () => {
    const leaseId = await openLease();
    const request = {
      leaseId,
      name: "b.txt",
      content: new TextEncoder().encode("x"),
      requestId: "upload-rb",
    };
    await resources().createFile(request, as("alice"));
    await leases().rollbackLease({ leaseId }, as("alice"));
    const closed = await expectStatus(
      resources().createFile(request, as("alice")),
      Code.FailedPrecondition,
      /lease .+ is ROLLED_BACK/,
    );
    expect(closed.reason).toBe("LEASE_CLOSED");
  });

  it("refuses a request id over 128 characters, naming the field", async () => {
    const leaseId = await openLease();
    const f = await expectStatus(
      resources().createObject({ leaseId, kind: "note", requestId: "k".repeat(129) }, as("alice")),
      Code.InvalidArgument,
      /request_id/,
    );
    expect(f.fields).toEqual(["request_id"]);
  });
});
