import { durationFromMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/agent.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { deferred } from "../helpers/deferred.js";
import { scriptedWorkerServer } from "../helpers/scripted-worker.js";

/** grpc.health.v1 `HealthCheckResponse { status: SERVING }`. */
const SERVING = Buffer.from([0x08, 0x01]);

/**
 * A server that serves only grpc.health.v1 Check, and answers each check
 * SERVING when the test says so: `asked` resolves at the first check,
 * `answered` with whether the checker still waited for the answer (its
 * deadline had not passed).
 */
async function heldHealthServer() {
  const asked = deferred();
  const answer = deferred();
  const answered = deferred<boolean>();
  let holding = false;
  const server = new grpc.Server();
  server.addService(
    {
      Check: {
        path: "/grpc.health.v1.Health/Check",
        requestStream: false,
        responseStream: false,
        requestSerialize: (b: Buffer) => b,
        requestDeserialize: (b: Buffer) => b,
        responseSerialize: (b: Buffer) => b,
        responseDeserialize: (b: Buffer) => b,
      },
    },
    {
      Check(call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) {
        // Before `hold`: an agent that started here checks the connection its hello went on.
        if (!holding) {
          callback(null, SERVING);
          return;
        }
        asked.resolve();
        void answer.promise.then(() => {
          answered.resolve(!call.cancelled);
          callback(null, SERVING);
        });
      },
    },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
      error ? reject(error) : resolve(p),
    ),
  );
  return {
    address: `127.0.0.1:${port}`,
    asked: asked.promise,
    answered: answered.promise,
    /** Holds the checks from now on until `serve`. */
    hold: () => {
      holding = true;
    },
    serve: () => answer.resolve(),
    close: () => server.forceShutdown(),
  };
}

/**
 * The agent and its server's database, with a scripted server whose acks the
 * test writes: no database is involved. Driver-neutral.
 */
describe.runIf(runsDriverNeutralTests())("an agent told its server cannot reach its database", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  /** Resolves with the first event from `from` on that `matches`, as they come. */
  function eventOf(events: AgentEvent[], matches: (e: AgentEvent) => boolean, from = 0): Promise<AgentEvent> {
    return new Promise((resolve) => {
      const look = () => {
        const found = events.slice(from).find(matches);
        if (found) resolve(found);
        else setTimeout(look, 10);
      };
      look();
    });
  }

  it("says so, and stays when the database is back before the other server answers", async () => {
    // Acks every 2 s; the agent asks the other server on the second ack saying unreachable, and
    // waits for its answer for one interval.
    const intervalMs = 2000;
    const first = await scriptedWorkerServer({ heartbeatMs: intervalMs });
    cleanups.push(() => first.close());
    const other = await heldHealthServer();
    cleanups.push(() => other.close());
    const events: AgentEvent[] = [];
    const agent = createAgent({
      address: [first.address, other.address],
      workerId: "w1",
      cluster: "east",
      onEvent: (e) => events.push(e),
      handler: async () => ({}),
    });
    cleanups.push(() => agent.close({ timeoutMs: 0 }));
    // It starts at a random address; the other one serves no workers, so it ends up on the first.
    await eventOf(events, (e) => e.type === "connected" && e.address === first.address);
    await first.acked;
    other.hold();

    first.databaseUnreachable(true);
    const lost = await eventOf(events, (e) => e.type === "server_database");
    expect(lost).toEqual({ type: "server_database", address: first.address, reachable: false });
    // The next ack, the one that sends the agent asking, comes late: after the heartbeat that
    // follows it (the agent leaves a stream only when a heartbeat is due and the oldest is
    // unanswered for 1.5 intervals). That following heartbeat is then answered while the agent
    // waits, up to an interval, for the other server.
    first.holdAcks();
    await first.next("heartbeat");
    await first.next("heartbeat");
    const marker = events.length;
    first.answerOldest();
    await other.asked;
    // The database is back before the other server answers.
    first.databaseUnreachable(false);
    first.answerHeld();
    const back = await eventOf(events, (e) => e.type === "server_database", marker);
    expect(back).toEqual({ type: "server_database", address: first.address, reachable: true });
    other.serve();
    // The agent was still waiting for this answer: it had the choice to leave.
    expect(await other.answered).toBe(true);
    // Leaving would cancel the stream at once; the next heartbeat shows it was kept.
    await first.next("heartbeat");
    expect(events.slice(marker).filter((e) => e.type === "disconnected" || e.type === "connected")).toEqual(
      [],
    );
    // Each change was told once.
    expect(events.filter((e) => e.type === "server_database")).toHaveLength(2);
  }, 30_000);

  it("takes a second ack of its last heartbeat, as a server sends once its renewal works again", async () => {
    // A short guarantee, and no heartbeat after the first for a minute: a longer guarantee can
    // only come from the ack sent again.
    const server = await scriptedWorkerServer({ heartbeatMs: 60_000, remainingMs: 2000 });
    cleanups.push(() => server.close());
    const guarantees: number[] = [];
    const agent = createAgent({
      address: server.address,
      workerId: "w1",
      cluster: "east",
      handler: async () => ({}),
      onGuarantee: (ms) => guarantees.push(ms),
    });
    cleanups.push(() => agent.close({ timeoutMs: 0 }));
    await server.acked;
    while (guarantees.length === 0) await new Promise((r) => setTimeout(r, 10));
    expect(guarantees[0]).toBeLessThanOrEqual(2000);
    const again = (sequence: bigint) =>
      server.send({
        message: {
          case: "heartbeatAck",
          value: { sequence, remaining: durationFromMs(30_000), databaseUnreachable: false },
        },
      });
    // An ack of a heartbeat never sent is no news; the one acked is.
    again(7n);
    again(1n);
    while (guarantees.length === 1) await new Promise((r) => setTimeout(r, 10));
    expect(guarantees).toHaveLength(2);
    expect(guarantees[1]).toBeGreaterThan(25_000);
  });
});
