import { afterEach, describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { intercepting } from "../helpers/intercept-db.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

/**
 * A close while the database has stopped answering (frozen, or cut off with
 * no reset): the server still stops, after its bounded wait, rather than
 * hanging for as long as the database does. PostgreSQL only: PGlite runs in
 * the process and cannot stop answering, and its close waits for the
 * transaction this test leaves open.
 */
describe.runIf(runsPostgresTests())("stopping while the database does not answer", () => {
  let t: TestServer | undefined;
  let w: TestWorker | undefined;
  let store: TestStore | undefined;
  afterEach(async () => {
    w?.drop();
    await t?.[Symbol.asyncDispose]();
    await store?.drop();
  });

  it("gives up on a report still waiting for the database after the shutdown wait, and stops", async () => {
    let frozen = false;
    let held = 0;
    const heldOne: (() => void)[] = [];
    store = await freshPostgresDatabase();
    t = await startTestServer({
      store,
      overrides: {
        shutdownWaitMs: 200,
        wrapDb: intercepting(async (_text, execute) => {
          if (!frozen) return execute();
          held += 1;
          for (const f of heldOne.splice(0)) f();
          // Never answers, as a frozen PostgreSQL does not.
          return new Promise(() => {});
        }),
      },
    });
    w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    const grant = await w.next("grant");
    expect(grant.actionId).toBe(action?.id);
    // From here on no statement answers; the completion's statement waits for ever.
    frozen = true;
    const waiting = new Promise<void>((resolve) => heldOne.push(resolve));
    w.send({
      message: { case: "completion", value: { reportId: 1n, actionId: grant.actionId, epoch: grant.epoch } },
    });
    await waiting;
    expect(held).toBeGreaterThan(0);

    await t.server.close();
    expect(t.logs.map((l) => l.msg)).toContain(
      "stopping without waiting longer for the reports, grants and renewals in flight: the database has not answered; agents send unanswered reports again",
    );
    expect(t.logs.at(-1)?.msg).toBe("leasehold stopped");
  });
});
