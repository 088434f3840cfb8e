import { toBinary } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import {
  ActionService,
  ActionState,
  CancelActionResponseSchema,
  ExplainActionResponseSchema,
  GetActionResponseSchema,
  ListActionsResponseSchema,
  WatchActionResponseSchema,
} from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import type { Client } from "../../src/rpc/client.js";
import { everyPage } from "../helpers/pages.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

let t: TestServer;

describe("ActionService", () => {
  let api: Client<(typeof ActionService)["method"]>;

  beforeAll(async () => {
    t = await startTestServer();
    api = t.client(ActionService);
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("queues a submitted action and returns it by id with its defaults filled in", async () => {
    const { action, created } = await api.submitAction({
      cluster: "gpu-east",
      runId: "run-1",
      payload: { argv: ["echo", "hello"] },
      labelSelector: { zone: "a" },
      priority: 5,
    });
    expect(created).toBe(true);
    expect(action?.state).toBe(ActionState.QUEUED);
    expect(action?.id).toMatch(/^[0-9a-f-]{36}$/);
    expect(action?.retryPolicy?.maxAttempts).toBe(3);
    expect(action?.maxSystemRetries).toBe(3);

    const got = await api.getAction({ actionId: action?.id ?? "" });
    expect(got.action).toMatchObject({
      id: action?.id,
      cluster: "gpu-east",
      runId: "run-1",
      payload: { argv: ["echo", "hello"] },
      labelSelector: { zone: "a" },
      priority: 5,
      state: ActionState.QUEUED,
      epoch: 0n,
    });
    expect(got.attempts).toEqual([]);
  });

  it("returns the first action when a submit is retried with the same request id", async () => {
    const request = {
      requestId: "req-idem-1",
      cluster: "c1",
      payload: { n: 1 },
      labelSelector: { a: "1", b: "2" },
    };
    const first = await api.submitAction(request);
    const again = await api.submitAction({ ...request, labelSelector: { b: "2", a: "1" } });
    expect(first.created).toBe(true);
    expect(again.created).toBe(false);
    expect(again.action?.id).toBe(first.action?.id);
  });

  it("creates exactly one action when the same request id is submitted concurrently", async () => {
    const request = { requestId: "req-race", cluster: "c1", payload: { n: 2 } };
    const results = await Promise.all(Array.from({ length: 8 }, () => api.submitAction(request)));
    expect(new Set(results.map((r) => r.action?.id)).size).toBe(1);
    expect(results.filter((r) => r.created)).toHaveLength(1);
  });

  it("refuses a request id reused for a different request with ALREADY_EXISTS", async () => {
    await api.submitAction({ requestId: "req-conflict", cluster: "c1", payload: { n: 1 } });
    const f = await expectStatus(
      api.submitAction({ requestId: "req-conflict", cluster: "c1", payload: { n: 2 } }),
      Code.AlreadyExists,
      /request_id "req-conflict" was already used for a different request/,
    );
    expect(f.reason).toBe("REQUEST_ID_REUSED");
  });

  it("echoes at most 64 characters of a long reused request id", async () => {
    const requestId = "r".repeat(128);
    await api.submitAction({ requestId, cluster: "c1", payload: { n: 1 } });
    const f = await expectStatus(
      api.submitAction({ requestId, cluster: "c1", payload: { n: 2 } }),
      Code.AlreadyExists,
      /request_id "r{64}"… was already used for a different request/,
    );
    expect(f.reason).toBe("REQUEST_ID_REUSED");
  });

  it("pages through a filtered listing without gaps or repeats", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 7; i++) {
      const { action } = await api.submitAction({ cluster: "paged", runId: i % 2 === 0 ? "even" : "odd" });
      ids.push(action?.id ?? "");
    }
    const seen: string[] = [];
    let pageToken = "";
    let pages = 0;
    do {
      const page = await api.listActions({ cluster: "paged", pageSize: 3, pageToken });
      expect(page.actions.length).toBeLessThanOrEqual(3);
      seen.push(...page.actions.map((a) => a.id));
      pageToken = page.nextPageToken;
      pages++;
    } while (pageToken !== "");
    expect(pages).toBe(3);
    expect(seen).toEqual(ids);

    const even = await api.listActions({ cluster: "paged", runId: "even" });
    expect(even.actions.map((a) => a.id)).toEqual(ids.filter((_, i) => i % 2 === 0));
    expect(even.nextPageToken).toBe("");
  });

  /** Lists `cluster` in pages of up to 1,000 until the last: how many each page held, and the ids in order. */
  async function actionPages(cluster: string) {
    const pages = await everyPage((pageToken) => api.listActions({ cluster, pageSize: 1000, pageToken }));
    const actions = pages.flatMap((page) => page.actions);
    expect(actions.every((a) => a.payload !== undefined)).toBe(true);
    return { sizes: pages.map((page) => page.actions.length), seen: actions.map((a) => a.id) };
  }

  it("cuts a page of large actions short of the client's receive limit, and pages on", async () => {
    const ids: string[] = [];
    // 700 KB of JSON each, then small ones: at most 2 MiB of JSON a page after its first action.
    for (let i = 0; i < 9; i++) {
      const payload = i < 6 ? { blob: String(i).repeat(700_000) } : { n: i };
      ids.push((await api.submitAction({ cluster: "heavy", payload })).action?.id ?? "");
    }
    // A default client receives at most 4 MiB: before, the one page (6.3 MB) was refused.
    expect(await actionPages("heavy")).toEqual({ sizes: [2, 2, 5], seen: ids });
  });

  it("cuts a page by the size it is sent at, five times its JSON for numbers", async () => {
    const ids: string[] = [];
    // 20 KB of JSON each, 110 KB as a Struct (11 bytes a number): 40 of them make 4.4 MB.
    for (let i = 0; i < 40; i++) {
      const payload = { v: Array.from({ length: 9_990 }, () => i) };
      ids.push((await api.submitAction({ cluster: "numbers", payload })).action?.id ?? "");
    }
    // 3 MiB a page: 28 actions, then the 12 left.
    expect(await actionPages("numbers")).toEqual({ sizes: [28, 12], seen: ids });
  });

  it("filters the listing by state", async () => {
    const { action } = await api.submitAction({ cluster: "by-state" });
    await api.submitAction({ cluster: "by-state" });
    await api.cancelAction({ actionId: action?.id ?? "" });
    const cancelled = await api.listActions({ cluster: "by-state", state: ActionState.CANCELLED });
    expect(cancelled.actions.map((a) => a.id)).toEqual([action?.id]);
    const queued = await api.listActions({ cluster: "by-state", state: ActionState.QUEUED });
    expect(queued.actions).toHaveLength(1);
  });

  it("lists events newest first, page by page, for a feed that shows recent history and then follows", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const { action } = await api.submitAction({ cluster: "newest" });
      ids.push(action?.id ?? "");
    }
    const events = t.client(EventService);
    const seen: string[] = [];
    const sequences: bigint[] = [];
    let pageToken = "";
    do {
      const page = await events.listEvents({ cluster: "newest", pageSize: 2, pageToken, newestFirst: true });
      seen.push(...page.events.map((e) => e.actionId));
      sequences.push(...page.events.map((e) => e.sequence));
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    expect(seen).toEqual([...ids].reverse());
    expect([...sequences].sort((a, b) => (a > b ? -1 : 1))).toEqual(sequences);
    // A token of one direction does not page the other.
    const first = await events.listEvents({ cluster: "newest", pageSize: 2, newestFirst: true });
    await expectStatus(
      events.listEvents({ cluster: "newest", pageSize: 2, pageToken: first.nextPageToken }),
      Code.InvalidArgument,
      /^page_token: was issued for different filters/,
    );
  });

  it("refuses a page token used with other filters, or in another List call", async () => {
    await api.submitAction({ cluster: "tok" });
    await api.submitAction({ cluster: "tok" });
    const first = await api.listActions({ cluster: "tok", pageSize: 1 });
    expect(first.nextPageToken).not.toBe("");
    await expectStatus(
      api.listActions({ cluster: "other", pageSize: 1, pageToken: first.nextPageToken }),
      Code.InvalidArgument,
      /^page_token: was issued for different filters/,
    );
    // The same filters (cluster "tok") in ListWorkers: the token pages actions, not workers.
    await expectStatus(
      t.client(ClusterService).listWorkers({ cluster: "tok", pageToken: first.nextPageToken }),
      Code.InvalidArgument,
      /^page_token: was issued for different filters or another List call/,
    );
    await expectStatus(
      api.listActions({ pageToken: "not-a-token" }),
      Code.InvalidArgument,
      /^page_token: is not a token this server issued/,
    );
  });

  it("cancels a queued action at once and records why", async () => {
    const { action } = await api.submitAction({ cluster: "c2" });
    const { action: cancelled } = await api.cancelAction({
      actionId: action?.id ?? "",
      reason: "not needed",
    });
    expect(cancelled?.state).toBe(ActionState.CANCELLED);
    expect(cancelled?.failureReason).toBe("action cancelled: not needed");
    expect(cancelled?.finishTime).toBeDefined();
    // Cancelling again is harmless and returns the same action.
    const again = await api.cancelAction({ actionId: action?.id ?? "" });
    expect(again.action?.state).toBe(ActionState.CANCELLED);

    const events = await t.client(EventService).listEvents({ actionId: action?.id ?? "" });
    expect(events.events.map((e) => e.kind)).toEqual([
      EventKind.ACTION_SUBMITTED,
      EventKind.ACTION_CANCELLED,
    ]);
  });

  it("cancels a run's queued and leased actions in calls of at most `limit`, revoking the leased ones, and nothing else", async () => {
    const w = await connectWorker(t.address, { workerId: "bulk-cancel", cluster: "bulk", capacity: 2 });
    try {
      const submit = (runId: string) => api.submitAction({ cluster: "bulk", runId });
      const leased: string[] = [];
      for (const _ of [1, 2]) {
        const id = (await submit("doomed")).action?.id ?? "";
        await w.next("grant", (g) => g.actionId === id);
        leased.push(id);
      }
      // The worker is full: these stay queued.
      const queued: string[] = [];
      for (const _ of [1, 2, 3]) queued.push((await submit("doomed")).action?.id ?? "");
      const spared = (await submit("kept")).action?.id ?? "";
      const elsewhere = (await api.submitAction({ cluster: "bulk-other", runId: "doomed" })).action?.id ?? "";

      const request = { cluster: "bulk", runId: "doomed", reason: "bad batch", limit: 3 };
      const first = await api.cancelActions(request);
      // In id order: the two leased ones came first.
      expect(first).toMatchObject({ cancelledIds: [queued[0]], cancelRequestedIds: leased, more: true });
      for (const id of leased) {
        const revoke = await w.next("revoke", (r) => r.actionId === id);
        expect(revoke.message).toMatch(/cancelled: bad batch/);
      }
      const second = await api.cancelActions(request);
      expect(second).toMatchObject({ cancelledIds: queued.slice(1), cancelRequestedIds: [], more: false });
      // Nothing is left to match: a retry changes nothing.
      expect(await api.cancelActions(request)).toMatchObject({
        cancelledIds: [],
        cancelRequestedIds: [],
        more: false,
      });

      const state = async (id: string) => (await api.getAction({ actionId: id })).action;
      for (const id of queued)
        expect(await state(id)).toMatchObject({
          state: ActionState.CANCELLED,
          failureReason: "action cancelled: bad batch",
        });
      for (const id of leased)
        expect(await state(id)).toMatchObject({ state: ActionState.LEASED, cancelRequested: true });
      expect((await state(spared))?.state).toBe(ActionState.QUEUED);
      expect((await state(elsewhere))?.state).toBe(ActionState.QUEUED);
      const events = await t.client(EventService).listEvents({ actionId: leased[0] ?? "" });
      expect(events.events.map((e) => e.kind)).toContain(EventKind.ACTION_CANCEL_REQUESTED);

      // By id, and by state: the spared one, queued, is cancelled only when named.
      expect(
        await api.cancelActions({ cluster: "bulk", actionIds: [spared], state: ActionState.LEASED }),
      ).toMatchObject({ cancelledIds: [], cancelRequestedIds: [] });
      expect(await api.cancelActions({ cluster: "bulk", actionIds: [spared] })).toMatchObject({
        cancelledIds: [spared],
      });
    } finally {
      w.goodbye();
      await w.ended;
    }
  });

  it("refuses a bulk cancel that does not say what it means", async () => {
    const refused = async (
      request: Parameters<typeof api.cancelActions>[0],
      field: string,
      message: RegExp,
    ) => {
      const error = await expectStatus(api.cancelActions(request), Code.InvalidArgument, message);
      expect(error.fields).toContain(field);
    };
    await refused({ cluster: "bulk" }, "all", /all: must be true to cancel every action of the cluster/);
    await refused({ runId: "r" }, "cluster", /cluster: is required/);
    await refused(
      { cluster: "bulk", all: true, state: ActionState.SUCCEEDED },
      "state",
      /must be QUEUED or LEASED/,
    );
    await refused({ cluster: "bulk", all: true, limit: 1001 }, "limit", /must be 1–1000/);
    await refused({ cluster: "bulk", actionIds: ["a", "a"] }, "action_ids[1]", /repeats "a"/);
  });

  it("streams an action's state and ends once it is cancelled", async () => {
    const { action } = await api.submitAction({ cluster: "watched" });
    const id = action?.id ?? "";
    const states: ActionState[] = [];
    const watching = (async () => {
      for await (const message of api.watchAction({ actionId: id })) {
        states.push(message.action?.state ?? ActionState.UNSPECIFIED);
        if (states.length === 1) await api.cancelAction({ actionId: id });
      }
    })();
    await watching;
    expect(states).toEqual([ActionState.QUEUED, ActionState.CANCELLED]);
  });

  it("leaves out the oldest details when an action with its attempts passes what a client reads", async () => {
    const w = await connectWorker(t.address, { workerId: "failing", cluster: "big-errors", capacity: 1 });
    try {
      const { action } = await api.submitAction({
        cluster: "big-errors",
        retryPolicy: { maxAttempts: 6, initialBackoff: {} },
      });
      const id = action?.id ?? "";
      // Six failures of 0.9 MB each, every one within the limits of a report: 6.3 MB together.
      const details = { stderr: "e".repeat(900_000) };
      for (let epoch = 1n; epoch <= 6n; epoch++) {
        const grant = await w.next("grant", (g) => g.actionId === id && g.epoch === epoch);
        const result = await w.complete(grant, { error: `attempt ${epoch}`, retryable: true, details });
        expect(result.accepted).toBe(true);
      }
      const got = await api.getAction({ actionId: id });
      expect(got.action?.state).toBe(ActionState.FAILED);
      expect(got.omitted).toEqual([0, 1, 2, 3].map((i) => `attempts[${i}].error.details`));
      expect(got.attempts.map((a) => a.error?.details !== undefined)).toEqual([
        false,
        false,
        false,
        false,
        true,
        true,
      ]);
      expect(got.attempts.map((a) => a.error?.message)).toEqual(
        [1, 2, 3, 4, 5, 6].map((n) => `attempt ${n}`),
      );
      expect(got.action?.lastError?.details).toEqual(details);
      expect(toBinary(GetActionResponseSchema, got).byteLength).toBeLessThanOrEqual(3 * 1024 * 1024);

      const explained = await api.explainAction({ actionId: id });
      expect(explained.omitted).toEqual([0, 1, 2, 3].map((i) => `attempts[${i}].attempt.error.details`));
      expect(toBinary(ExplainActionResponseSchema, explained).byteLength).toBeLessThanOrEqual(
        3 * 1024 * 1024,
      );
    } finally {
      w.drop();
    }
  });

  it("leaves out the oldest attempts' messages too when their details were not enough", async () => {
    const w = await connectWorker(t.address, {
      workerId: "long-messages",
      cluster: "big-messages",
      capacity: 1,
    });
    try {
      const { action } = await api.submitAction({
        cluster: "big-messages",
        retryPolicy: { maxAttempts: 40, initialBackoff: {} },
      });
      const id = action?.id ?? "";
      // Forty failures of 120 KB messages (60,000 two-byte characters): 4.8 MB without any details.
      for (let epoch = 1n; epoch <= 40n; epoch++) {
        const grant = await w.next("grant", (g) => g.actionId === id && g.epoch === epoch);
        const result = await w.complete(grant, { error: `${epoch} ${"é".repeat(60_000)}`, retryable: true });
        expect(result.accepted).toBe(true);
      }
      for (const got of [await api.getAction({ actionId: id }), await api.explainAction({ actionId: id })]) {
        expect(got.omitted.length).toBeGreaterThan(10);
        expect(got.omitted.every((p) => /^attempts\[\d+\](\.attempt)?\.error\.message$/.test(p))).toBe(true);
      }
      const got = await api.getAction({ actionId: id });
      // The oldest went first: the newest keep theirs.
      expect(got.attempts.at(-1)?.error?.message.startsWith("40 ")).toBe(true);
      expect(got.attempts[0]?.error?.message).toBe("");
      expect(toBinary(GetActionResponseSchema, got).byteLength).toBeLessThanOrEqual(3 * 1024 * 1024);
    } finally {
      w.drop();
    }
  });

  it("leaves out an action's phase details where it alone passes what a client reads, in every answer holding it", async () => {
    const w = await connectWorker(t.address, { workerId: "huge", cluster: "huge-action", capacity: 1 });
    try {
      // A million characters of three bytes each: 3 MB as sent, within a Struct's limits.
      const payload = { text: "€".repeat(1_000_000) };
      const { action } = await api.submitAction({ cluster: "huge-action", payload });
      const id = action?.id ?? "";
      const grant = await w.next("grant", (g) => g.actionId === id);
      const details = { line: "€".repeat(1_000_000) };
      w.send({
        message: {
          case: "progress",
          value: { reportId: 1n, actionId: id, epoch: grant.epoch, phase: "big", details },
        },
      });
      expect(await w.next("reportResult", (r) => r.reportId === 1n)).toMatchObject({ accepted: true });
      // 6 MB as a whole: ListActions, WatchAction and CancelAction sent it so, and the client refused it.
      const under = 3 * 1024 * 1024;
      const listed = await api.listActions({ cluster: "huge-action" });
      expect(listed.actions.map((a) => [a.id, a.phase, a.payload])).toEqual([[id, "big", payload]]);
      expect(listed.omitted).toEqual(["actions[0].phase_details"]);
      expect(toBinary(ListActionsResponseSchema, listed).byteLength).toBeLessThanOrEqual(under);
      for await (const watched of api.watchAction({ actionId: id })) {
        expect(watched.action?.phaseDetails).toBeUndefined();
        expect(watched.omitted).toEqual(["action.phase_details"]);
        expect(toBinary(WatchActionResponseSchema, watched).byteLength).toBeLessThanOrEqual(under);
        break;
      }
      const cancelled = await api.cancelAction({ actionId: id });
      expect(cancelled.action?.cancelRequested).toBe(true);
      expect(cancelled.omitted).toEqual(["action.phase_details"]);
      expect(toBinary(CancelActionResponseSchema, cancelled).byteLength).toBeLessThanOrEqual(under);
      // An action that fits is answered whole.
      const { action: small } = await api.submitAction({ cluster: "huge-action" });
      expect((await api.cancelAction({ actionId: small?.id ?? "" })).omitted).toEqual([]);
    } finally {
      w.drop();
    }
  });

  it("answers NOT_FOUND for an unknown action on get, cancel and watch", async () => {
    const id = "01900000-0000-7000-8000-000000000000";
    await expectStatus(api.getAction({ actionId: id }), Code.NotFound, /action "01900000-.*" not found/);
    await expectStatus(api.cancelAction({ actionId: id }), Code.NotFound, /not found/);
    await expectStatus(
      (async () => {
        for await (const _ of api.watchAction({ actionId: id })) {
          // no message expected
        }
      })(),
      Code.NotFound,
      /not found/,
    );
  });

  describe("rejects invalid input with INVALID_ARGUMENT naming the field", () => {
    const cases: [string, Parameters<typeof api.submitAction>[0], RegExp][] = [
      ["a missing cluster", {}, /^cluster: is required/],
      ["a cluster with spaces", { cluster: "my cluster" }, /^cluster: may contain only letters/],
      ["a cluster name too long", { cluster: "x".repeat(129) }, /^cluster: must be at most 128 characters/],
      [
        "a priority out of range",
        { cluster: "c", priority: 5000 },
        /^priority: must be between -1000 and 1000/,
      ],
      [
        "a request id too long",
        { cluster: "c", requestId: "r".repeat(129) },
        /^request_id: must be at most 128/,
      ],
      [
        "a bad label key",
        { cluster: "c", labelSelector: { "bad key": "v" } },
        /^label_selector\["bad key"\]: keys must be/,
      ],
      [
        "too many attempts",
        { cluster: "c", retryPolicy: { maxAttempts: 1000 } },
        /^retry_policy\.max_attempts: must be at most 100/,
      ],
      [
        "a negative backoff",
        { cluster: "c", retryPolicy: { initialBackoff: { seconds: -1n } } },
        /^retry_policy\.initial_backoff: must not be negative/,
      ],
      [
        "a multiplier below 1",
        { cluster: "c", retryPolicy: { backoffMultiplier: 0.5 } },
        /^retry_policy\.backoff_multiplier: must be between 1 and 100/,
      ],
      [
        "max backoff below initial backoff",
        { cluster: "c", retryPolicy: { initialBackoff: { seconds: 10n }, maxBackoff: { seconds: 1n } } },
        /^retry_policy\.max_backoff: must not be shorter/,
      ],
      [
        "too many system retries",
        { cluster: "c", maxSystemRetries: 101 },
        /^max_system_retries: must be at most 100/,
      ],
    ];
    it.each(cases)("%s", async (_name, request, message) => {
      const f = await expectStatus(api.submitAction(request), Code.InvalidArgument, message);
      expect(f.fields.length).toBeGreaterThan(0);
    });

    it("a List or Watch filter that no cluster name could match, rather than an empty page", async () => {
      const expected = /^cluster: may contain only letters, digits/;
      await expectStatus(api.listActions({ cluster: "my cluster" }), Code.InvalidArgument, expected);
      await expectStatus(
        t.client(EventService).listEvents({ cluster: "my cluster" }),
        Code.InvalidArgument,
        expected,
      );
      await expectStatus(
        t.client(ClusterService).listWorkers({ cluster: "my cluster" }),
        Code.InvalidArgument,
        expected,
      );
    });

    it("a payload over 1 MiB is RESOURCE_EXHAUSTED, naming the field", async () => {
      const f = await expectStatus(
        api.submitAction({ cluster: "c", payload: { blob: "x".repeat(1024 * 1024) } }),
        Code.ResourceExhausted,
        /^payload: must be at most 1 MiB as JSON/,
      );
      expect(f).toMatchObject({ reason: "PAYLOAD_TOO_LARGE", fields: ["payload"] });
    });

    it("a payload shaped like a deployment: the key is reserved for CreateDeployment, nothing is queued", async () => {
      const payload = {
        deployment: { id: "fake", leaseId: "", spec: { inputs: [{ fileId: "someone-elses", path: "x" }] } },
      };
      const f = await expectStatus(
        api.submitAction({ cluster: "reserved", payload }),
        Code.InvalidArgument,
        /^payload\.deployment: is reserved for deployments of scope leases; create them with ResourceService\.CreateDeployment/,
      );
      expect(f.fields).toEqual(["payload.deployment"]);
      // Whatever its value: the key alone is refused.
      await expectStatus(
        api.submitAction({ cluster: "reserved", payload: { deployment: null } }),
        Code.InvalidArgument,
        /^payload\.deployment: is reserved/,
      );
      expect((await api.listActions({ cluster: "reserved" })).actions).toEqual([]);
      // Nested deeper, the key is an ordinary payload field.
      const { action } = await api.submitAction({ cluster: "reserved", payload: { job: { deployment: 1 } } });
      expect(action?.payload).toEqual({ job: { deployment: 1 } });
    });

    it("lists every violation of a request at once", async () => {
      const f = await expectStatus(
        api.submitAction({ cluster: "", priority: -5000 }),
        Code.InvalidArgument,
        /^cluster: is required; priority: must be between/,
      );
      expect(f.fields).toEqual(["cluster", "priority"]);
    });

    it("an empty action id on get, cancel and watch", async () => {
      await expectStatus(api.getAction({}), Code.InvalidArgument, /^action_id: is required/);
      await expectStatus(api.cancelAction({}), Code.InvalidArgument, /^action_id: is required/);
    });

    it("a page size out of range", async () => {
      await expectStatus(
        api.listActions({ pageSize: 5000 }),
        Code.InvalidArgument,
        /^page_size: must be at most 1000/,
      );
      await expectStatus(
        api.listActions({ pageSize: -1 }),
        Code.InvalidArgument,
        /^page_size: must not be negative/,
      );
    });

    it("an unknown state filter", async () => {
      await expectStatus(
        api.listActions({ state: 42 as ActionState }),
        Code.InvalidArgument,
        /^state: is not a known/,
      );
    });
  });
});
