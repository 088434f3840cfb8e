import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { type Code, LeaseholdError } from "../../src/errors.js";
import {
  type ConnectRequest,
  type ConnectResponseSchema,
  RejectReason,
  WorkerService,
} from "../../src/gen/leasehold/v1/worker_pb.js";
import { createServiceDefinition } from "../../src/rpc/adapter.js";
import { toStatusObject } from "../../src/rpc/status.js";
import { deferred } from "./deferred.js";

export type ScriptedResponse = MessageInitShape<typeof ConnectResponseSchema>;

/**
 * A WorkerService an agent test scripts: it welcomes the agent (saying
 * accepts_batches or not, with a heartbeat interval of `heartbeatMs`, 1 s by
 * default), acks every heartbeat with a one-minute guarantee (or `remainingMs`),
 * accepts every grant ack and completion, and writes what the test sends.
 * Every write happens in order on the stream: a grant sent once `acked` has
 * resolved follows that first ack. `requests` are the ConnectRequests as they
 * arrived (batches whole), `received` the kinds of their messages (batches
 * opened).
 */
export async function scriptedWorkerServer(
  options: {
    acceptsBatches?: boolean;
    acceptsStopGrants?: boolean;
    remainingMs?: number;
    heartbeatMs?: number;
    /** The welcome's grace period (one minute by default). */
    graceMs?: number;
    /** The welcome waits for it (a server slow to open the session). */
    welcomeAfter?: Promise<void>;
    /** The first completion is answered INVALID with this message (a server with other limits). */
    refuseFirstCompletion?: string;
  } = {},
) {
  const acked = deferred();
  let refusal = options.refuseFirstCompletion;
  const requests: ConnectRequest[] = [];
  const received: string[] = [];
  const waiters = new Set<() => void>();
  let stream: grpc.ServerDuplexStream<ConnectRequest, unknown> | undefined;
  /** Whether heartbeats are answered (a hung server answers none, and never ends the stream). */
  let acking = true;
  /** Whether acks say the server cannot reach its database (database_unreachable). */
  let unreachable = false;
  /** Heartbeats left unanswered by `holdAcks`, for `answerHeld` to answer. */
  let holding = false;
  const held: bigint[] = [];
  /** Whether grant acks, completions and releases are answered (see `answerReports`). */
  let answering = true;
  const ack = (sequence: bigint) => {
    write({
      message: {
        case: "heartbeatAck",
        value: {
          sequence,
          remaining: durationFromMs(options.remainingMs ?? 60_000),
          databaseUnreachable: unreachable,
        },
      },
    });
    acked.resolve();
  };
  const write = (m: ScriptedResponse) => stream?.write(create(WorkerService.method.connect.output, m));
  const server = new grpc.Server();
  server.addService(createServiceDefinition(WorkerService), {
    connect(call: grpc.ServerDuplexStream<ConnectRequest, unknown>) {
      stream = call;
      const answer = (request: ConnectRequest) => {
        const m = request.message;
        if (m.case === "batch") {
          for (const inner of m.value.messages) answer(inner);
          return;
        }
        received.push(m.case ?? "");
        if (m.case === "hello") {
          const welcome = () =>
            write({
              message: {
                case: "welcome",
                value: {
                  sessionId: "s1",
                  heartbeatInterval: durationFromMs(options.heartbeatMs ?? 1000),
                  gracePeriod: durationFromMs(options.graceMs ?? 60_000),
                  acceptsBatches: options.acceptsBatches ?? true,
                  acceptsStopGrants: options.acceptsStopGrants ?? false,
                },
              },
            });
          if (options.welcomeAfter) void options.welcomeAfter.then(welcome);
          else welcome();
        } else if (m.case === "heartbeat") {
          if (!acking) return;
          if (holding) held.push(m.value.sequence);
          else ack(m.value.sequence);
        } else if (m.case === "grantAck" || m.case === "completion" || m.case === "release") {
          if (!answering) return;
          const { reportId, actionId, epoch } = m.value;
          if (m.case === "completion" && refusal !== undefined) {
            const message = refusal;
            refusal = undefined;
            write({
              message: {
                case: "reportResult",
                value: {
                  reportId,
                  actionId,
                  epoch,
                  accepted: false,
                  rejectReason: RejectReason.INVALID,
                  message,
                },
              },
            });
            return;
          }
          write({ message: { case: "reportResult", value: { reportId, actionId, epoch, accepted: true } } });
        } else if (m.case === "goodbye") call.end();
      };
      call.on("data", (request: ConnectRequest) => {
        requests.push(request);
        answer(request);
        for (const w of [...waiters]) w();
      });
      call.on("error", () => {});
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
      error ? reject(error) : resolve(p),
    ),
  );
  /** Resolves once `test` holds for the requests so far. */
  const until = (test: (all: ConnectRequest[]) => boolean) =>
    new Promise<void>((resolve) => {
      const look = () => {
        if (!test(requests)) return;
        waiters.delete(look);
        resolve();
      };
      waiters.add(look);
      look();
    });
  const count = (kind: string) => received.filter((k) => k === kind).length;
  return {
    address: `127.0.0.1:${port}`,
    acked: acked.promise,
    requests,
    received,
    until,
    /** Resolves at the next message of `kind` from now on. */
    next(kind: string): Promise<void> {
      const seen = count(kind);
      return until(() => count(kind) > seen);
    },
    send: write,
    /** Answers no heartbeat from now on, or again. */
    ackHeartbeats(on: boolean) {
      acking = on;
    },
    /** Acks from now on say the database is unreachable, or reachable. */
    databaseUnreachable(on: boolean) {
      unreachable = on;
    },
    /** Keeps the heartbeats from now on unanswered until `answerHeld` (a slow server's late acks). */
    holdAcks() {
      holding = true;
    },
    /** Answers the oldest held heartbeat now, holding the others and the ones to come. */
    answerOldest() {
      const sequence = held.shift();
      if (sequence !== undefined) ack(sequence);
    },
    /** Answers the held heartbeats now, and every heartbeat from now on at once. */
    answerHeld() {
      holding = false;
      for (const sequence of held.splice(0)) ack(sequence);
    },
    /** Answers no grant ack, completion or release from now on, or again. */
    answerReports(on: boolean) {
      answering = on;
    },
    /**
     * Ends the open stream with UNAVAILABLE, as a server going away does; or,
     * given an ErrorInfo reason, with that status as the server ends it (e.g.
     * ABORTED, SESSION_REAPED).
     */
    endStream(ending?: { code: Code; reason: string; message: string }) {
      if (!ending) {
        stream?.destroy(Object.assign(new Error("going away"), { code: grpc.status.UNAVAILABLE }));
        return;
      }
      const error = new LeaseholdError(ending.code, ending.message, { reason: ending.reason });
      const { code, details, metadata } = toStatusObject(error, pino({ level: "silent" }), "Connect");
      // Emitted, not destroyed with: grpc-js sends the status of an error emitted on the call.
      stream?.emit("error", Object.assign(new Error(details), { code, details, metadata }));
    },
    close: () => server.forceShutdown(),
  };
}
