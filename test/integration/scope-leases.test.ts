import { type JsonObject, type Message, toBinary } from "@bufbuild/protobuf";
import type { GenMessage } from "@bufbuild/protobuf/codegenv2";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { sql } from "drizzle-orm";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import {
  CloseReason,
  DebugLeaseResponseSchema,
  LeaseService,
  LeaseState,
  ListLeasesResponseSchema,
} from "../../src/gen/leasehold/v1/lease_pb.js";
import {
  ListResourcesResponseSchema,
  Ownership,
  ResourceService,
} from "../../src/gen/leasehold/v1/resource_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import { openDatabase } from "../../src/store/database.js";
import { PAGE_BYTES } from "../../src/work/page.js";
import { everyPage } from "../helpers/pages.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus, failure } from "../helpers/status.js";

/** SPEC §3 rules, one behaviour each, on a real server with a fake clock. */
describe("scope leases", () => {
  let clock: FakeClock;
  let t: TestServer;
  const leases = () => t.client(LeaseService);
  const resources = () => t.client(ResourceService);
  const start = () => startTestServer({ overrides: { clock, timers: false } });
  const open = async (ttlSeconds = 600, label = "") =>
    (await leases().createLease({ runtime: "east", label, ttl: { seconds: BigInt(ttlSeconds) } })).lease
      ?.id ?? "";
  const file = async (leaseId: string, name = "f.txt", content = "hello") =>
    (await resources().createFile({ leaseId, name, content: new TextEncoder().encode(content) })).resource
      ?.id ?? "";

  beforeEach(async () => {
    clock = createFakeClock();
    t = await start();
  });
  afterEach(async () => {
    await t[Symbol.asyncDispose]();
  });

  it("opens a lease with a TTL and shows it", async () => {
    const id = await open(90, "ci-run-7");
    const { lease } = await leases().getLease({ leaseId: id });
    expect(lease).toMatchObject({
      id,
      runtime: "east",
      label: "ci-run-7",
      state: LeaseState.OPEN,
      ttl: { seconds: 90n },
      ownedResources: 0,
    });
    const listed = await leases().listLeases({ label: "ci-run-7" });
    expect(listed.leases.map((l) => l.id)).toEqual([id]);
  });

  it("returns the same lease for a retried request id, and refuses it for a different lease", async () => {
    const request = { runtime: "east", requestId: "run-42", ttl: { seconds: 120n } };
    const first = await leases().createLease(request);
    const again = await leases().createLease(request);
    expect(again.lease?.id).toBe(first.lease?.id);
    const f = await expectStatus(
      leases().createLease({ ...request, runtime: "west" }),
      Code.AlreadyExists,
      /request_id "run-42" was already used for a different lease/,
    );
    expect(f.reason).toBe("REQUEST_ID_REUSED");
    expect(f.info).toMatchObject({ lease_id: first.lease?.id, request_id: "run-42" });
  });

  it("echoes at most 64 characters of a long reused request id", async () => {
    const request = { runtime: "east", requestId: "r".repeat(128), ttl: { seconds: 120n } };
    await leases().createLease(request);
    const f = await expectStatus(
      leases().createLease({ ...request, runtime: "west" }),
      Code.AlreadyExists,
      /request_id "r{64}"… was already used for a different lease/,
    );
    expect(f.reason).toBe("REQUEST_ID_REUSED");
  });

  it("puts a resource in a lease only when it is created with the lease id", async () => {
    const id = await open();
    const inLease = await resources().createFile({
      leaseId: id,
      name: "a.txt",
      content: new Uint8Array([1, 2, 3]),
    });
    const outside = await resources().createObject({ kind: "dataset", body: { rows: 3 } });
    expect(inLease.resource).toMatchObject({ ownership: Ownership.LEASE, leaseId: id, kind: "file" });
    expect(inLease.resource?.body).toMatchObject({ case: "file", value: { name: "a.txt", sizeBytes: 3n } });
    expect(outside.resource).toMatchObject({ ownership: Ownership.WORKSPACE, leaseId: "", kind: "dataset" });
    expect((await leases().getLease({ leaseId: id })).lease?.ownedResources).toBe(1);
    // Only a file has content to download: an object's is its body.
    const download = async () => {
      for await (const _ of resources().downloadFile({ resourceId: outside.resource?.id ?? "" })) break;
    };
    const refused = await expectStatus(download(), Code.FailedPrecondition, /is a dataset, not a file/);
    expect(refused.reason).toBe("NOT_A_FILE");
  });

  it("refuses to create into an unknown or closed lease, naming its state", async () => {
    await expectStatus(
      file("01900000-0000-7000-8000-000000000000"),
      Code.NotFound,
      /lease "01900000-.*" not found/,
    );
    const id = await open();
    await leases().commitLease({ leaseId: id });
    const f = await expectStatus(
      file(id),
      Code.FailedPrecondition,
      new RegExp(`cannot create a file in it: lease ${id} is COMMITTED`),
    );
    expect(f.reason).toBe("LEASE_CLOSED");
  });

  it("promotes one resource out at once; it survives the rollback, the rest is destroyed", async () => {
    const id = await open();
    const keep = await file(id, "keep.txt");
    const drop = await file(id, "drop.txt");
    const promoted = await leases().promoteResource({ leaseId: id, kind: "file", resourceId: keep });
    expect(promoted.resource?.ownership).toBe(Ownership.WORKSPACE);
    // A retry (the first answer lost) gets the same answer, not NOT_FOUND.
    const again = await leases().promoteResource({ leaseId: id, kind: "file", resourceId: keep });
    expect(again.resource).toEqual(promoted.resource);
    await expectStatus(
      leases().promoteResource({ leaseId: id, kind: "note", resourceId: keep }),
      Code.NotFound,
      /owns no note/,
    );
    const other = await open();
    await expectStatus(
      leases().promoteResource({ leaseId: other, kind: "file", resourceId: keep }),
      Code.NotFound,
      /owns no file/,
    );
    const rolled = await leases().rollbackLease({ leaseId: id });
    expect(rolled).toMatchObject({
      destroyedResources: 1,
      lease: { state: LeaseState.ROLLED_BACK, closeReason: CloseReason.ROLLED_BACK },
    });
    expect((await resources().getResource({ resourceId: keep })).resource?.ownership).toBe(
      Ownership.WORKSPACE,
    );
    await expectStatus(resources().getResource({ resourceId: drop }), Code.NotFound, /not found/);
    // A retry after the close (the promote won a race with it, its answer lost): the same answer.
    const late = await leases().promoteResource({ leaseId: id, kind: "file", resourceId: keep });
    expect(late.resource).toEqual(promoted.resource);
    // A promote the close came first for is refused, naming the state.
    await expectStatus(
      leases().promoteResource({ leaseId: id, kind: "file", resourceId: drop }),
      Code.FailedPrecondition,
      /is ROLLED_BACK/,
    );
  });

  it("keeps everything on commit, and a second close is refused naming the state", async () => {
    const id = await open();
    const a = await file(id, "a");
    const b =
      (await resources().createObject({ leaseId: id, kind: "model", body: { v: 1 } })).resource?.id ?? "";
    const committed = await leases().commitLease({ leaseId: id });
    expect(committed).toMatchObject({
      keptResources: 2,
      lease: { state: LeaseState.COMMITTED, closeReason: CloseReason.COMMITTED },
    });
    for (const r of [a, b])
      expect((await resources().getResource({ resourceId: r })).resource?.ownership).toBe(
        Ownership.WORKSPACE,
      );
    await expectStatus(
      leases().commitLease({ leaseId: id }),
      Code.FailedPrecondition,
      /lease .* is COMMITTED/,
    );
    await expectStatus(
      leases().rollbackLease({ leaseId: id }),
      Code.FailedPrecondition,
      /cannot roll back: lease .* is COMMITTED/,
    );
  });

  it("refuses a deployment in a closed lease for the lease's state, even when its inputs were the lease's files", async () => {
    const id = await open();
    const f = await file(id);
    await leases().rollbackLease({ leaseId: id });
    const spec = { containers: [{ name: "a", command: { argv: ["true"] } }] };
    // The rollback destroyed the input: what to say is the lease's state, as without inputs.
    for (const inputs of [[{ fileId: f, path: "f.txt" }], []]) {
      const refused = await expectStatus(
        resources().createDeployment({ leaseId: id, spec: { ...spec, inputs } }),
        Code.FailedPrecondition,
        /^cannot create a deployment in it: lease .* is ROLLED_BACK/,
      );
      expect(refused.reason).toBe("LEASE_CLOSED");
    }
  });

  it("rolls back every lease past its TTL at once, however many expire together", async () => {
    // More than one statement's batch (100): all of them in one pass, none left open for later.
    const ids = new Set<string>();
    for (let i = 0; i < 3; i++) {
      for (const id of await Promise.all(Array.from({ length: 50 }, () => open(60, "mass-expiry"))))
        ids.add(id);
    }
    clock.advance(61_000);
    const expired = await t.server.scope.expireDue();
    expect(expired.filter((id) => ids.has(id)).sort()).toEqual([...ids].sort());
    const still = await leases().listLeases({ state: LeaseState.OPEN, label: "mass-expiry", pageSize: 1000 });
    expect(still.leases).toEqual([]);
  });

  it("rolls a lease back when its TTL passes without a close (reason expired)", async () => {
    const id = await open(60);
    const f = await file(id);
    clock.advance(59_000);
    expect(await t.server.scope.expireDue()).toEqual([]);
    clock.advance(2_000);
    expect(await t.server.scope.expireDue()).toEqual([id]);
    // The log line says what the rollback destroyed, and where.
    expect(t.logs.findLast((l) => l.msg === "scope leases rolled back: their TTL passed")).toMatchObject({
      leases: [id],
      runtimes: ["east"],
      resourcesDestroyed: 1,
    });
    const { lease } = await leases().getLease({ leaseId: id });
    expect(lease).toMatchObject({ state: LeaseState.ROLLED_BACK, closeReason: CloseReason.EXPIRED });
    await expectStatus(resources().getResource({ resourceId: f }), Code.NotFound, /not found/);
    await expectStatus(
      leases().commitLease({ leaseId: id }),
      Code.FailedPrecondition,
      /ROLLED_BACK \(its TTL passed\)/,
    );
  });

  it("refuses to commit a lease past its TTL even before the expiry loop ran, and rolls it back", async () => {
    const id = await open(5);
    await file(id);
    clock.advance(6_000);
    await expectStatus(
      leases().commitLease({ leaseId: id }),
      Code.FailedPrecondition,
      /ROLLED_BACK \(its TTL passed\)/,
    );
    expect((await leases().getLease({ leaseId: id })).lease).toMatchObject({
      state: LeaseState.ROLLED_BACK,
      ownedResources: 0,
    });
  });

  it("renews a lease: its rollback moves to the TTL from now, as often as it is renewed", async () => {
    const id = await open(60);
    const f = await file(id);
    const created = (await leases().getLease({ leaseId: id })).lease;
    clock.advance(50_000);
    // Without a ttl, the lease's own: 60s from now, not from its creation.
    const renewed = (await leases().renewLease({ leaseId: id })).lease;
    expect(renewed).toMatchObject({ state: LeaseState.OPEN, ttl: { seconds: 60n }, ownedResources: 1 });
    const moved = Number(renewed?.expireTime?.seconds) - Number(created?.expireTime?.seconds);
    expect(moved).toBe(50);
    clock.advance(50_000);
    expect(await t.server.scope.expireDue()).toEqual([]);
    // A ttl of its own sets the rollback, shorter or longer than the lease's.
    await leases().renewLease({ leaseId: id, ttl: { seconds: 5n } });
    clock.advance(4_000);
    expect(await t.server.scope.expireDue()).toEqual([]);
    clock.advance(2_000);
    expect(await t.server.scope.expireDue()).toEqual([id]);
    await expectStatus(resources().getResource({ resourceId: f }), Code.NotFound, /not found/);
    const { events } = await t.client(EventService).listEvents({ kind: EventKind.SCOPE_LEASE_RENEWED });
    expect(events.map((e) => [e.leaseId, e.details?.ttl_ms])).toEqual([
      [id, 60_000],
      [id, 5_000],
    ]);
  });

  it("refuses to renew a lease that closed or is past its TTL, and one past the maximum TTL", async () => {
    const committed = await open();
    await leases().commitLease({ leaseId: committed });
    let f = await expectStatus(
      leases().renewLease({ leaseId: committed }),
      Code.FailedPrecondition,
      /cannot renew: lease .* is COMMITTED/,
    );
    expect(f.reason).toBe("LEASE_CLOSED");
    // Past its TTL before the expiry loop ran: the rollback has begun, and a renewal cannot undo it.
    const late = await open(5);
    clock.advance(6_000);
    f = await expectStatus(
      leases().renewLease({ leaseId: late, ttl: { seconds: 600n } }),
      Code.FailedPrecondition,
      /ROLLED_BACK \(its TTL passed\)/,
    );
    expect((await leases().getLease({ leaseId: late })).lease?.state).toBe(LeaseState.ROLLED_BACK);
    const id = await open();
    f = await expectStatus(
      leases().renewLease({ leaseId: id, ttl: { seconds: 100n * 86_400n } }),
      Code.InvalidArgument,
      /ttl: must be at most 86400s/,
    );
    expect(f.reason).toBe("TTL_OVER_MAXIMUM");
    await expectStatus(
      leases().renewLease({ leaseId: id, ttl: { seconds: 0n, nanos: 500_000_000 } }),
      Code.InvalidArgument,
      /ttl: must be at least 1s/,
    );
    await expectStatus(leases().renewLease({ leaseId: "" }), Code.InvalidArgument, /lease_id/);
    await expectStatus(
      leases().renewLease({ leaseId: "00000000-0000-7000-8000-000000000000" }),
      Code.NotFound,
      /not found/,
    );
  });

  it("rolls back a lease whose TTL passed while the server was down, when it starts", async () => {
    const id = await open(30);
    const f = await file(id);
    await t.stop();
    clock.advance(31_000);
    t = await t.restart();
    expect((await leases().getLease({ leaseId: id })).lease).toMatchObject({
      state: LeaseState.ROLLED_BACK,
      closeReason: CloseReason.EXPIRED,
    });
    await expectStatus(resources().getResource({ resourceId: f }), Code.NotFound, /not found/);
  });

  it("lets exactly one of a racing commit and rollback win, with nothing half-done", async () => {
    for (let round = 0; round < 6; round++) {
      const id = await open();
      const owned = await Promise.all([file(id, "1"), file(id, "2"), file(id, "3")]);
      const outcomes = await Promise.allSettled([
        leases().commitLease({ leaseId: id }),
        leases().rollbackLease({ leaseId: id }),
      ]);
      const won = outcomes.filter((o) => o.status === "fulfilled");
      expect(won).toHaveLength(1);
      const lost = outcomes.find((o) => o.status === "rejected") as PromiseRejectedResult;
      expect(lost.reason).toMatchObject({
        code: Code.FailedPrecondition,
        details: expect.stringMatching(/is (COMMITTED|ROLLED_BACK)/),
      });
      const state = (await leases().getLease({ leaseId: id })).lease?.state;
      const left = await resources().listResources({ leaseId: id });
      if (state === LeaseState.COMMITTED) {
        expect(left.resources.map((r) => r.ownership)).toEqual([
          Ownership.WORKSPACE,
          Ownership.WORKSPACE,
          Ownership.WORKSPACE,
        ]);
      } else {
        expect(left.resources).toEqual([]);
      }
      expect(owned).toHaveLength(3);
    }
  });

  it("never leaves a resource in a closed lease when creation races the close", async () => {
    const id = await open();
    const creations = Array.from({ length: 8 }, (_, i) =>
      file(id, `late-${i}`).then(
        () => "created",
        (e) => e,
      ),
    );
    const [rolled, ...created] = await Promise.all([leases().rollbackLease({ leaseId: id }), ...creations]);
    expect(rolled.lease?.state).toBe(LeaseState.ROLLED_BACK);
    for (const outcome of created) {
      if (outcome !== "created") expect(outcome).toMatchObject({ code: Code.FailedPrecondition });
    }
    expect((await resources().listResources({ leaseId: id, ownership: Ownership.LEASE })).resources).toEqual(
      [],
    );
  });

  it("stores file content, serves it back in chunks, and refuses files over the limit", async () => {
    const content = new Uint8Array(200 * 1024).map((_, i) => i % 251);
    const { resource } = await resources().createFile({
      name: "blob.bin",
      content,
      contentType: "application/octet-stream",
    });
    expect(resource?.body).toMatchObject({ case: "file", value: { sizeBytes: BigInt(content.length) } });
    const chunks: Uint8Array[] = [];
    for await (const m of resources().downloadFile({ resourceId: resource?.id ?? "" })) chunks.push(m.chunk);
    expect(chunks.length).toBeGreaterThan(1);
    expect(Buffer.concat(chunks).equals(Buffer.from(content))).toBe(true);
    const f = await failure(
      resources().createFile({ name: "huge", content: new Uint8Array(3 * 1024 * 1024 + 1) }),
    );
    // The refusal names the file and the limit: an agent saving many outputs gets it per file.
    expect(f).toMatchObject({
      code: Code.ResourceExhausted,
      message: `content: file "huge" (${3 * 1024 * 1024 + 1} bytes) is over the server's file limit of ${3 * 1024 * 1024} bytes (its --max-file-size)`,
      reason: "FILE_TOO_LARGE",
      fields: ["content"],
      info: { name: "huge", size_bytes: String(3 * 1024 * 1024 + 1), limit_bytes: String(3 * 1024 * 1024) },
    });
  });

  it("deletes workspace-owned resources only, and closed lease records only", async () => {
    const id = await open();
    const owned = await file(id);
    await expectStatus(
      resources().deleteResource({ resourceId: owned }),
      Code.FailedPrecondition,
      /belongs to an open lease/,
    );
    await expectStatus(
      leases().deleteLease({ leaseId: id }),
      Code.FailedPrecondition,
      /is OPEN; commit or roll it back first/,
    );
    await leases().commitLease({ leaseId: id });
    await resources().deleteResource({ resourceId: owned });
    await expectStatus(resources().getResource({ resourceId: owned }), Code.NotFound, /not found/);
    await leases().deleteLease({ leaseId: id });
    await expectStatus(leases().getLease({ leaseId: id }), Code.NotFound, /not found/);
    const a = await open(600, "bulk");
    const b = await open(600, "bulk");
    await open(600, "bulk");
    await leases().rollbackLease({ leaseId: a });
    await leases().rollbackLease({ leaseId: b });
    // The open one is left, and the answer says so: a filter never skips leases silently.
    expect(await leases().deleteLeases({ label: "bulk" })).toMatchObject({ deleted: 2, skippedOpen: 1 });
    expect((await leases().listLeases({ label: "bulk" })).leases).toHaveLength(1);
    expect(await leases().deleteLeases({ label: "bulk", runtime: "elsewhere" })).toMatchObject({
      deleted: 0,
      skippedOpen: 0,
    });
    // An open lease has not closed before any time: closed_before matches none of them.
    expect(
      await leases().deleteLeases({ label: "bulk", closedBefore: timestampFromDate(new Date()) }),
    ).toMatchObject({ deleted: 0, skippedOpen: 0 });
    // An empty request deletes nothing: every closed lease takes `all`.
    const empty = await expectStatus(leases().deleteLeases({}), Code.InvalidArgument, /^all: must be true/);
    expect(empty.fields).toEqual(["all"]);
    await leases().rollbackLease({ leaseId: await open(600, "other") });
    const all = await leases().deleteLeases({ all: true });
    expect(all.deleted).toBeGreaterThan(0);
    expect(all.skippedOpen).toBe((await leases().listLeases({ state: LeaseState.OPEN })).leases.length);
    expect(all.skippedOpen).toBeGreaterThan(0);
    expect((await leases().listLeases({ label: "other" })).leases).toHaveLength(0);
    expect((await leases().listLeases({ label: "bulk" })).leases).toHaveLength(1);
  });

  it("keeps a result set on the lease after it closes, and shows it all in debug", async () => {
    const id = await open();
    await file(id);
    await leases().setResult({ leaseId: id, result: { passed: 12, failed: 0 } });
    await leases().rollbackLease({ leaseId: id });
    expect((await leases().getLease({ leaseId: id })).lease?.result).toEqual({ passed: 12, failed: 0 });
    const debug = await leases().debugLease({ leaseId: id });
    expect(debug.lease?.state).toBe(LeaseState.ROLLED_BACK);
    expect(debug.events.map((e) => e.kind)).toEqual([
      EventKind.SCOPE_LEASE_CREATED,
      EventKind.RESOURCE_CREATED,
      EventKind.SCOPE_LEASE_RESULT_SET,
      EventKind.SCOPE_LEASE_ROLLED_BACK,
    ]);
    // A post-mortem may be written after the close; a deleted lease has none.
    await leases().setResult({ leaseId: id, result: { passed: 12, failed: 0, note: "flaky" } });
    expect((await leases().getLease({ leaseId: id })).lease?.result).toMatchObject({ note: "flaky" });
    await leases().deleteLease({ leaseId: id });
    await expectStatus(leases().setResult({ leaseId: id, result: { passed: 0 } }), Code.NotFound, /./);
  });

  it("lists and follows the events of one lease, its resources' included, by lease_id", async () => {
    const id = await open();
    const other = await open();
    await file(other);
    const events = t.client(EventService);
    const watch = events.watchEvents({ leaseId: id, afterSequence: 0n });
    await file(id);
    await leases().setResult({ leaseId: other, result: { passed: 1 } });
    await leases().commitLease({ leaseId: id });
    const listed = await events.listEvents({ leaseId: id });
    const kinds = [
      EventKind.SCOPE_LEASE_CREATED,
      EventKind.RESOURCE_CREATED,
      EventKind.SCOPE_LEASE_COMMITTED,
    ];
    expect(listed.events.map((e) => e.kind)).toEqual(kinds);
    expect(new Set(listed.events.map((e) => e.leaseId))).toEqual(new Set([id]));
    // The watch replays the same events, and no other lease's.
    const followed: EventKind[] = [];
    for await (const m of watch) {
      followed.push(m.event?.kind ?? EventKind.UNSPECIFIED);
      if (followed.length === kinds.length) break;
    }
    expect(followed).toEqual(kinds);
    // Filters combine with AND: the lease's events are in its runtime's cluster, none in another.
    expect((await events.listEvents({ leaseId: id, cluster: "east" })).events).toHaveLength(3);
    expect((await events.listEvents({ leaseId: id, cluster: "west" })).events).toHaveLength(0);
    const long = await failure(events.listEvents({ leaseId: "x".repeat(129) }));
    expect(long.code).toBe(Code.InvalidArgument);
    expect(long.message).toMatch(/lease_id/);
  });

  /** A lease-owned object of kind "blob" with `body`; its id. */
  const object = async (leaseId: string, body: JsonObject) =>
    (await resources().createObject({ leaseId, kind: "blob", body })).resource?.id ?? "";
  /** A body of 1 MB as JSON and sent (the most a body may hold is 1 MiB as JSON). */
  const megabyte = (i: number) => ({ blob: String(i % 10).repeat(1_000_000) });
  /** A body of 20 KB as JSON, 110 KB as sent: a number takes 11 bytes in a Struct. */
  const numbers = (i: number) => ({ v: Array.from({ length: 9_990 }, () => i) });

  /**
   * Reads a listing from its first page to its last with the default client
   * (which refuses an answer over 4 MiB), checking that each page is under
   * PAGE_BYTES as sent: how many items each page held, and their ids in order.
   */
  async function pagesOf<R extends Message & { readonly nextPageToken: string }>(
    schema: GenMessage<R>,
    list: (pageToken: string) => Promise<R>,
    itemsOf: (page: R) => readonly { readonly id: string }[],
  ) {
    const pages = await everyPage(list);
    for (const page of pages) expect(toBinary(schema, page).byteLength).toBeLessThan(PAGE_BYTES);
    return {
      sizes: pages.map((page) => itemsOf(page).length),
      seen: pages.flatMap(itemsOf).map((i) => i.id),
    };
  }

  it("lists large resources in pages the client can receive, each once and in order", async () => {
    const [large, numerous] = [await open(), await open()];
    const megabytes: string[] = [];
    for (let i = 0; i < 6; i++) megabytes.push(await object(large, megabyte(i)));
    const many: string[] = [];
    for (let i = 0; i < 40; i++) many.push(await object(numerous, numbers(i)));
    const list = (leaseId: string) =>
      pagesOf(
        ListResourcesResponseSchema,
        (pageToken) => resources().listResources({ leaseId, pageSize: 1000, pageToken }),
        (page) => page.resources,
      );
    // 2 MiB of JSON a page after its first resource: before, the one page (6 MB) was refused.
    expect(await list(large)).toEqual({ sizes: [2, 2, 2], seen: megabytes });
    // 3 MiB as sent a page, though their JSON (800 KB) is well under 2 MiB.
    expect(await list(numerous)).toEqual({ sizes: [28, 12], seen: many });
  });

  it("lists leases with large results in pages the client can receive, each once and in order", async () => {
    const megabytes: string[] = [];
    for (let i = 0; i < 5; i++) {
      megabytes.push(await open(600, "big-results"));
      await leases().setResult({ leaseId: megabytes[i] as string, result: megabyte(i) });
    }
    const many: string[] = [];
    for (let i = 0; i < 40; i++) {
      many.push(await open(600, "number-results"));
      await leases().setResult({ leaseId: many[i] as string, result: numbers(i) });
    }
    const list = (label: string) =>
      pagesOf(
        ListLeasesResponseSchema,
        (pageToken) => leases().listLeases({ label, pageSize: 1000, pageToken }),
        (page) => page.leases,
      );
    // Before, the one page (5 MB) was refused.
    expect(await list("big-results")).toEqual({ sizes: [2, 2, 1], seen: megabytes });
    expect(await list("number-results")).toEqual({ sizes: [28, 12], seen: many });
  });

  it("keeps a debug snapshot under the client's limit, leaving out the largest bodies and saying so", async () => {
    const id = await open();
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await object(id, megabyte(i)));
    await leases().setResult({ leaseId: id, result: megabyte(9) });
    // Before, the answer (7 MB) was refused.
    const debug = await leases().debugLease({ leaseId: id });
    expect(toBinary(DebugLeaseResponseSchema, debug).byteLength).toBeLessThan(PAGE_BYTES);
    expect(debug.lease?.result).toEqual(megabyte(9));
    // Every resource is listed; beside the 1 MB result, two 1 MB bodies fit, and four are left out.
    expect(debug.resources.map((r) => r.id)).toEqual(ids);
    const bodies = debug.resources.filter((r) => r.body.case !== undefined);
    expect(bodies.map((r) => r.body.value)).toEqual([megabyte(0), megabyte(1)]);
    expect(debug.omittedResourceBodies).toBe(4);
    const left = await resources().getResource({ resourceId: ids[5] as string });
    expect(left.resource?.body.value).toEqual(megabyte(5));
    expect(debug.events.map((e) => e.kind)).toEqual([
      EventKind.SCOPE_LEASE_CREATED,
      ...ids.map(() => EventKind.RESOURCE_CREATED),
      EventKind.SCOPE_LEASE_RESULT_SET,
    ]);
    expect({ events: debug.omittedEvents, deployments: debug.omittedDeployments }).toEqual({
      events: 0,
      deployments: 0,
    });
  });

  it("says how many resources a debug snapshot leaves out past the first 1000", async () => {
    const id = await open();
    const first = await object(id, { n: 0 });
    // 1,001 more, copies of the first, written with the server stopped: a thousand calls take long.
    await t.stop();
    const database = await openDatabase({ url: t.store.url, dataDir: t.store.dataDir });
    await database.db.execute(sql`
      insert into resources (id, kind, ownership, lease_id, created_at, body)
      select id || '-' || lpad(g::text, 4, '0'), kind, ownership, lease_id, created_at, body
      from resources, generate_series(1, 1001) g where id = ${first}`);
    await database.close();
    t = await t.restart();
    const debug = await leases().debugLease({ leaseId: id });
    expect(debug.resources).toHaveLength(1000);
    expect(debug.omittedResources).toBe(2);
    expect(debug.resources[0]?.id).toBe(first);
    expect(debug.resources.at(-1)?.id).toBe(`${first}-0999`);
  });

  it("refuses file names that climb out of a directory or print as something else, and keeps paths like out/a.txt", async () => {
    const { lease } = await leases().createLease({ runtime: "east" });
    const leaseId = lease?.id ?? "";
    const content = new Uint8Array([1]);
    const refused: [string, RegExp][] = [
      ["../../etc/passwd", /a "\.\." segment/],
      ["out/../../x", /a "\.\." segment/],
      ["/abs", /not start with "\/"/],
      [".", /a "\." segment/],
      ["..", /a "\.\." segment/],
      ["dir/", /not end with "\/"/],
      ["a//b", /an empty segment/],
      ["a\\b", /not contain "\\"/],
      ["line\nforged", /it has U\+000A at index 4/],
      ["bell\u0001", /it has U\+0001/],
      ["csi\u009b", /it has U\+009B/],
      ["invoice\u202Etxt.exe", /it has U\+202E/],
      ["isolate\u2066x", /it has U\+2066/],
    ];
    for (const [name, why] of refused) {
      const f = await expectStatus(
        resources().createFile({ leaseId, name, content }),
        Code.InvalidArgument,
        new RegExp(`^name: must .*${why.source}.*; a file name is a relative path of "/"-separated segments`),
      );
      expect(f.fields).toEqual(["name"]);
    }
    // What agents and manifests name files: paths under outputs_dir, any other characters.
    for (const name of [
      "a.txt",
      "out/a.txt",
      "logs/2026/run 1.log",
      ".hidden",
      "a..b",
      "résumé – v2.txt",
      "日本.txt",
    ]) {
      const { resource } = await resources().createFile({ leaseId, name, content });
      expect(resource?.body.case === "file" && resource.body.value.name).toBe(name);
    }
  });

  it("ends the watch of a queued deployment's action when a rollback, an expiry or a delete cancels it", async () => {
    const spec = { containers: [{ name: "web", command: { argv: ["true"] } }] };
    /** A deployment no agent takes (none serves "east" here): its action stays QUEUED. */
    const queued = async (leaseId: string) => {
      const { resource } = await resources().createDeployment(
        leaseId ? { leaseId, spec } : { runtime: "east", spec },
      );
      return {
        resourceId: resource?.id ?? "",
        actionId: resource?.body.case === "deployment" ? resource.body.value.actionId : "",
      };
    };
    /**
     * Watches the action until its stream ends; `end` cancels it meanwhile. Without a wake-up the
     * watch would wait for the deadline, failing the test with DEADLINE_EXCEEDED.
     */
    const watchedTo = async (actionId: string, end: () => Promise<unknown>) => {
      const states: ActionState[] = [];
      const stream = t
        .client(ActionService)
        .watchAction({ actionId }, { deadline: new Date(Date.now() + 10_000) });
      const iterator = stream[Symbol.asyncIterator]();
      const first = await iterator.next();
      if (!first.done) states.push(first.value.action?.state ?? ActionState.UNSPECIFIED);
      await end();
      for (let next = await iterator.next(); !next.done; next = await iterator.next())
        states.push(next.value.action?.state ?? ActionState.UNSPECIFIED);
      return states;
    };
    const rollback = await open();
    const rolledBack = await queued(rollback);
    const rolledBackWatch = await watchedTo(rolledBack.actionId, () =>
      leases().rollbackLease({ leaseId: rollback }),
    );
    expect(rolledBackWatch).toEqual([ActionState.QUEUED, ActionState.CANCELLED]);

    const expired = await queued(await open(60));
    const expiredWatch = await watchedTo(expired.actionId, async () => {
      clock.advance(61_000);
      await t.server.scope.expireDue();
    });
    expect(expiredWatch).toEqual([ActionState.QUEUED, ActionState.CANCELLED]);

    // Kept by a commit, then deleted; and one made outside any lease, deleted.
    const commit = await open();
    const committed = await queued(commit);
    await leases().commitLease({ leaseId: commit });
    const committedWatch = await watchedTo(committed.actionId, () =>
      resources().deleteResource({ resourceId: committed.resourceId }),
    );
    expect(committedWatch).toEqual([ActionState.QUEUED, ActionState.CANCELLED]);
    const unleased = await queued("");
    const unleasedWatch = await watchedTo(unleased.actionId, () =>
      resources().deleteResource({ resourceId: unleased.resourceId }),
    );
    expect(unleasedWatch).toEqual([ActionState.QUEUED, ActionState.CANCELLED]);
  });

  it("rejects bad requests with the field to fix", async () => {
    await expectStatus(leases().createLease({ runtime: "" }), Code.InvalidArgument, /^runtime: is required/);
    const over = await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: 10n * 86400n } }),
      Code.InvalidArgument,
      /^ttl: must be at most 86400s/,
    );
    // The maximum, for a client to read without parsing the message.
    expect(over).toMatchObject({ reason: "TTL_OVER_MAXIMUM", info: { max_ttl: "86400s" }, fields: ["ttl"] });
    // Far past a year too: the bound named is the server's, not a wider one of the request's.
    await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: 10_000n * 365n * 86400n } }),
      Code.InvalidArgument,
      /^ttl: must be at most 86400s \(the server's maximum, its --lease-max-ttl\)$/,
    );
    // One violation for a negative ttl, not also "at least 1s".
    await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: -5n } }),
      Code.InvalidArgument,
      /^ttl: must not be negative$/,
    );
    // Compared exactly, never rounded first: 0.9995s is under 1s, and -0.4ms is negative.
    const under = await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: 0n, nanos: 999_500_000 } }),
      Code.InvalidArgument,
      /^ttl: must be at least 1s$/,
    );
    expect(under.fields).toEqual(["ttl"]);
    await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: 0n, nanos: -400_000 } }),
      Code.InvalidArgument,
      /^ttl: must not be negative$/,
    );
    // The TTL is kept (and shown) in milliseconds: a finer one is refused, not rounded.
    const fine = await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: 1n, nanos: 500 } }),
      Code.InvalidArgument,
      /^ttl: must be a whole number of milliseconds \(got 1\.0000005s\)$/,
    );
    expect(fine.fields).toEqual(["ttl"]);
    await expectStatus(
      leases().createLease({ runtime: "east", ttl: { seconds: 86_400n, nanos: 1 } }),
      Code.InvalidArgument,
      /^ttl: must be a whole number of milliseconds \(got 86400\.000000001s\)$/,
    );
    const { lease: exact } = await leases().createLease({
      runtime: "east",
      ttl: { seconds: 1n, nanos: 1_000_000 },
    });
    expect(exact?.ttl).toMatchObject({ seconds: 1n, nanos: 1_000_000 });
    await expectStatus(
      resources().createObject({ kind: "file" }),
      Code.InvalidArgument,
      /^kind: "file" has its own create call/,
    );
    await expectStatus(leases().setResult({ leaseId: "x" }), Code.InvalidArgument, /^result: is required/);
    await expectStatus(
      leases().collectOutputs({ leaseId: "x", timeout: { seconds: -1n } }),
      Code.InvalidArgument,
      /^timeout: must not be negative/,
    );
    // A negative probe period or timeout is named once, not also as shorter than 100ms.
    const probe = (timing: { period?: { seconds: bigint }; timeout?: { seconds: bigint } }) =>
      resources().createDeployment({
        runtime: "east",
        spec: {
          containers: [{ name: "web", command: { argv: ["true"] } }],
          readinessProbe: { check: { case: "tcpPort", value: 8080 }, ...timing },
        },
      });
    const timeout = await expectStatus(
      probe({ timeout: { seconds: -5n } }),
      Code.InvalidArgument,
      /^spec\.readiness_probe\.timeout: must not be negative$/,
    );
    expect(timeout.fields).toEqual(["spec.readiness_probe.timeout"]);
    await expectStatus(
      probe({ period: { seconds: -5n } }),
      Code.InvalidArgument,
      /^spec\.readiness_probe\.period: must not be negative$/,
    );
    await expectStatus(
      probe({ timeout: { seconds: 0n } }),
      Code.InvalidArgument,
      /^spec\.readiness_probe\.timeout: must be at least 100ms$/,
    );
  });

  it("refuses an http_get readiness probe off the agent's own host or with a user name and password", async () => {
    // A runtime no agent serves: nothing would GET these URLs if one were let through.
    const probe = (url: string) =>
      resources().createDeployment({
        runtime: "nobody-probes",
        spec: {
          containers: [{ name: "web", command: { argv: ["sleep", "60"] } }],
          readinessProbe: { check: { case: "httpGet", value: url } },
        },
      });
    for (const [url, why] of [
      ["http://169.254.169.254/latest/meta-data/", "169.254.169.254"],
      ["http://10.0.0.1:8080/", "10.0.0.1"],
      ["http://0.0.0.0:8080/", "0.0.0.0"],
      ["http://[::ffff:127.0.0.1]/", "[::ffff:7f00:1]"],
      ["http://metadata.google.internal/", "metadata.google.internal"],
      ["http://localhost.example.com/", "localhost.example.com"],
    ]) {
      const f = await expectStatus(
        probe(url as string),
        Code.InvalidArgument,
        new RegExp(
          `^spec\\.readiness_probe\\.http_get: must be on the agent's own host \\(localhost, 127\\.0\\.0\\.0/8 or \\[::1\\]\\), not "${(why as string).replace(/[.[\]]/g, "\\$&")}"`,
        ),
      );
      expect(f.fields).toEqual(["spec.readiness_probe.http_get"]);
    }
    for (const url of ["http://user:pw@10.0.0.1/", "http://user@127.0.0.1:8080/"]) {
      await expectStatus(
        probe(url),
        Code.InvalidArgument,
        /^spec\.readiness_probe\.http_get: must not carry a user name or password/,
      );
    }
    for (const url of [
      "http://localhost:8080/ready",
      "https://127.0.0.1/",
      "http://127.8.9.10:1/",
      "http://[::1]:80/",
    ]) {
      const { resource } = await probe(url);
      expect(resource?.body.case).toBe("deployment");
    }
  });
});
