import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/index.js";
import {
  type ConnectRequest,
  type ConnectResponseSchema,
  RevokeReason,
  WorkerService,
} from "../../src/gen/leasehold/v1/worker_pb.js";
import { createServiceDefinition } from "../../src/rpc/adapter.js";
import { deferred } from "../helpers/deferred.js";

type Response = MessageInitShape<typeof ConnectResponseSchema>;

/**
 * A WorkerService the test scripts: it welcomes the agent, acks every
 * heartbeat with a long guarantee, accepts every report, and writes what the
 * test sends. `acked` resolves once the first ack is out; `received` lists the
 * kinds of the messages that came, and `next(kind)` waits for one more.
 */
async function scriptedServer() {
  const acked = deferred();
  const received: string[] = [];
  const waiters = new Set<() => void>();
  let stream: grpc.ServerDuplexStream<ConnectRequest, unknown> | undefined;
  const server = new grpc.Server();
  server.addService(createServiceDefinition(WorkerService), {
    connect(call: grpc.ServerDuplexStream<ConnectRequest, unknown>) {
      stream = call;
      const write = (m: Response) => call.write(create(WorkerService.method.connect.output, m));
      const answer = (request: ConnectRequest) => {
        const m = request.message;
        if (m.case !== "batch") {
          received.push(m.case ?? "");
          for (const w of [...waiters]) w();
        }
        if (m.case === "batch") for (const inner of m.value.messages) answer(inner);
        else if (m.case === "hello") {
          write({
            message: {
              case: "welcome",
              value: {
                sessionId: "s1",
                heartbeatInterval: durationFromMs(1000),
                gracePeriod: durationFromMs(60_000),
                acceptsBatches: true,
              },
            },
          });
        } else if (m.case === "heartbeat") {
          write({
            message: {
              case: "heartbeatAck",
              value: { sequence: m.value.sequence, remaining: durationFromMs(60_000) },
            },
          });
          acked.resolve();
        } else if (m.case === "grantAck" || m.case === "completion") {
          const { reportId, actionId, epoch } = m.value;
          write({ message: { case: "reportResult", value: { reportId, actionId, epoch, accepted: true } } });
        } else if (m.case === "goodbye") call.end();
      };
      call.on("data", answer);
      call.on("error", () => {});
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
      error ? reject(error) : resolve(p),
    ),
  );
  return {
    address: `127.0.0.1:${port}`,
    acked: acked.promise,
    received,
    next(kind: string): Promise<void> {
      const seen = received.filter((k) => k === kind).length;
      return new Promise((resolve) => {
        const look = () => {
          if (received.filter((k) => k === kind).length <= seen) return;
          waiters.delete(look);
          resolve();
        };
        waiters.add(look);
      });
    },
    send(m: Response) {
      stream?.write(create(WorkerService.method.connect.output, m));
    },
    close: () => server.forceShutdown(),
  };
}

describe("the agent SDK, granted an action again while its old handler stops", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it.each([
    [1, "runs"],
    [2, "runs"],
    [1, "closes"],
    [2, "closes"],
  ] as const)(
    "starts the new grant only once the old handler of the same action has returned (%i slots, then %s)",
    async (capacity, then) => {
      const server = await scriptedServer();
      cleanups.push(server.close);
      const log: string[] = [];
      const firstStopping = deferred();
      const letFirstReturn = deferred();
      const secondStarted = deferred();
      const otherStarted = deferred();
      const letOtherReturn = deferred();
      const seen: AgentEvent[] = [];
      const grantSeen = new Map<number, () => void>();
      const agent = createAgent({
        address: server.address,
        workerId: "w1",
        cluster: "east",
        capacity,
        onEvent: (e) => {
          seen.push(e);
          if (e.type === "grant") grantSeen.get(e.epoch)?.();
        },
        handler: async (ctx) => {
          if (ctx.actionId === "b1") {
            // Another action, finishing while the agent closes.
            otherStarted.resolve();
            await letOtherReturn.promise;
            log.push("b1 done");
            return {};
          }
          log.push(`start ${ctx.epoch}`);
          if (ctx.epoch === 1) {
            // It honours the abort, but takes a while to tear down (a container's stop).
            await new Promise<void>((resolve) =>
              ctx.signal.addEventListener("abort", () => {
                firstStopping.resolve();
                void letFirstReturn.promise.then(resolve);
              }),
            );
            log.push("end 1");
            return {};
          }
          secondStarted.resolve();
          return { ok: true };
        },
      });
      cleanups.push(() => agent.close({ timeoutMs: 1000 }));
      await server.acked;
      const grant = (epoch: bigint): Response => ({
        message: { case: "grant", value: { actionId: "a1", epoch, attempt: Number(epoch) } },
      });
      server.send(grant(1n));
      await new Promise<void>((r) => grantSeen.set(1, r));
      // The server ends the lease (the session expired while its stream was down, say) and,
      // the slot being free on its side, grants the action again at once.
      server.send({
        message: { case: "revoke", value: { actionId: "a1", epoch: 1n, reason: RevokeReason.EXPIRED } },
      });
      await firstStopping.promise;
      const secondGranted = new Promise<void>((r) => grantSeen.set(2, r));
      server.send(grant(2n));
      await secondGranted;
      // The guarantee is fresh (60 s), so only the stopping handler keeps the new one waiting.
      expect(log).toEqual(["start 1"]);
      if (then === "closes") {
        // The agent closes meanwhile: it waits for the stopping handler too (its goodbye comes
        // after it; a heartbeat a second later finds none yet), and gives the new grant back unrun.
        if (capacity > 1) {
          server.send({ message: { case: "grant", value: { actionId: "b1", epoch: 1n, attempt: 1 } } });
          await otherStarted.promise;
        }
        const closed = agent.close({ timeoutMs: 30_000 }).then(() => log.push("closed"));
        if (capacity > 1) {
          // Its report is answered while the old handler still stops: no goodbye for that.
          const reported = server.next("completion");
          letOtherReturn.resolve();
          await reported;
        }
        await server.next("heartbeat");
        expect(server.received).not.toContain("goodbye");
        letFirstReturn.resolve();
        await closed;
        expect(log).toEqual(["start 1", ...(capacity > 1 ? ["b1 done"] : []), "end 1", "closed"]);
        return;
      }
      letFirstReturn.resolve();
      await secondStarted.promise;
      expect(log).toEqual(["start 1", "end 1", "start 2"]);
    },
  );
});
