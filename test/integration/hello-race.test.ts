import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { statusDetails } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

/** How a hello ended: a welcome (and its stream), or the stream's status. */
type HelloEnd = { worker: TestWorker } | { code: number; reason: string | undefined; details: string };

async function hello(address: string, workerId: string, instanceId: string): Promise<HelloEnd> {
  try {
    return { worker: await connectWorker(address, { workerId, cluster: "east", capacity: 1, instanceId }) };
  } catch (error) {
    const e = error as { code: number; details: string; metadata: never };
    return { code: e.code, details: e.details, reason: statusDetails(e.metadata).reason };
  }
}

const failureOf = (end: HelloEnd) => ("worker" in end ? undefined : { code: end.code, reason: end.reason });

/**
 * Two hellos for a worker id without a session, at once on two servers of one
 * database: neither sees the other's session, both insert one, and the one
 * live session per worker (sessions_one_live_per_worker) lets one commit. The
 * other must answer as if it had come second: refused for another instance,
 * a takeover for the same one, never the unique violation itself.
 */
describe.runIf(runsPostgresTests())("hellos racing for a new worker id on two servers", () => {
  let store: TestStore;
  let a: TestServer;
  let b: TestServer;
  const workers: TestWorker[] = [];
  beforeAll(async () => {
    store = await freshPostgresDatabase();
    // At debug level, so that the tests can see the race happen (and answered right) rather than missed.
    a = await startTestServer({ store, config: { logLevel: "debug" } });
    b = await startTestServer({ store, config: { logLevel: "debug" } });
  });
  afterAll(async () => {
    for (const w of workers) w.drop();
    await a?.[Symbol.asyncDispose]();
    await b?.[Symbol.asyncDispose]();
    await store?.drop();
  });

  const WORKERS = 40;
  /**
   * Two hellos for each of WORKERS new worker ids `prefix-N`, at once, one on each server, with
   * the instance ids `instances` gives. `inTurn`: one worker id after the other, so that each
   * hello is a batch of its own on its server (a batch of many that fails sends its hellos
   * alone, which hid the race); otherwise all at once, in batches. Streams are dropped after.
   */
  async function racePairs(prefix: string, instances: (id: string) => [string, string], inTurn = true) {
    const ids = Array.from({ length: WORKERS }, (_, i) => `${prefix}-${i}`);
    const pair = (id: string) => {
      const [x, y] = instances(id);
      return Promise.all([hello(a.address, id, x), hello(b.address, id, y)]);
    };
    const pairs: HelloEnd[][] = [];
    if (inTurn) for (const id of ids) pairs.push(await pair(id));
    else pairs.push(...(await Promise.all(ids.map(pair))));
    for (const p of pairs) for (const end of p) if ("worker" in end) workers.push(end.worker);
    return { ids, pairs };
  }
  /** Hellos (or batches) the servers opened again after losing the race, so far. */
  const races = () =>
    [...a.logs, ...b.logs].filter((l) =>
      /raced another|started the worker's session first/.test(String(l.msg)),
    ).length;

  it("refuses another instance's hello WORKER_ID_IN_USE, and logs it", async () => {
    const racesBefore = races();
    const { ids, pairs } = await racePairs("twin", (id) => [`${id}-a`, `${id}-b`]);
    const failures = pairs.flat().map(failureOf);
    // One welcome for each worker id, and the other hello refused as the proto says.
    expect(pairs.map((pair) => pair.filter((end) => "worker" in end).length)).toEqual(ids.map(() => 1));
    expect(failures.filter((f) => f !== undefined)).toEqual(
      ids.map(() => ({ code: Code.AlreadyExists, reason: "WORKER_ID_IN_USE" })),
    );
    // Each refusal is logged by the server that refused it.
    const logged = [...a.logs, ...b.logs]
      .filter((l) => l.reason === "WORKER_ID_IN_USE" && String(l.msg).startsWith("hello of worker twin-"))
      .map((l) => l.workerId)
      .sort();
    expect(logged).toEqual([...ids].sort());
    // Without its race the test would prove nothing (without the fix, most pairs end SQLSTATE_23505).
    expect(races()).toBeGreaterThan(racesBefore);
  });

  it("answers many such pairs at once, in batches, each as the proto says", async () => {
    // Batches of many on each server: a batch that loses the race is opened again, or its hellos alone.
    const { ids, pairs } = await racePairs("crowd", (id) => [`${id}-a`, `${id}-b`], false);
    expect(pairs.map((pair) => pair.filter((end) => "worker" in end).length)).toEqual(ids.map(() => 1));
    expect(pairs.flat().flatMap((end) => failureOf(end) ?? [])).toEqual(
      ids.map(() => ({ code: Code.AlreadyExists, reason: "WORKER_ID_IN_USE" })),
    );
  });

  it("lets the same instance's second hello take the session over: one live stream, no other error", async () => {
    const racesBefore = races();
    const { pairs } = await racePairs("same", (id) => [`${id}-only`, `${id}-only`]);
    // The only error a hello may end with is the takeover of its stream by the other (before its welcome).
    for (const f of pairs.flat().map(failureOf))
      if (f) expect(f).toEqual({ code: Code.Aborted, reason: "SESSION_TAKEN_OVER" });
    // Of each pair, one stream is taken over and ends; the other stays and is answered.
    for (const pair of pairs) {
      const streams = pair.flatMap((end) => ("worker" in end ? [end.worker] : []));
      expect(streams.length).toBeGreaterThan(0);
      const sessions = new Set(streams.map((w) => w.welcome.sessionId));
      expect(sessions.size).toBe(1);
      if (streams.length === 2) {
        const ended = await Promise.race(streams.map((w, i) => w.ended.then((s) => ({ i, s }))));
        expect({ code: ended.s.code, reason: statusDetails(ended.s.metadata).reason }).toEqual({
          code: Code.Aborted,
          reason: "SESSION_TAKEN_OVER",
        });
        const alive = streams[1 - ended.i] as TestWorker;
        expect((await alive.heartbeat(1)).sequence).toBe(1n);
      } else {
        expect((await (streams[0] as TestWorker).heartbeat(1)).sequence).toBe(1n);
      }
    }
    expect(races()).toBeGreaterThan(racesBefore);
  });
});
