import { toBinary } from "@bufbuild/protobuf";
import { type SQL, sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { EventService, ListEventsResponseSchema } from "../../src/gen/leasehold/v1/event_pb.js";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { PAGE_BYTES } from "../../src/work/page.js";
import { everyPage } from "../helpers/pages.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { failure } from "../helpers/status.js";

/**
 * ListEvents and WatchEvents answer in messages a default client can read
 * (4 MiB): pages end early by their size, and an event too large to send
 * alone is refused with the way past it.
 */
describe("events larger than an answer", () => {
  let t: TestServer;
  let db: Db | undefined;
  const events = () => t.client(EventService);

  beforeAll(async () => {
    t = await startTestServer({ overrides: { timers: false, wrapDb: (d) => (db = d) } });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  /** Stores `count` events of `cluster` made by `columns` (message, details), oldest first; their sequences. */
  async function insert(count: number, cluster: string, message: SQL, details: SQL): Promise<number[]> {
    const rows = await queryRows<{ sequence: unknown }>(
      db as Db,
      sql`insert into events (kind, cluster, message, details)
          select 'action_failed', ${cluster}, ${message}, ${details} from generate_series(1, ${count})
          returning sequence`,
    );
    return rows.map((r) => Number(r.sequence)).sort((a, b) => a - b);
  }

  /** Every page of a listing with the default client: each under PAGE_BYTES as sent, and the sequences of each. */
  async function pagesOf(cluster: string, newestFirst = false): Promise<number[][]> {
    const pages = await everyPage((pageToken) =>
      events().listEvents({ cluster, pageSize: 1000, pageToken, newestFirst }),
    );
    for (const page of pages)
      expect(toBinary(ListEventsResponseSchema, page).byteLength).toBeLessThan(PAGE_BYTES);
    return pages.map((page) => page.events.map((e) => Number(e.sequence)));
  }

  const sizes = (pages: number[][]) => pages.map((p) => p.length);

  it("lists events whose details are large as sent in pages the client can receive, each once and in order", async () => {
    // 20 KB of JSON each, 110 KB as sent (a number takes 11 bytes): 40 of them made one page of 4.4 MB.
    const numbers = sql`jsonb_build_object('v', (select jsonb_agg(0) from generate_series(1, 9990)))`;
    const stored = await insert(40, "numbers", sql`'failed'`, numbers);
    const pages = await pagesOf("numbers");
    expect(sizes(pages)).toEqual([28, 12]);
    expect(pages.flat()).toEqual(stored);
    const backwards = await pagesOf("numbers", true);
    expect(sizes(backwards)).toEqual([28, 12]);
    expect(backwards.flat()).toEqual([...stored].reverse());
  });

  it("lists events with long messages in pages of at most 2 MiB of text after their first", async () => {
    // 64 Ki characters of 3 bytes each, as a worker's failure message may be: 192 KiB an event.
    const stored = await insert(24, "texts", sql`repeat('€', 65536)`, sql`null`);
    const pages = await pagesOf("texts");
    expect(sizes(pages)).toEqual([10, 10, 4]);
    expect(pages.flat()).toEqual(stored);
  });

  it("refuses an event too large to send alone, naming it and the way past it", async () => {
    const [before] = await insert(1, "huge", sql`'small'`, sql`null`);
    const [huge] = await insert(
      1,
      "huge",
      sql`'huge'`,
      sql`jsonb_build_object('s', repeat('x', 5 * 1024 * 1024))`,
    );
    const [after] = await insert(1, "huge", sql`'small'`, sql`null`);

    const first = await events().listEvents({ cluster: "huge", pageSize: 1000 });
    expect(first.events.map((e) => Number(e.sequence))).toEqual([before]);
    const refused = await failure(
      events().listEvents({ cluster: "huge", pageSize: 1000, pageToken: first.nextPageToken }),
    );
    expect(refused).toMatchObject({
      code: Code.ResourceExhausted,
      reason: "ANSWER_TOO_LARGE",
      message: `event ${huge} takes 5.0 MiB as sent, more than one answer can carry (3 MiB); ListEvents with the page token in this error's ErrorInfo metadata (next_page_token) lists the events past it`,
      info: { sequence: String(huge) },
    });
    const past = await events().listEvents({
      cluster: "huge",
      pageSize: 1000,
      pageToken: refused.info.next_page_token ?? "",
    });
    expect(past.events.map((e) => Number(e.sequence))).toEqual([after]);
    expect(past.nextPageToken).toBe("");

    const watch = events().watchEvents({ cluster: "huge", afterSequence: 0n });
    const seen: number[] = [];
    const ended = await failure(async () => {
      for await (const m of watch) seen.push(Number(m.event?.sequence));
    });
    expect(seen).toEqual([before]);
    expect(ended).toMatchObject({
      code: Code.ResourceExhausted,
      reason: "ANSWER_TOO_LARGE",
      message: `event ${huge} takes 5.0 MiB as sent, more than one answer can carry (3 MiB); WatchEvents with after_sequence ${huge} goes on past it`,
    });
    const resumed = events().watchEvents({ cluster: "huge", afterSequence: BigInt(huge as number) });
    for await (const m of resumed) {
      expect(Number(m.event?.sequence)).toBe(after);
      break;
    }
  });
});
