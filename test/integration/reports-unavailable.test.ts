import { afterEach, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { RejectReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { startTestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * A report the server cannot apply because its database is gone is answered
 * UNAVAILABLE (worker.proto: send it again), and applies once the database is
 * back. The server says so once, not once per report sent again.
 */
describe.runIf(runsPostgresTests())("reports while the server's database is unreachable", () => {
  const cleanups: (() => Promise<void> | void)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  it("answers UNAVAILABLE until the database is back, then applies the report sent again", async () => {
    const store = await freshPostgresDatabase();
    cleanups.push(() => store.drop());
    const url = new URL(store.url as string);
    const proxy = await cuttableProxy(url.hostname, Number(url.port || 5432));
    cleanups.push(() => proxy.close());
    url.host = `127.0.0.1:${proxy.port}`;
    const t = await startTestServer({ store: { ...store, url: url.toString() } });
    cleanups.push(() => t.stop());

    const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
    cleanups.push(() => w.drop());
    const { action } = await t.client(ActionService).submitAction({ cluster: "east" });
    const grant = await w.next("grant");
    expect(grant.actionId).toBe(action?.id);

    proxy.cut();
    for (let i = 0; i < 3; i++) {
      const answer = await w.complete(grant, { output: { n: i } });
      expect(answer).toMatchObject({ accepted: false, rejectReason: RejectReason.UNAVAILABLE });
      expect(answer.message).toMatch(/send it again/);
    }
    const warnings = () =>
      t.logs.filter((l) => l.level === 40 && String(l.msg).startsWith("could not apply"));
    expect(warnings()).toEqual([expect.objectContaining({ actionId: grant.actionId, workerId: "w1" })]);

    proxy.restore();
    // The pool reconnects on the next statement; the first ones may still find it down.
    let answer = await w.complete(grant, { output: { n: 3 } });
    for (let i = 0; i < 50 && answer.rejectReason === RejectReason.UNAVAILABLE; i++) {
      answer = await w.complete(grant, { output: { n: 3 } });
    }
    expect(answer).toMatchObject({ accepted: true });
    expect(warnings()).toHaveLength(1);
    const back = t.logs.find((l) => String(l.msg).startsWith("reports apply again"));
    expect(back).toMatchObject({ level: 30 });
    expect(back?.failures).toBeGreaterThanOrEqual(3);

    const done = await t.client(ActionService).getAction({ actionId: grant.actionId });
    expect(done.action).toMatchObject({ state: ActionState.SUCCEEDED, output: { n: 3 } });
  }, 60_000);
});
