import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RoleBinding } from "../../src/auth/access.js";
import { Code } from "../../src/errors.js";
import {
  ActionService,
  ActionState,
  ActionView,
  type SubmitActionRequestSchema,
  SubmitActionsRequestSchema,
  SubmitActionsResponseSchema,
} from "../../src/gen/leasehold/v1/action_pb.js";
import type { Client } from "../../src/rpc/client.js";
import { LARGE_REQUEST_BYTES } from "../../src/rpc/large-calls.js";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { deferred } from "../helpers/deferred.js";
import { as, policyAccess } from "../helpers/principals.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

type Item = MessageInitShape<typeof SubmitActionRequestSchema>;

const submitter = (clusters: string[]): RoleBinding[] => [{ role: "submitter", clusters, workerIds: "*" }];
/** Principals of the test seam: alice may submit to every bulk-* cluster, bob only to bulk-a. */
const POLICY: Record<string, RoleBinding[]> = {
  alice: [...submitter(["bulk-*"]), { role: "agent", clusters: ["bulk-*"], workerIds: "*" }],
  bob: submitter(["bulk-a"]),
};
describe("ActionService.SubmitActions", () => {
  let t: TestServer;
  let db: Db;
  let api: Client<(typeof ActionService)["method"]>;
  /** Statements the server ran, for counting what one call costs. */
  const statements: string[] = [];
  /**
   * The statements of submits among `statements`: the server's sweeps and dispatch run
   * theirs meanwhile, more of them the longer a call takes on a busy machine.
   */
  const ownStatements = () => statements.filter((q) => /\bjson_to_recordset|request_id in/i.test(q.trim()));
  /** Transactions the server began for bulk submits. */
  let transactions = 0;
  /** Bulk submits' transactions open now, and the most open at once. */
  let openTransactions = 0;
  let mostOpenTransactions = 0;
  /** When set, the next bulk submit's transaction starts once it resolves. */
  let holdNextSubmit: Promise<void> | undefined;

  const count = async (where: ReturnType<typeof sql>) => {
    const [row] = await queryRows<{ n: unknown }>(db, sql`select count(*) as n from actions where ${where}`);
    return Number(row?.n);
  };
  const submittedEvents = async (ids: readonly string[]) =>
    queryRows<{ action_id: string; actor: string; cluster: string }>(
      db,
      sql`select action_id, actor, cluster from events where kind = 'action_submitted'
            and action_id in (select jsonb_array_elements_text(${JSON.stringify(ids)}::jsonb))
          order by sequence`,
    );

  beforeAll(async () => {
    t = await startTestServer({
      overrides: {
        accessOf: policyAccess(POLICY),
        onQuery: (query) => statements.push(query),
        wrapDb: (handle) => {
          db = handle;
          // Wrapped in place: the same object keeps its prepared-statement runner. Only the
          // submit's transactions count (the server's sweeps open their own meanwhile).
          const transaction = handle.transaction.bind(handle);
          handle.transaction = ((...args: Parameters<typeof transaction>) => {
            if (!new Error().stack?.includes("insertActionsAtomically")) return transaction(...args);
            transactions++;
            mostOpenTransactions = Math.max(mostOpenTransactions, ++openTransactions);
            const hold = holdNextSubmit ?? Promise.resolve();
            holdNextSubmit = undefined;
            return hold.then(() => transaction(...args)).finally(() => openTransactions--);
          }) as typeof handle.transaction;
          return handle;
        },
      },
    });
    api = t.client(ActionService);
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("queues 1,000 actions in a few statements, answering in request order, with their events", async () => {
    const items: Item[] = Array.from({ length: 1000 }, (_, i) => ({
      cluster: i % 2 === 0 ? "bulk-a" : "bulk-b",
      requestId: `happy-${i}`,
      runId: "happy",
      payload: { n: i },
      priority: i % 7,
      labelSelector: { zone: `z${i % 3}` },
    }));
    statements.length = 0;
    const { results } = await api.submitActions({ actions: items }, as("alice"));
    const statementsOfCall = ownStatements().length;

    expect(results).toHaveLength(1000);
    results.forEach((r, i) => {
      expect(r.created).toBe(true);
      expect(r.action).toMatchObject({
        requestId: `happy-${i}`,
        cluster: i % 2 === 0 ? "bulk-a" : "bulk-b",
        payload: { n: i },
        priority: i % 7,
        labelSelector: { zone: `z${i % 3}` },
        state: ActionState.QUEUED,
        createdBy: "alice",
      });
    });
    // Set-based: a lookup and one insert (with its events), not a statement per item.
    expect(statementsOfCall).toBe(2);
    expect(await count(sql`run_id = 'happy' and state = 'QUEUED' and created_by = 'alice'`)).toBe(1000);
    const ids = results.map((r) => r.action?.id ?? "");
    const events = await submittedEvents(ids);
    expect(events.map((e) => e.action_id)).toEqual(ids);
    expect(new Set(events.map((e) => e.actor))).toEqual(new Set(["alice"]));
  });

  it("answers each submitted action as GetAction reads it back, and without request ids runs one statement", async () => {
    // The answer is built from the request and the few columns the insert reads back;
    // it must not differ from the stored row in any field.
    const items: Item[] = [
      { cluster: "bulk-a" },
      {
        cluster: "bulk-b",
        runId: "as-stored",
        payload: {
          n: 1.5,
          s: 'x "q" \\ \n \u2028 é 🙂',
          nested: { list: [1, "two", null, true] },
          empty: {},
        },
        priority: -3,
        labelSelector: { zone: "z1", disk: "ssd" },
        retryPolicy: { maxAttempts: 7, initialBackoff: { seconds: 2n }, maxBackoff: { seconds: 30n } },
        maxSystemRetries: 9,
      },
      // Each retry setting left at its default travels as nothing and is filled in by the statement.
      {
        cluster: "bulk-a",
        runId: 'run "quoted" \\ é',
        retryPolicy: { maxAttempts: 3, backoffMultiplier: 1.5 },
        maxSystemRetries: 3,
      },
    ];
    statements.length = 0;
    const before = transactions;
    const bulk = await api.submitActions({ actions: items }, as("alice"));
    expect(ownStatements()).toHaveLength(1);
    expect(transactions - before).toBe(0);
    const withId = await api.submitActions(
      { actions: items.map((item, i) => ({ ...item, requestId: `as-stored-${i}` })) },
      as("alice"),
    );
    // With request ids: a lookup and the insert, in one transaction.
    expect(ownStatements()).toHaveLength(3);
    expect(transactions - before).toBe(1);
    const single = await api.submitAction({ ...items[1], requestId: "as-stored-single" }, as("alice"));
    for (const answered of [...bulk.results, ...withId.results].map((r) => r.action).concat(single.action)) {
      const { action: stored } = await api.getAction({ actionId: answered?.id ?? "" }, as("alice"));
      expect(answered).toEqual(stored);
    }
  });

  it("answers with the fields that name each action under ACTION_VIEW_BASIC, and refuses an unknown view", async () => {
    const items: Item[] = Array.from({ length: 3 }, (_, i) => ({
      cluster: "bulk-a",
      requestId: `basic-${i}`,
      runId: "basic",
      payload: { n: i },
      priority: 5,
    }));
    const { results } = await api.submitActions({ actions: items, view: ActionView.BASIC }, as("alice"));
    results.forEach((r, i) => {
      expect(r.created).toBe(true);
      expect(r.action).toMatchObject({
        requestId: `basic-${i}`,
        runId: "basic",
        cluster: "bulk-a",
        state: ActionState.QUEUED,
        createdBy: "alice",
      });
      expect(r.action?.id).toMatch(/./);
      expect(r.action?.createTime).toBeDefined();
      // Nothing of the action's content.
      expect(r.action?.payload).toBeUndefined();
      expect(r.action?.retryPolicy).toBeUndefined();
      expect(r.action?.priority).toBe(0);
    });
    // A retry under the basic view names the same actions; the full view shows their content.
    const again = await api.submitActions({ actions: items, view: ActionView.FULL }, as("alice"));
    expect(again.results.map((r) => [r.action?.id, r.created, r.action?.payload])).toEqual(
      results.map((r, i) => [r.action?.id, false, { n: i }]),
    );
    await expectStatus(
      api.submitActions(
        { actions: [{ cluster: "bulk-a", runId: "basic" }], view: 7 as ActionView },
        as("alice"),
      ),
      Code.InvalidArgument,
      /view: is not a known ActionView \(7\)/,
    );
    expect(await count(sql`run_id = 'basic'`)).toBe(3);
  });

  it("answers a retried call with the same actions, created false, and creates nothing twice", async () => {
    const items: Item[] = Array.from({ length: 20 }, (_, i) => ({
      cluster: "bulk-a",
      requestId: `retry-${i}`,
      runId: "retry",
      payload: { n: i },
    }));
    const first = await api.submitActions({ actions: items }, as("alice"));
    // The retry also carries one new item without a request id, and one with a new id.
    const again = await api.submitActions(
      { actions: [...items, { cluster: "bulk-a", runId: "retry" }, { ...items[0], requestId: "retry-new" }] },
      as("alice"),
    );
    expect(first.results.every((r) => r.created)).toBe(true);
    expect(again.results.slice(0, 20).map((r) => [r.action?.id, r.created])).toEqual(
      first.results.map((r) => [r.action?.id, false]),
    );
    expect(again.results.slice(20).map((r) => r.created)).toEqual([true, true]);
    expect(await count(sql`run_id = 'retry'`)).toBe(22);
    // A single SubmitAction retry of an item finds the same action.
    const single = await api.submitAction(items[3] as Item, as("alice"));
    expect([single.action?.id, single.created]).toEqual([first.results[3]?.action?.id, false]);
  });

  it("keeps request ids per principal: another principal's bulk call gets its own actions", async () => {
    const item: Item = { cluster: "bulk-a", requestId: "shared-id", runId: "shared" };
    const alices = await api.submitActions({ actions: [item] }, as("alice"));
    const bobs = await api.submitActions({ actions: [item] }, as("bob"));
    expect(bobs.results[0]?.created).toBe(true);
    expect(bobs.results[0]?.action?.id).not.toBe(alices.results[0]?.action?.id);
    expect(bobs.results[0]?.action?.createdBy).toBe("bob");
  });

  it("refuses a request id reused for a different request with ALREADY_EXISTS naming the item, queuing nothing", async () => {
    await api.submitAction({ cluster: "bulk-a", requestId: "taken", payload: { n: 1 } }, as("alice"));
    const f = await expectStatus(
      api.submitActions(
        {
          actions: [
            { cluster: "bulk-a", requestId: "conflict-0", runId: "conflict" },
            { cluster: "bulk-a", runId: "conflict" },
            { cluster: "bulk-a", requestId: "taken", runId: "conflict", payload: { n: 2 } },
          ],
        },
        as("alice"),
      ),
      Code.AlreadyExists,
      /^actions\[2\]\.request_id: "taken" was already used for a different request/,
    );
    expect(f.reason).toBe("REQUEST_ID_REUSED");
    expect(await count(sql`run_id = 'conflict'`)).toBe(0);
  });

  it("refuses two items sharing a request id with INVALID_ARGUMENT", async () => {
    const f = await expectStatus(
      api.submitActions(
        {
          actions: [
            { cluster: "bulk-a", requestId: "twice", runId: "twice" },
            { cluster: "bulk-b", requestId: "once", runId: "twice" },
            { cluster: "bulk-b", requestId: "twice", runId: "twice" },
          ],
        },
        as("alice"),
      ),
      Code.InvalidArgument,
      /^actions\[2\]\.request_id: repeats the request_id of actions\[0\]/,
    );
    expect(f.fields).toEqual(["actions[2].request_id"]);
    expect(await count(sql`run_id = 'twice'`)).toBe(0);
  });

  it("refuses an invalid item with INVALID_ARGUMENT naming its fields by index, queuing nothing", async () => {
    const actions: Item[] = Array.from({ length: 10 }, () => ({ cluster: "bulk-a", runId: "invalid" }));
    actions[3] = { cluster: "bad cluster", runId: "invalid", priority: 5000 };
    actions[7] = { cluster: "bulk-a", runId: "invalid", payload: { deployment: {} } };
    const f = await expectStatus(
      api.submitActions({ actions }, as("alice")),
      Code.InvalidArgument,
      /^actions\[3\]\.cluster: may contain only letters/,
    );
    expect(f.fields).toEqual(["actions[3].cluster", "actions[3].priority", "actions[7].payload.deployment"]);
    expect(await count(sql`run_id = 'invalid'`)).toBe(0);
  });

  it("refuses a payload over its limits with RESOURCE_EXHAUSTED naming the item", async () => {
    const f = await expectStatus(
      api.submitActions(
        {
          actions: [
            { cluster: "bulk-a", runId: "large" },
            { cluster: "bulk-a", runId: "large", payload: { blob: "x".repeat(1024 * 1024) } },
          ],
        },
        as("alice"),
      ),
      Code.ResourceExhausted,
      /^actions\[1\]\.payload: must be at most 1 MiB as JSON/,
    );
    expect(f.fields).toEqual(["actions[1].payload"]);
    expect(await count(sql`run_id = 'large'`)).toBe(0);
  });

  it("refuses, queuing nothing, a call whose answer in view FULL no default client could read", async () => {
    // 4.1 MB of request: under the server's receive limit, but echoed whole by the FULL answer.
    const items = (runId: string): Item[] =>
      Array.from({ length: 1000 }, () => ({ cluster: "bulk-a", runId, payload: { s: "x".repeat(4100) } }));
    const f = await expectStatus(
      api.submitActions({ actions: items("echoed") }, as("alice")),
      Code.ResourceExhausted,
      /^view: the answer in view ACTION_VIEW_FULL would take up to 4\.\d MiB, over the 4 MiB default gRPC clients accept; ask for view ACTION_VIEW_BASIC/,
    );
    expect(f.fields).toEqual(["view"]);
    expect(await count(sql`run_id = 'echoed'`)).toBe(0);
    const basic = await api.submitActions({ actions: items("named"), view: ActionView.BASIC }, as("alice"));
    expect(basic.results).toHaveLength(1000);
    expect(await count(sql`run_id = 'named'`)).toBe(1000);
  });

  it("refuses, queuing nothing, a retried call whose earlier actions' answer no default client could read", async () => {
    // Six actions with request ids finish with 0.9 MB outputs: a retry of the call answers them.
    const items: Item[] = Array.from({ length: 6 }, (_, i) => ({
      cluster: "bulk-out",
      requestId: `out-${i}`,
    }));
    const worker = await connectWorker(
      t.address,
      { workerId: "out-w", cluster: "bulk-out", capacity: 6 },
      as("alice"),
    );
    try {
      await api.submitActions({ actions: items, view: ActionView.BASIC }, as("alice"));
      for (let i = 0; i < 6; i++) {
        const grant = await worker.next("grant");
        expect(await worker.complete(grant, { output: { log: "o".repeat(900_000) } })).toMatchObject({
          accepted: true,
        });
      }
    } finally {
      worker.goodbye();
      await worker.ended;
    }
    const retried = [...items, { cluster: "bulk-out", runId: "with-retries" }];
    const f = await expectStatus(
      api.submitActions({ actions: retried }, as("alice")),
      Code.ResourceExhausted,
      /^view: the answer in view ACTION_VIEW_FULL would take 5\.\d MiB, over the 4 MiB default gRPC clients accept/,
    );
    expect(f.fields).toEqual(["view"]);
    expect(await count(sql`run_id = 'with-retries'`)).toBe(0);
    const basic = await api.submitActions({ actions: retried, view: ActionView.BASIC }, as("alice"));
    expect(basic.results.map((r) => r.created)).toEqual([false, false, false, false, false, false, true]);
  });

  it("answers in view FULL within the bound it checks: the request's size and 512 bytes an item", async () => {
    const actions: Item[] = Array.from({ length: 200 }, (_, i) => ({
      cluster: "bulk-a",
      runId: "bound",
      requestId: `bound-${i}`,
      labelSelector: { zone: "z1" },
      priority: 7,
      retryPolicy: { maxAttempts: 5, initialBackoff: { seconds: 1n }, maxBackoff: { seconds: 60n } },
      payload: { n: i },
    }));
    const request = create(SubmitActionsRequestSchema, { actions });
    const answer = await api.submitActions(request, as("alice"));
    const sizes = [SubmitActionsRequestSchema, SubmitActionsResponseSchema] as const;
    const [asked, answered] = [toBinary(sizes[0], request), toBinary(sizes[1], answer)];
    expect(answered.byteLength).toBeLessThanOrEqual(asked.byteLength + 512 * actions.length);
  });

  it("refuses an empty call and one of more than 1,000 items with INVALID_ARGUMENT", async () => {
    const empty = await expectStatus(
      api.submitActions({ actions: [] }, as("alice")),
      Code.InvalidArgument,
      /^actions: must hold at least 1 action/,
    );
    expect(empty.fields).toEqual(["actions"]);
    const tooMany = Array.from({ length: 1001 }, () => ({ cluster: "bulk-a", runId: "too-many" }));
    const over = await expectStatus(
      api.submitActions({ actions: tooMany }, as("alice")),
      Code.InvalidArgument,
      /^actions: must have at most 1000 elements \(got 1001\)/,
    );
    expect(over.fields).toEqual(["actions"]);
    expect(await count(sql`run_id = 'too-many'`)).toBe(0);
  });

  it("refuses the whole call with PERMISSION_DENIED when one item's cluster is not the caller's, queuing nothing", async () => {
    const f = await expectStatus(
      api.submitActions(
        {
          actions: [
            { cluster: "bulk-a", runId: "denied" },
            { cluster: "bulk-a", runId: "denied" },
            { cluster: "bulk-b", runId: "denied" },
          ],
        },
        as("bob"),
      ),
      Code.PermissionDenied,
      /^actions\[2\]\.cluster: "bob" lacks the right action\.submit in cluster "bulk-b"/,
    );
    expect(f.reason).toBe("PERMISSION_DENIED");
    expect(await count(sql`run_id = 'denied'`)).toBe(0);
  });

  it("wakes the scheduler: a connected worker is granted the bulk-submitted actions", async () => {
    const worker = await connectWorker(
      t.address,
      { workerId: "bulk-w", cluster: "bulk-wake", capacity: 3 },
      as("alice"),
    );
    try {
      const { results } = await api.submitActions(
        { actions: Array.from({ length: 3 }, () => ({ cluster: "bulk-wake" })) },
        as("alice"),
      );
      const ids = new Set(results.map((r) => r.action?.id));
      const granted = new Set<string>();
      while (granted.size < 3) granted.add((await worker.next("grant")).actionId);
      expect(granted).toEqual(ids);
    } finally {
      worker.goodbye();
      await worker.ended;
    }
  });

  it("creates each request id once when bulk calls race each other", async () => {
    const items: Item[] = Array.from({ length: 50 }, (_, i) => ({
      cluster: "bulk-a",
      requestId: `race-${i}`,
      runId: "race",
    }));
    // The same ids, in different orders, from four concurrent calls.
    const orders = [items, [...items].reverse(), items.slice(25).concat(items.slice(0, 25)), items];
    const outcomes = await Promise.all(orders.map((actions) => api.submitActions({ actions }, as("alice"))));
    const byRequestId = new Map<string, Set<string>>();
    let created = 0;
    for (const { results } of outcomes) {
      for (const r of results) {
        const set = byRequestId.get(r.action?.requestId ?? "") ?? new Set();
        set.add(r.action?.id ?? "");
        byRequestId.set(r.action?.requestId ?? "", set);
        if (r.created) created++;
      }
    }
    expect([...byRequestId.values()].every((s) => s.size === 1)).toBe(true);
    expect(created).toBe(50);
    expect(await count(sql`run_id = 'race'`)).toBe(50);
  });

  it("serves large calls one at a time, answering each, and a call that ends while it waits takes no turn", async () => {
    const blob = "x".repeat(3000);
    /** A call of about 300 KiB: over LARGE_REQUEST_BYTES, so it waits its turn. */
    const large = (tag: string) => ({
      actions: Array.from({ length: 100 }, (_, i) => ({
        cluster: "bulk-a",
        requestId: `large-${tag}-${i}`,
        runId: "large",
        payload: { blob },
      })),
      view: ActionView.BASIC,
    });
    expect(
      toBinary(SubmitActionsRequestSchema, create(SubmitActionsRequestSchema, large("size"))).length,
    ).toBeGreaterThan(LARGE_REQUEST_BYTES);
    const largeCalls = async () => {
      const text = await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
      const count = (state: string) =>
        Number(new RegExp(`^leasehold_large_calls\\{state="${state}"\\} (\\d+)$`, "m").exec(text)?.[1]);
      return { running: count("running"), waiting: count("waiting") };
    };
    // The first call's transaction waits until let go: the others must wait for its turn.
    const held = deferred<void>();
    holdNextSubmit = held.promise;
    mostOpenTransactions = 0;
    const before = transactions;
    const first = api.submitActions(large("a"), as("alice"));
    await expect.poll(() => transactions).toBe(before + 1);
    const rest = ["b", "c", "d"].map((tag) => api.submitActions(large(tag), as("alice")));
    const cancel = new AbortController();
    const cut = api
      .submitActions(large("cut"), { ...as("alice"), signal: cancel.signal })
      .catch((error: { code: number }) => error.code);
    await expect.poll(largeCalls).toEqual({ running: 1, waiting: 4 });
    expect(transactions).toBe(before + 1);
    // A waiting call that ends leaves the line; its turn goes to none.
    cancel.abort();
    await expect.poll(largeCalls).toEqual({ running: 1, waiting: 3 });
    held.resolve();
    const answers = await Promise.all([first, ...rest]);
    expect(answers.map((a) => a.results.filter((r) => r.created).length)).toEqual([100, 100, 100, 100]);
    expect(await cut).toBe(grpc.status.CANCELLED);
    expect(mostOpenTransactions).toBe(1);
    expect(await largeCalls()).toEqual({ running: 0, waiting: 0 });
    expect(await count(sql`run_id = 'large'`)).toBe(400);
  });
});
