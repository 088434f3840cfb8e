import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { createFakeClock, type FakeClock } from "../../src/store/clock.js";
import { runCli } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

/**
 * A database that went back in time (restored from an older backup, or a
 * standby promoted after losing commits) under running agents.
 */
describe("a database that went back in time", () => {
  let clock: FakeClock;
  let t: TestServer;
  let workers: TestWorker[];

  const start = () =>
    startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock, timers: false },
    });
  const worker = async (workerId: string, held: { actionId: string; epoch: bigint }[] = []) => {
    const w = await connectWorker(t.address, { workerId, cluster: "rr", capacity: 1, heldLeases: held });
    workers.push(w);
    return w;
  };
  const submit = async () => (await t.client(ActionService).submitAction({ cluster: "rr" })).action?.id ?? "";
  const action = async (id: string) => (await t.client(ActionService).getAction({ actionId: id })).action;
  const events = async (actionId: string, kind: EventKind) =>
    (await t.client(EventService).listEvents({ actionId, kind, pageSize: 100 })).events;
  beforeEach(async () => {
    clock = createFakeClock();
    workers = [];
    t = await start();
  });
  afterEach(async () => {
    for (const w of workers) w.drop();
    await t[Symbol.asyncDispose]();
  });

  it("`leasehold db restored` raises epochs, ends sessions, requeues leases without a retry and holds grants", async () => {
    const p = await worker("rr-p");
    const x = await submit();
    await t.server.leases.tick.dispatch();
    expect((await p.next("grant")).epoch).toBe(1n);
    // Queued behind it (p has one slot): never granted.
    const y = await submit();

    await t.stop();
    const store = t.store;
    const ran = await runCli([
      "db",
      "restored",
      ...(store.url ? ["--database-url", store.url] : ["--data-dir", store.dataDir]),
      "--grace-period",
      "10s",
    ]);
    expect(ran).toMatchObject({ code: 0, stderr: "" });
    expect(ran.stdout).toMatch(
      /^database marked restored: 1 live sessions ended, 1 leases revoked, the epochs of 2 queued or leased actions raised by 1000000; no grant before /,
    );
    t = await t.restart();

    // p still runs X at epoch 1: its new session is told to stop it, with nothing to detect.
    const back = await worker("rr-p", [{ actionId: x, epoch: 1n }]);
    expect(back.welcome.sessionResumed).toBe(false);
    expect(back.welcome.revoked).toMatchObject([{ actionId: x, epoch: 1n }]);
    expect(await action(x)).toMatchObject({
      state: ActionState.QUEUED,
      epoch: 1_000_001n,
      systemRetryCount: 0,
    });
    expect((await action(y))?.epoch).toBe(1_000_000n);
    const [restored] = (
      await t.client(EventService).listEvents({ kind: EventKind.DATABASE_RESTORED, pageSize: 10 })
    ).events;
    expect(restored?.actor).toMatch(/.@./);
    expect(restored?.details).toMatchObject({
      sessions_ended: 1,
      leases_revoked: 1,
      actions_renumbered: 2,
      epoch_margin: 1_000_000,
    });
    const [revoked] = await events(x, EventKind.LEASE_REVOKED);
    expect(revoked?.message).toMatch(/the database was restored from a backup/);

    // Nothing is granted during the hold, which covers every old holder's guarantee.
    await t.server.leases.tick.dispatch();
    expect((await action(x))?.state).toBe(ActionState.QUEUED);
    clock.advance(60_000);
    await back.heartbeat(1);
    await t.server.leases.tick.renew();
    await t.server.leases.tick.dispatch();
    expect(await back.next("grant")).toMatchObject({ actionId: x, epoch: 1_000_002n });
  });
});
