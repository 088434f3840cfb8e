import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { databaseClock } from "../../src/store/clock.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import { ACTION_DEFAULTS, type NewAction } from "../../src/work/action.js";
import { type ActionService, createActionService } from "../../src/work/action-service.js";
import { createChangeFeed, LOOK_AGAIN_MS } from "../../src/work/change-feed.js";
import { silentBus } from "../helpers/bus.js";

const newAction = (cluster: string): NewAction => ({
  requestId: undefined,
  requestHash: undefined,
  runId: "",
  cluster,
  labelSelector: {},
  payload: undefined,
  priority: 0,
  retryPolicy: ACTION_DEFAULTS.retryPolicy,
  maxSystemRetries: 3,
});

describe("the action service on PGlite", () => {
  let database: Database;
  let actions: ActionService;
  beforeAll(async () => {
    database = await openDatabase({ dataDir: "memory://" });
    actions = createActionService({ db: database.db, clock: databaseClock, feed: createChangeFeed() });
  });
  afterAll(async () => {
    await actions?.close();
    await database?.close();
  });

  it("refuses to cancel a finished action with FAILED_PRECONDITION naming its state", async () => {
    const { action } = await actions.submit(newAction("fin"), "alice");
    await database.db.execute(
      sql`update actions set state = 'SUCCEEDED', finished_at = now() where id = ${action.id}`,
    );
    const error = await actions.cancel(action.id, "", "alice").catch((e: unknown) => e);
    expect(error).toBeInstanceOf(LeaseholdError);
    expect(error).toMatchObject({ code: Code.FailedPrecondition, reason: "ACTION_FINISHED" });
    expect((error as Error).message).toMatch(/already finished as SUCCEEDED/);
  });

  it("marks a leased action for revocation instead of cancelling it outright", async () => {
    const { action } = await actions.submit(newAction("leased"), "alice");
    await database.db.execute(
      sql`update actions set state = 'LEASED', epoch = 1, worker_id = 'w1', session_id = 's1' where id = ${action.id}`,
    );
    const cancelled = await actions.cancel(action.id, "stop", "alice");
    expect(cancelled).toMatchObject({
      state: "LEASED",
      cancelRequested: true,
      failureReason: "action cancelled: stop",
    });
  });

  it("shows a watch a change made by another process whose wake-up was lost", async () => {
    // Alone on its database a feed wakes its watchers itself, and never needs to look again.
    expect(createChangeFeed().lookAgainMs).toBeUndefined();
    expect(createChangeFeed(silentBus()).lookAgainMs).toBe(LOOK_AGAIN_MS);
    // So does a feed whose bus sees no other process listening (one process on PostgreSQL).
    expect(createChangeFeed({ ...silentBus(), hasPeers: () => false }).lookAgainMs).toBeUndefined();
    // With a bus, another process finishes the action and its NOTIFY never arrives.
    const shared = createActionService({
      db: database.db,
      clock: databaseClock,
      feed: createChangeFeed(silentBus(), 20),
    });
    const { action } = await shared.submit(newAction("unheard"), "alice");
    const stop = new AbortController();
    const states: string[] = [];
    const watched = (async () => {
      for await (const seen of shared.watch(action.id, stop.signal)) {
        states.push(seen.state);
        if (states.length === 1) {
          await database.db.execute(
            sql`update actions set state = 'SUCCEEDED', finished_at = now(), updated_at = now() where id = ${action.id}`,
          );
        }
      }
    })();
    await watched;
    expect(states).toEqual(["QUEUED", "SUCCEEDED"]);
    await shared.close();
  });

  it("gives a burst of concurrent submits distinct ids in submission order", async () => {
    const results = await Promise.all(
      Array.from({ length: 50 }, () => actions.submit(newAction("burst"), "alice")),
    );
    const ids = results.map((r) => r.action.id);
    expect(new Set(ids).size).toBe(50);
    expect([...ids].sort()).toEqual(ids);
  });
});
