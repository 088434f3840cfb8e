import { BinaryReader, BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import * as grpc from "@grpc/grpc-js";
import { WorkerService } from "../gen/leasehold/v1/worker_pb.js";
import { closeWithPendingConnections, trackingConnections } from "./pending-connections.js";

/** grpc.health.v1 `HealthCheckResponse.ServingStatus.SERVING`. */
const SERVING = 1;

const CHECK = "/grpc.health.v1.Health/Check";

/** `HealthCheckRequest { string service = 1; }`, the only request this module sends. */
const serializeRequest = (service: string): Buffer => {
  const bytes = new BinaryWriter().tag(1, WireType.LengthDelimited).string(service).finish();
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
};

/** `HealthCheckResponse { ServingStatus status = 1; }`: the status, 0 (UNKNOWN) when absent. */
const deserializeResponse = (bytes: Buffer): number => {
  const reader = new BinaryReader(bytes);
  let status = 0;
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.Varint) status = reader.int32();
    else reader.skip(wireType);
  }
  return status;
};

/** How to reach one server: the agent's own channel settings for that address. */
export interface ProbeTarget {
  readonly address: string;
  readonly credentials: grpc.ChannelCredentials;
  readonly options: grpc.ChannelOptions;
  readonly interceptors: grpc.Interceptor[];
}

/**
 * Whether the server at `target` answers grpc.health.v1 Check for the
 * worker service with SERVING within `timeoutMs`: it can reach its database
 * (a server that cannot says NOT_SERVING). Any error or a late answer is no.
 * The probe's connection is its own, closed when it ends.
 */
export async function servesWorkers(target: ProbeTarget, timeoutMs: number): Promise<boolean> {
  // async: a channel that cannot even be made (a bad address) is a no too, not a throw.
  // A connection of its own, closed with the probe even when the server never started HTTP/2.
  const client = trackingConnections(
    new grpc.Client(target.address, target.credentials, {
      ...target.options,
      "grpc.use_local_subchannel_pool": 1,
    }),
  );
  return new Promise<boolean>((resolve) => {
    checkWorkerService(
      client,
      { deadline: Date.now() + timeoutMs, interceptors: target.interceptors },
      (error, status) => resolve(!error && status === SERVING),
    );
  }).finally(() => closeWithPendingConnections(client));
}

/**
 * Whether the server behind `client`'s connection answers a grpc.health.v1
 * Check within `timeoutMs`, whatever it answers: a server that is starting,
 * or waits for its database, still answers (NOT_SERVING); a hung one (a
 * stopped process, a connection dead one way) does not. Only a deadline
 * passed without an answer is no: a connection that fails ends the client's
 * other calls anyway.
 */
export function answersOnConnection(client: grpc.Client, timeoutMs: number): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    checkWorkerService(client, { deadline: Date.now() + timeoutMs }, (error) =>
      resolve(error?.code !== grpc.status.DEADLINE_EXCEEDED),
    );
  });
}

/** Sends grpc.health.v1 Check for the worker service on `client`. */
function checkWorkerService(
  client: grpc.Client,
  options: grpc.CallOptions,
  done: (error: grpc.ServiceError | null, status?: number) => void,
): void {
  client.makeUnaryRequest(
    CHECK,
    serializeRequest,
    deserializeResponse,
    WorkerService.typeName,
    options,
    done,
  );
}
