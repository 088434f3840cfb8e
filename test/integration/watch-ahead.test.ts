import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { failure } from "../helpers/status.js";

/**
 * A watch resuming after a sequence past the newest event would wait forever
 * (the events that follow get lower sequences): it is refused OUT_OF_RANGE,
 * CURSOR_AHEAD, against the end of the log in the database, not how far the
 * process has read it.
 */
describe("a watch resuming past the end of the log", () => {
  let t: TestServer;
  let db: Db | undefined;
  beforeAll(async () => {
    t = await startTestServer({ overrides: { wrapDb: (d) => (db = d) } });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  const submit = async () => (await t.client(ActionService).submitAction({ cluster: "ahead" })).action?.id;
  /** The newest event's sequence, as the database has it. */
  const newest = async () =>
    Number(
      (await queryRows<{ max: unknown }>(db as Db, sql`select max(sequence) as max from events`))[0]?.max,
    );
  /** The first event a watch after `afterSequence` sends once `then` ran. */
  async function firstAfter(afterSequence: number, then: () => Promise<unknown>) {
    const watch = t
      .client(EventService)
      .watchEvents({ afterSequence: BigInt(afterSequence) })
      [Symbol.asyncIterator]();
    const first = watch.next();
    await then();
    const { value } = await first;
    await watch.return?.();
    return value?.event;
  }

  it("is refused, naming the newest sequence", async () => {
    await submit();
    const end = await newest();
    const refused = await failure(async () => {
      for await (const _ of t.client(EventService).watchEvents({ afterSequence: BigInt(end + 1_000_000) }))
        return;
    });
    expect(refused).toMatchObject({
      code: Code.OutOfRange,
      reason: "CURSOR_AHEAD",
      info: { newest_sequence: String(end) },
    });
    expect(refused.message).toContain(`past the newest event of the log (sequence ${end})`);
  });

  it("is served from the newest sequence, and from one committed that this process has not read", async () => {
    await submit();
    const atEnd = await firstAfter(await newest(), submit);
    expect(atEnd?.cluster).toBe("ahead");
    // Stored as another process sharing the database would, without a word to this one's tail.
    await queryRows(
      db as Db,
      sql`insert into events (kind, cluster, message) values ('action_failed', 'other', 'x')`,
    );
    const unread = await newest();
    const next = await firstAfter(unread, submit);
    expect(Number(next?.sequence)).toBeGreaterThan(unread);
  });
});
