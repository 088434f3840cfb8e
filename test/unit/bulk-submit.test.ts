import { create } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { chunkActionLines, MAX_ACTIONS_PER_CALL, parseActionLines } from "../../src/cli/action-lines.js";
import { printTable } from "../../src/cli/output.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { SubmitActionRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { toNewActions } from "../../src/rpc/services/action-service.js";
import { databaseClock } from "../../src/store/clock.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import { type ActionService, createActionService } from "../../src/work/action-service.js";
import { type ChangeFeed, createChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC } from "../../src/work/change-feed.js";

describe("bulk submission on PGlite", () => {
  let database: Database;
  let feed: ChangeFeed;
  let actions: ActionService;
  beforeAll(async () => {
    database = await openDatabase({ dataDir: "memory://" });
    feed = createChangeFeed();
    actions = createActionService({ db: database.db, clock: databaseClock, feed });
  });
  afterAll(async () => {
    await actions?.close();
    await database?.close();
  });

  const items = (n: number, prefix: string) =>
    toNewActions(
      Array.from({ length: n }, (_, i) =>
        create(SubmitActionRequestSchema, { cluster: "unit", requestId: `${prefix}-${i}` }),
      ),
    );

  it("wakes the scheduler and the event watchers once per call, and not for a call that created nothing", async () => {
    let queueWakeups = 0;
    let eventWakeups = 0;
    const offQueue = feed.subscribe(QUEUE_TOPIC, () => queueWakeups++);
    const offEvents = feed.subscribe(EVENTS_TOPIC, () => eventWakeups++);
    try {
      const batch = await items(500, "wake");
      const first = await actions.submitMany(batch, "alice");
      expect(first.map((r) => r.action.requestId)).toEqual(batch.map((a) => a.requestId));
      expect([queueWakeups, eventWakeups]).toEqual([1, 1]);
      const again = await actions.submitMany(batch, "alice");
      expect(again.every((r) => !r.created)).toBe(true);
      expect([queueWakeups, eventWakeups]).toEqual([1, 1]);
    } finally {
      offQueue();
      offEvents();
    }
  });

  it("refuses a request id reused with a different request, naming the item", async () => {
    await actions.submitMany(await items(3, "reuse"), "alice");
    const changed = (await items(3, "reuse")).map((a, i) => (i === 1 ? { ...a, requestHash: "other" } : a));
    const error = await actions.submitMany(changed, "alice").catch((e: unknown) => e);
    expect(error).toBeInstanceOf(LeaseholdError);
    expect(error).toMatchObject({
      code: Code.AlreadyExists,
      reason: "REQUEST_ID_REUSED",
      metadata: { field: "actions[1].request_id", request_id: "reuse-1" },
    });
  });
});

describe("submit --from lines", () => {
  it("splits lines into calls of at most 1,000 actions", () => {
    const text = Array.from({ length: 2500 }, (_, i) => JSON.stringify({ argv: ["echo", String(i)] })).join(
      "\n",
    );
    const chunks = chunkActionLines(parseActionLines(text, { cluster: "c", labels: {} }));
    expect(chunks.map((c) => c.length)).toEqual([MAX_ACTIONS_PER_CALL, MAX_ACTIONS_PER_CALL, 500]);
    expect(chunks[2]?.[0]?.line).toBe(2001);
  });

  it("splits large payloads into calls under the byte limit", () => {
    const blob = "x".repeat(512 * 1024);
    const text = Array.from({ length: 10 }, () => JSON.stringify({ payload: { blob } })).join("\n");
    const chunks = chunkActionLines(parseActionLines(text, { cluster: "c", labels: {} }));
    // Six payloads of 512 KiB (plus their framing) pass MAX_BYTES_PER_CALL (3 MiB): five per call.
    expect(chunks.map((c) => c.length)).toEqual([5, 5]);
    expect(chunks.flat().map((c) => c.line)).toEqual(Array.from({ length: 10 }, (_, i) => i + 1));
  });

  it("refuses a request id that two lines give, before anything is sent", () => {
    const line = (id: string, n: number) => JSON.stringify({ requestId: id, argv: ["echo", String(n)] });
    const text = [line("a", 1), line("b", 2), line("c", 3), line("b", 4)].join("\n");
    expect(() => parseActionLines(text, { cluster: "c", labels: {} })).toThrow(
      /^line 4: request id "b" repeats line 2's: give each line its own$/,
    );
  });

  it("names the line of a bad one", () => {
    const parse = (text: string) => () => parseActionLines(text, { labels: {} });
    expect(parse('{"cluster":"c","argv":["a"]}\n[1]')).toThrow(/^line 2: must be a JSON object/);
    expect(parse('{"cluster":"c","argv":["a"],"payload":{}}')).toThrow(
      /^line 1: give either "argv" or "payload"/,
    );
    expect(parse('{"cluster":"c","payload":{},"timeout":3}')).toThrow(/^line 1: "timeout" goes with "argv"/);
    // Node's timers hold at most 24.8 days: a longer timeout would kill the command at once.
    for (const timeout of [0, 2.5, 3_000_000])
      expect(parse(`{"cluster":"c","argv":["a"],"timeout":${timeout}}`)).toThrow(
        /^line 1: "timeout" must be a whole number of seconds, 1 to 2147483$/,
      );
    expect(parse('{"cluster":"c","argv":["a"],"priority":"high"}')).toThrow(/^line 1: .*priority/);
    expect(parse("\n\n")).toThrow(/no actions to submit/);
  });
});

describe("printTable", () => {
  it("prints 200,000 rows (its widths once overflowed the stack)", () => {
    let printed = 0;
    const spy = vi.spyOn(process.stdout, "write").mockImplementation(() => {
      printed++;
      return true;
    });
    try {
      printTable(
        ["ID", "NAME"],
        Array.from({ length: 200_000 }, (_, i) => [String(i), "x"]),
      );
    } finally {
      spy.mockRestore();
    }
    expect(printed).toBe(200_001);
  });
});
