import { setMaxListeners } from "node:events";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import * as grpc from "@grpc/grpc-js";
import { HealthImplementation } from "grpc-health-check";
import type { Logger } from "pino";
import type { Access } from "../auth/access.js";
import { Code, LeaseholdError } from "../errors.js";
import { createServiceDefinition, createServiceHandlers, type ServiceImpl } from "./adapter.js";
import { addReflection } from "./reflection.js";

/** A service and its implementation, ready to register. */
export interface ServiceBinding {
  readonly service: GenService<GenServiceMethods>;
  readonly impl: ServiceImpl<GenServiceMethods>;
}

/** Pairs a generated service with its implementation, keeping the types checked. */
export function bind<S extends GenServiceMethods>(
  service: GenService<S>,
  impl: ServiceImpl<S>,
): ServiceBinding {
  return { service, impl } as unknown as ServiceBinding;
}

/** Options of {@link createRpcServer}. */
export interface RpcServerOptions {
  /** Every service this server answers, including those not implemented yet. */
  readonly services: readonly ServiceBinding[];
  readonly log: Logger;
  /** How long `close()` waits for calls to finish before cutting them. Default 5000 ms. */
  readonly shutdownTimeoutMs?: number;
  /** Largest request message accepted. Default grpc-js's 4 MiB. */
  readonly maxReceiveMessageBytes?: number;
  /**
   * HTTP/2 streams (calls) one client connection may have open at once,
   * announced in SETTINGS_MAX_CONCURRENT_STREAMS: a conforming client queues
   * the calls past it until one ends, and a stream opened past it anyway is
   * refused (REFUSED_STREAM, which clients see as UNAVAILABLE). Default
   * {@link DEFAULT_MAX_CONCURRENT_STREAMS}.
   */
  readonly maxConcurrentStreams?: number;
  /** TEST-ONLY seam (see `HandlerDeps.accessOf`): the Access of a call from its metadata. */
  readonly accessOf?: (metadata: grpc.Metadata) => Access;
}

/** Default of `RpcServerOptions.maxConcurrentStreams`. */
export const DEFAULT_MAX_CONCURRENT_STREAMS = 256;

/** A running gRPC server. */
export interface RpcServer extends AsyncDisposable {
  /** The port it listens on (the real one when asked for port 0). */
  readonly port: number;
  /** grpc.health.v1 state, per service name ("" is the whole server). */
  readonly health: HealthImplementation;
  /**
   * Health NOT_SERVING, stop accepting, give open calls until the timeout,
   * then cut them. Idempotent.
   */
  close(): Promise<void>;
}

/** The health service names: "" for the whole server, then every service. */
function healthNames(services: readonly ServiceBinding[]): string[] {
  return ["", ...services.map((s) => s.service.typeName)];
}

/**
 * Starts a grpc-js server with our services, server reflection and
 * grpc.health.v1. Health starts NOT_SERVING; call `markServing()` when the
 * rest of the process is ready.
 */
export async function createRpcServer(
  address: string,
  credentials: grpc.ServerCredentials,
  options: RpcServerOptions,
): Promise<RpcServer & { markServing(): void; markNotServing(): void }> {
  const server = new grpc.Server({
    // Agents hold streams for days; keepalive pings find dead peers quickly.
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.min_ping_interval_without_data_ms": 5_000,
    "grpc.max_concurrent_streams": options.maxConcurrentStreams ?? DEFAULT_MAX_CONCURRENT_STREAMS,
    ...(options.maxReceiveMessageBytes
      ? { "grpc.max_receive_message_length": options.maxReceiveMessageBytes }
      : {}),
  });
  const names = healthNames(options.services);
  const shutdown = new AbortController();
  // Every open call listens here until it ends (10,000 agent streams is the
  // target), so Node's default warning at 11 listeners would be a false alarm.
  setMaxListeners(0, shutdown.signal);
  const deps = { log: options.log, shutdown: shutdown.signal, accessOf: options.accessOf };
  const health = new HealthImplementation(Object.fromEntries(names.map((n) => [n, "NOT_SERVING"])));
  for (const { service, impl } of options.services) {
    server.addService(createServiceDefinition(service), createServiceHandlers(service, impl, deps));
  }
  health.addToServer(server);
  addReflection(server, [...options.services.map((s) => s.service.typeName), "grpc.health.v1.Health"]);

  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(address, credentials, (error, boundPort) =>
      error ? reject(error) : resolve(boundPort),
    ),
  );

  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      for (const n of names) health.setStatus(n, "NOT_SERVING");
      // End open streams (watches, agent streams) with UNAVAILABLE so clients reconnect.
      shutdown.abort(
        new LeaseholdError(Code.Unavailable, "the server is shutting down; reconnect", {
          reason: "SHUTTING_DOWN",
        }),
      );
      const timeoutMs = options.shutdownTimeoutMs ?? 5_000;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, timeoutMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    })();
    return closing;
  };
  return {
    port,
    health,
    markServing: () => {
      if (closing) return;
      for (const n of names) health.setStatus(n, "SERVING");
    },
    markNotServing: () => {
      for (const n of names) health.setStatus(n, "NOT_SERVING");
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}
