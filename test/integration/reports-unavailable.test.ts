import { afterEach, describe, expect, it } from "vitest";
import type { RawServerOptions } from "../../src/config.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { RejectReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { startTestServer, waitForLog } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * A report the server cannot apply because its database is gone is answered
 * UNAVAILABLE (worker.proto: send it again), and applies once the database is
 * back. The server says so once, not once per report sent again. A database
 * that hangs rather than refuses does not hold the reports until it answers.
 */
describe.runIf(runsPostgresTests())("reports while the server's database is unreachable", () => {
  const cleanups: (() => Promise<void> | void)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  /** A server whose database is behind a proxy that cuts or freezes it, and a worker connected to it. */
  const serverBehindProxy = async (config: RawServerOptions, capacity: number) => {
    const store = await freshPostgresDatabase();
    cleanups.push(() => store.drop());
    const url = new URL(store.url as string);
    const proxy = await cuttableProxy(url.hostname, Number(url.port || 5432));
    cleanups.push(() => proxy.close());
    url.host = `127.0.0.1:${proxy.port}`;
    const t = await startTestServer({ store: { ...store, url: url.toString() }, config });
    cleanups.push(() => t.stop());
    const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity });
    cleanups.push(() => w.drop());
    return { proxy, t, w };
  };

  it("answers UNAVAILABLE until the database is back, then applies the report sent again", async () => {
    const { proxy, t, w } = await serverBehindProxy({}, 1);
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
    // Said once the database answers this process again (a renewal, a check), not at the next
    // report applied: no report is sent again until the line is there.
    const back = await waitForLog(t.logs, (l) => String(l.msg).startsWith("reports apply again"));
    expect(back).toMatchObject({ level: 30 });
    expect(back.failures).toBeGreaterThanOrEqual(3);
    // The pool reconnects on the next statement; the first ones may still find it down.
    let answer = await w.complete(grant, { output: { n: 3 } });
    for (let i = 0; i < 50 && answer.rejectReason === RejectReason.UNAVAILABLE; i++) {
      answer = await w.complete(grant, { output: { n: 3 } });
    }
    expect(answer).toMatchObject({ accepted: true });
    expect(warnings()).toHaveLength(1);

    const done = await t.client(ActionService).getAction({ actionId: grant.actionId });
    expect(done.action).toMatchObject({ state: ActionState.SUCCEEDED, output: { n: 3 } });
  }, 60_000);

  it("answers UNAVAILABLE while the database hangs, not when it answers again, and takes the copies sent again after it", async () => {
    const { proxy, t, w } = await serverBehindProxy(
      { gracePeriod: "10s", heartbeatInterval: "1s", rebalanceInterval: "0s" },
      2,
    );
    const api = t.client(ActionService);
    await api.submitAction({ cluster: "east" });
    await api.submitAction({ cluster: "east" });
    const a = await w.next("grant");
    const b = await w.next("grant");
    let progressId = 1000n;
    const progress = (grant: { actionId: string; epoch: bigint }, phase: string) => {
      const reportId = progressId++;
      w.send({
        message: {
          case: "progress",
          value: { reportId, actionId: grant.actionId, epoch: grant.epoch, phase },
        },
      });
      return w.next("reportResult", (r) => r.reportId === reportId);
    };
    let sequence = 1;
    const beat = async () => (await w.heartbeat(sequence++)).databaseUnreachable;
    const poll = { timeout: 20_000, interval: 100 };

    // The database hangs: statements and new connections get no answer, nothing is refused.
    proxy.freeze();
    const thawed = { now: false };
    const thaw = () => {
      thawed.now = true;
      proxy.thaw();
    };
    // Reports held until the database answers would wait for ever: it answers again 10 s on.
    const thawAnyway = setTimeout(thaw, 10_000);
    cleanups.push(() => clearTimeout(thawAnyway));
    // Sent before the process finds it lost: a completion and a progress report wait on
    // statements that hang, and a completion waits behind its action's progress.
    const waited = [
      w.complete(a, { output: { n: 1 } }),
      progress(b, "half"),
      w.complete(b, { output: { n: 2 } }),
    ];
    await expect.poll(beat, poll).toBe(true);
    // Sent once it has: answered at once.
    const now = w.complete(a, { output: { n: 1 } });
    const answers = await Promise.all(
      [...waited, now].map((answer) => answer.then((r) => ({ ...r, whileHung: !thawed.now }))),
    ).finally(thaw);
    for (const answer of answers)
      expect(answer).toMatchObject({
        accepted: false,
        rejectReason: RejectReason.UNAVAILABLE,
        whileHung: true,
      });

    await expect.poll(beat, poll).toBe(false);
    // The copies sent again: the completion whose statement hung committed meanwhile (a repeat),
    // the progress applies (again), and the completion whose turn never came applies now.
    const again = async (send: () => ReturnType<typeof w.complete>) => {
      let answer = await send();
      for (let i = 0; i < 50 && answer.rejectReason === RejectReason.UNAVAILABLE; i++) answer = await send();
      return answer;
    };
    expect(await again(() => w.complete(a, { output: { n: 1 } }))).toMatchObject({ accepted: true });
    expect(await again(() => progress(b, "half"))).toMatchObject({ accepted: true });
    expect(await again(() => w.complete(b, { output: { n: 2 } }))).toMatchObject({ accepted: true });
    // Every report was answered once: none again when its hung statement ended.
    const ids = w.received.flatMap((m) =>
      m.message.case === "reportResult" ? [m.message.value.reportId] : [],
    );
    expect(new Set(ids).size).toBe(ids.length);
    for (const [grant, n] of [
      [a, 1],
      [b, 2],
    ] as const) {
      const { action } = await api.getAction({ actionId: grant.actionId });
      expect(action).toMatchObject({ state: ActionState.SUCCEEDED, output: { n } });
    }
  }, 90_000);
});
