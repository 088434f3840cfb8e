import { connect as http2Connect } from "node:http2";
import { create, fromBinary, type MessageInitShape } from "@bufbuild/protobuf";
import type * as grpc from "@grpc/grpc-js";
import {
  type ConnectRequestSchema,
  type ConnectResponse,
  ConnectResponseSchema,
  type HelloSchema,
  WorkerService,
} from "../../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { grpcFrame } from "./raw-grpc.js";

type Case = NonNullable<ConnectResponse["message"]["case"]>;
type ValueOf<C extends Case> = Extract<ConnectResponse["message"], { case: C }>["value"];

/** A worker speaking the raw Connect protocol, for protocol tests. */
export interface TestWorker {
  readonly welcome: ValueOf<"welcome">;
  /** Every message received so far; the messages of a batch one by one. */
  readonly received: ConnectResponse[];
  /** Every ConnectResponse as it arrived (batches whole). */
  readonly responses: ConnectResponse[];
  send(request: MessageInitShape<typeof ConnectRequestSchema>): void;
  /** Sends one ConnectRequest already in the binary format (e.g. one protobuf would not encode). */
  sendBytes(bytes: Uint8Array): void;
  /** The next unconsumed message of a kind (optionally matching `test`), waiting for it if needed. */
  next<C extends Case>(kind: C, test?: (value: ValueOf<C>) => boolean): Promise<ValueOf<C>>;
  heartbeat(sequence: number, held?: { actionId: string; epoch: bigint }[]): Promise<ValueOf<"heartbeatAck">>;
  /** Sends a completion and waits for its result. */
  complete(
    grant: { actionId: string; epoch: bigint },
    outcome:
      | { output?: Record<string, unknown> }
      | { error: string; retryable: boolean; details?: Record<string, unknown> },
  ): Promise<ValueOf<"reportResult">>;
  release(grant: { actionId: string; epoch: bigint }, reason?: string): Promise<ValueOf<"reportResult">>;
  goodbye(reason?: string): void;
  /** Drops the stream as a crash or network loss would (the client cancels). */
  drop(): void;
  /** Resolves with the stream's final status. */
  readonly ended: Promise<{ code: number; details: string; metadata: grpc.Metadata }>;
}

/** Connects, sends the hello, and waits for the welcome (or the stream's error). */
export async function connectWorker(
  address: string,
  hello: MessageInitShape<typeof HelloSchema>,
  options: { metadata?: grpc.Metadata } = {},
): Promise<TestWorker> {
  const client = createClient(WorkerService, address);
  const call = client.connect(
    options.metadata ? { metadata: options.metadata } : {},
  ) as grpc.ClientDuplexStream<unknown, ConnectResponse>;
  const received: ConnectResponse[] = [];
  const responses: ConnectResponse[] = [];
  const consumed = new Set<ConnectResponse>();
  const waiters = new Set<() => void>();
  let reportId = 0n;
  const ended = new Promise<{ code: number; details: string; metadata: grpc.Metadata }>((resolve) => {
    call.on("status", (s: grpc.StatusObject) =>
      resolve({ code: s.code, details: s.details, metadata: s.metadata }),
    );
  });
  call.on("error", () => {});
  call.on("data", (message: ConnectResponse) => {
    responses.push(message);
    if (message.message.case === "batch") received.push(...message.message.value.messages);
    else received.push(message);
    for (const w of [...waiters]) w();
  });
  void ended.then(() => {
    client.close();
    for (const w of [...waiters]) w();
  });

  let finished = false;
  void ended.then(() => {
    finished = true;
  });
  const next = <C extends Case>(kind: C, test?: (value: ValueOf<C>) => boolean) =>
    new Promise<ValueOf<C>>((resolve, reject) => {
      const look = () => {
        const found = received.find(
          (m) =>
            !consumed.has(m) &&
            m.message.case === kind &&
            (!test || test(m.message.value as unknown as ValueOf<C>)),
        );
        if (found) {
          consumed.add(found);
          waiters.delete(look);
          resolve(found.message.value as never);
        } else if (finished) {
          waiters.delete(look);
          reject(new Error(`the stream ended before a ${kind} arrived`));
        }
      };
      waiters.add(look);
      look();
    });
  const send = (request: MessageInitShape<typeof ConnectRequestSchema>) => {
    call.write(create(WorkerService.method.connect.input, request));
  };

  send({ message: { case: "hello", value: hello } });
  const welcome = await Promise.race([
    next("welcome"),
    ended.then((s) => {
      throw Object.assign(new Error(s.details), s);
    }),
  ]);
  const report = (message: (id: bigint) => MessageInitShape<typeof ConnectRequestSchema>) => {
    reportId += 1n;
    const id = reportId;
    send(message(id));
    return next("reportResult", (r) => r.reportId === id);
  };
  return {
    welcome,
    received,
    responses,
    send,
    sendBytes(bytes) {
      // Serialized already: the client's request serializer hands a Buffer on as it is.
      call.write(Buffer.from(bytes));
    },
    next,
    heartbeat(sequence, held = []) {
      send({ message: { case: "heartbeat", value: { sequence: BigInt(sequence), heldLeases: held } } });
      return next("heartbeatAck", (a) => a.sequence === BigInt(sequence));
    },
    complete(grant, outcome) {
      return report((id) => ({
        message: {
          case: "completion",
          value: {
            reportId: id,
            actionId: grant.actionId,
            epoch: grant.epoch,
            outcome:
              "error" in outcome
                ? {
                    case: "failed",
                    value: {
                      message: outcome.error,
                      retryable: outcome.retryable,
                      details: outcome.details as never,
                    },
                  }
                : { case: "succeeded", value: { output: outcome.output as never } },
          },
        },
      }));
    },
    release(grant, reason = "") {
      return report((id) => ({
        message: {
          case: "release",
          value: { reportId: id, actionId: grant.actionId, epoch: grant.epoch, reason },
        },
      }));
    },
    goodbye(reason = "") {
      send({ message: { case: "goodbye", value: { reason } } });
    },
    drop() {
      call.cancel();
    },
    ended,
  };
}

/** One ConnectRequest in gRPC's framing: a zero flag byte, the length, the message. */
export function framedRequest(message: MessageInitShape<typeof ConnectRequestSchema>): Buffer {
  return grpcFrame(WorkerService.method.connect.input, message);
}

/** How a stream opened by {@link sendAndHalfClose} ended. */
export interface HalfClosedStream {
  /** The messages received, in order (a batch's one by one). */
  readonly received: ConnectResponse[];
  /** grpc-status of the trailers; undefined if the stream was reset instead. */
  readonly code: number | undefined;
  /** grpc-message of the trailers, decoded. */
  readonly details: string;
}

/**
 * Opens a Connect stream on a bare HTTP/2 connection, writes `frames` (see
 * {@link framedRequest}) and the half-close in one write, as a worker that
 * pipelines its hello does (a grpc-js client may split them), and reads
 * the stream to its end.
 */
export async function sendAndHalfClose(
  address: string,
  frames: readonly Buffer[],
): Promise<HalfClosedStream> {
  const session = http2Connect(`http://${address}`);
  session.on("error", () => {});
  try {
    const stream = session.request({
      ":method": "POST",
      ":path": "/leasehold.v1.WorkerService/Connect",
      "content-type": "application/grpc",
      te: "trailers",
    });
    stream.on("error", () => {});
    const chunks: Buffer[] = [];
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    let trailers: Record<string, unknown> = {};
    stream.on("response", (headers) => {
      // A stream that fails before its first message carries its status in the headers.
      if (headers["grpc-status"] !== undefined) trailers = headers;
    });
    stream.on("trailers", (t) => {
      trailers = t;
    });
    const closed = new Promise<void>((resolve) => stream.on("close", resolve));
    stream.end(Buffer.concat(frames));
    await closed;
    const bytes = Buffer.concat(chunks);
    const received: ConnectResponse[] = [];
    for (let at = 0; at + 5 <= bytes.length; ) {
      const length = bytes.readUInt32BE(at + 1);
      const message = fromBinary(ConnectResponseSchema, bytes.subarray(at + 5, at + 5 + length));
      if (message.message.case === "batch") received.push(...message.message.value.messages);
      else received.push(message);
      at += 5 + length;
    }
    const status = trailers["grpc-status"];
    return {
      received,
      code: status === undefined ? undefined : Number(status),
      details: decodeURIComponent(String(trailers["grpc-message"] ?? "")),
    };
  } finally {
    session.destroy();
  }
}
