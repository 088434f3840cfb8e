import { setMaxListeners } from "node:events";
import type { Server as NetServer } from "node:net";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import * as grpc from "@grpc/grpc-js";
import { HealthImplementation } from "grpc-health-check";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import {
  type CallObserver,
  createServiceDefinition,
  createServiceHandlers,
  type FastDecoders,
  type MethodCalls,
  type Refusal,
  type ServiceImpl,
  withMethodRight,
} from "./adapter.js";
import type { Authenticator } from "./authenticator.js";
import { createCallAuthorization } from "./call-authorization.js";
import {
  CALLS_PER_CONNECTION,
  callsPerAddressInterceptor,
  limitCallsPerAddress,
} from "./calls-per-address.js";
import { closeConnectionsOnClientCaChange } from "./client-ca-change.js";
import {
  type ConnectionLimit,
  type ConnectionObserver,
  DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
  defaultMaxConnections,
  limitConnections,
} from "./connection-limits.js";
import { keepEveryAuthorizationHeader } from "./duplicate-authorization.js";
import { createLargeCallLimit, type LargeCallLimit } from "./large-calls.js";
import { pushUncompressedAtOnce, refuseMalformedFraming } from "./message-push.js";
import { createPartialRequestLimit, type PartialRequestLimit } from "./partial-requests.js";
import { perSecond } from "./per-second.js";
import { addReflection } from "./reflection.js";
import { toStatusObject } from "./status.js";
import { releaseDecodedChunks } from "./stream-decoder-release.js";
import { createStreamRegistry, type StreamRegistry } from "./stream-registry.js";
import type { TlsMaterialSource } from "./tls.js";
import {
  DEFAULT_UNARY_CALLS,
  limitUnaryCalls,
  UNARY_WAITING_PER_RUNNING,
  type UnaryCallLimit,
} from "./unary-calls.js";
import { createUnsentAnswerLimit } from "./unsent-answers.js";

/** A service and its implementation, ready to register. */
export interface ServiceBinding {
  readonly service: GenService<GenServiceMethods>;
  readonly impl: ServiceImpl<GenServiceMethods>;
  /** Decoders tried first for the requests of some of its methods (see `FastDecoders`). */
  readonly fastDecoders?: FastDecoders | undefined;
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
  /**
   * How long a client connection may stay open with no call on it before the
   * server closes it (HTTP/2 GOAWAY; a gRPC client reconnects for its next
   * call). A peer that opens connections and never calls holds no socket for
   * good. Default {@link DEFAULT_MAX_CONNECTION_IDLE_MS}.
   */
  readonly maxConnectionIdleMs?: number;
  /**
   * Memory request messages still arriving may hold, across all connections;
   * the stream whose message takes the total past it is reset
   * (`PartialRequestOptions.maxBytes`). Default
   * `DEFAULT_PARTIAL_REQUEST_BYTES` (256 MiB).
   */
  readonly maxPartialRequestBytes?: number;
  /**
   * How long a request message that is arriving may gain less than 16 KiB
   * before its stream is reset (`PartialRequestOptions.stallMs`). Default
   * `DEFAULT_REQUEST_STALL_MS` (30 s).
   */
  readonly requestStallMs?: number;
  /**
   * Bytes of unary answers not yet sent the process may hold, across all
   * connections (`UnsentAnswerOptions.maxBytes`). Default
   * `DEFAULT_UNSENT_ANSWER_BYTES` (256 MiB). A call whose answer its client
   * takes none of for `requestStallMs` is reset.
   */
  readonly maxUnsentAnswerBytes?: number;
  /** Authentication of every call of `services`; none: every call is allowed (no credentials configured). */
  readonly authenticator?: Authenticator | undefined;
  /**
   * The port's TLS certificates, when it asks clients for one: on a change
   * of `--tls-client-ca`, connections whose client certificate the new CA
   * does not verify are closed (see closeConnectionsOnClientCaChange).
   */
  readonly tls?: TlsMaterialSource | undefined;
  /**
   * Who may use server reflection: `open` (anyone, the default, as grpcurl
   * users expect) or `authenticated` (any caller the authenticator accepts).
   */
  readonly reflection?: "open" | "authenticated";
  /** Counts the calls of `services` (the metrics); none: nothing is counted. */
  readonly calls?: CallObserver | undefined;
  /**
   * Connections one peer address may hold open at once (`limitConnections`),
   * and a quarter of its open calls (`limitCallsPerAddress`); 0 for no limit
   * of either. Default {@link DEFAULT_MAX_CONNECTIONS_PER_ADDRESS}.
   */
  readonly maxConnectionsPerAddress?: number;
  /** Connections the process may hold open at once. Default `defaultMaxConnections()`. */
  readonly maxConnections?: number;
  /** Counts connections opened, closed and refused (the metrics); none: nothing is counted. */
  readonly connections?: ConnectionObserver | undefined;
  /**
   * Unary calls the process serves at once (`limitUnaryCalls`); 0 for no
   * limit. Default {@link DEFAULT_UNARY_CALLS}.
   */
  readonly maxUnaryCalls?: number;
  /**
   * Unary calls that may wait for a turn; past it they are refused. Default
   * {@link UNARY_WAITING_PER_RUNNING} per call of `maxUnaryCalls`.
   */
  readonly maxUnaryWaiting?: number;
}

/** Default of `RpcServerOptions.maxConcurrentStreams`. */
export const DEFAULT_MAX_CONCURRENT_STREAMS = 256;

/** Default of `RpcServerOptions.maxConnectionIdleMs`: five minutes. */
export const DEFAULT_MAX_CONNECTION_IDLE_MS = 5 * 60_000;

/** A running gRPC server. */
export interface RpcServer extends AsyncDisposable {
  /** The port it listens on (the real one when asked for port 0). */
  readonly port: number;
  /** grpc.health.v1 state, per service name ("" is the whole server). */
  readonly health: HealthImplementation;
  /**
   * The budget of request messages still arriving, for the console's request
   * bodies to share; undefined when grpc-js's call changed shape.
   */
  readonly partialRequests: Pick<PartialRequestLimit, "hold"> | undefined;
  /** Large unary calls served and waiting their turn (large-calls.ts), for the metrics. */
  readonly largeCalls: Pick<LargeCallLimit, "counts">;
  /** Unary calls served, waiting their turn, and refused (unary-calls.ts), for the metrics. */
  readonly unaryCalls: Pick<UnaryCallLimit, "counts" | "refused">;
  /** The bounds on client connections, for the console's port to share. */
  readonly connections: Pick<ConnectionLimit, "add">;
  /**
   * Open calls checked again on reloads and expiries (stream-registry.ts),
   * for the console's streams to share; undefined without authentication.
   */
  readonly streams: StreamRegistry | undefined;
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
 * A port grpc-js could not bind, as Node's own `listen` reports one: an
 * Error with `syscall: "listen"`, the OS's `code` when there is one, and
 * the grpc-js error as its cause; so callers tell it from other errors as
 * they do for an HTTP server. grpc-js says "No address added out of total 1
 * resolved errors: [listen EADDRINUSE: address already in use
 * 127.0.0.1:50051]" (several errors, comma-separated, when a name resolved
 * to several addresses); the message keeps what is inside the brackets.
 * Its other bind errors (a name that does not resolve) keep their message.
 */
function bindFailure(error: Error): Error {
  const listen = /errors: \[(listen (E[A-Z]+): .*)\]$/.exec(error.message);
  const message = listen ? (listen[1] as string).replace(/,(?=listen E)/g, "; ") : error.message;
  return Object.assign(new Error(message, { cause: error }), {
    syscall: "listen",
    ...(listen ? { code: listen[2] } : {}),
  });
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
  // Worker streams hold no chunk between their messages (a heartbeat a second, each), and an
  // uncompressed message is handed on without a promise of its own.
  releaseDecodedChunks();
  pushUncompressedAtOnce();
  refuseMalformedFraming();
  // grpc-js holds every request message until its last byte (with authentication on, only the
  // messages of callers it accepted: see createCallAuthorization).
  const partialRequests = createPartialRequestLimit({
    log: options.log,
    maxBytes: options.maxPartialRequestBytes,
    stallMs: options.requestStallMs,
  });
  if (!partialRequests) {
    options.log.warn("grpc-js's server call changed shape: request messages still arriving are not bounded");
  }
  // Callers are authenticated as their calls start, before grpc-js reads their request.
  const onRefused = refusalLogger(options.log);
  const authorization = createCallAuthorization(
    options.services.map((s) => s.service),
    { authenticator: options.authenticator, onRefused, calls: options.calls, log: options.log },
  );
  // Answers handed to grpc-js stay in memory until their client reads them: bounded, and every call
  // counts against its address until its HTTP/2 stream closes.
  const answers = createUnsentAnswerLimit({
    log: options.log,
    maxBytes: options.maxUnsentAnswerBytes,
    stallMs: options.requestStallMs,
  });
  const callsPerAddress = limitCallsPerAddress(
    // Four calls per connection an address may hold: its connections' HTTP/2 streams alone
    // would allow 256 each.
    CALLS_PER_CONNECTION * (options.maxConnectionsPerAddress ?? DEFAULT_MAX_CONNECTIONS_PER_ADDRESS),
    options.log,
  );
  const methodCalls = new Map<string, MethodCalls | undefined>();
  for (const { service } of options.services)
    for (const method of service.methods)
      methodCalls.set(
        `/${service.typeName}/${method.name}`,
        method.methodKind === "client_streaming"
          ? undefined
          : options.calls?.method(method.methodKind, service.typeName, method.name),
      );
  // The first three need grpc-js's own call, which the authorization wraps.
  const interceptors = [
    partialRequests?.interceptor,
    answers.interceptor,
    callsPerAddressInterceptor(callsPerAddress, {
      log: options.log,
      methodCalls: (path) => methodCalls.get(path),
    }),
    authorization?.interceptor,
  ].filter((i): i is grpc.ServerInterceptor => i !== undefined);
  const server = new grpc.Server({
    // grpc-js's own call goes to the interceptors in this order (see above).
    ...(interceptors.length > 0 ? { interceptors } : {}),
    // Agents hold streams for days; keepalive pings find dead peers quickly. grpc-js's server
    // enforces no policy on its clients' pings (no too_many_pings), so none is set here (README,
    // Limits).
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.max_concurrent_streams": options.maxConcurrentStreams ?? DEFAULT_MAX_CONCURRENT_STREAMS,
    "grpc.max_connection_idle_ms": options.maxConnectionIdleMs ?? DEFAULT_MAX_CONNECTION_IDLE_MS,
    ...(options.maxReceiveMessageBytes
      ? { "grpc.max_receive_message_length": options.maxReceiveMessageBytes }
      : {}),
  });
  const names = healthNames(options.services);
  const shutdown = new AbortController();
  // Every open call listens here until it ends (10,000 agent streams is the
  // target), so Node's default warning at 11 listeners would be a false alarm.
  setMaxListeners(0, shutdown.signal);
  // Large requests waiting their turn share the budget of requests still arriving.
  const largeCalls = createLargeCallLimit({
    hold: partialRequests ? (bytes: number) => partialRequests.hold(bytes) : undefined,
  });
  // Open streams follow reloads of the credentials and the policy, and their credential's expiry.
  const authenticator = options.authenticator;
  const streams = authenticator
    ? createStreamRegistry({
        authenticator,
        requireMethodRight: withMethodRight,
        log: options.log,
      })
    : undefined;
  const deps = {
    log: options.log,
    shutdown: shutdown.signal,
    authenticator,
    streams,
    authorization,
    onRefused,
    calls: options.calls,
    largeCalls,
    answers,
    unaryCalls: limitUnaryCalls({
      running: options.maxUnaryCalls,
      waiting: options.maxUnaryWaiting,
      log: options.log,
    }),
  };
  const health = new HealthImplementation(Object.fromEntries(names.map((n) => [n, "NOT_SERVING"])));
  for (const { service, impl, fastDecoders } of options.services) {
    server.addService(
      createServiceDefinition(service, fastDecoders),
      createServiceHandlers(service, impl, deps, fastDecoders),
    );
  }
  health.addToServer(server);
  addReflection(
    options.reflection === "authenticated" && authenticator
      ? authenticatedRegistry(server, authenticator, deps.log, deps.onRefused)
      : server,
    [...options.services.map((s) => s.service.typeName), "grpc.health.v1.Health"],
  );

  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(address, credentials, (error, boundPort) => {
      if (!error) return resolve(boundPort);
      server.forceShutdown();
      partialRequests?.close();
      answers.close();
      streams?.close();
      reject(bindFailure(error));
    }),
  );
  // grpc-js keeps the HTTP/2 servers it listens with in a private map; no option bounds how many
  // connections they accept.
  const listening = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(listening instanceof Map))
    options.log.warn("grpc-js's server changed shape: its client connections are not bounded");
  const connections = limitConnections(
    listening instanceof Map ? (listening.keys() as Iterable<NetServer>) : [],
    {
      maxPerAddress: options.maxConnectionsPerAddress ?? DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
      maxTotal: options.maxConnections ?? defaultMaxConnections(),
      log: options.log,
      observer: options.connections,
    },
  );
  if (listening instanceof Map) keepEveryAuthorizationHeader(listening.keys() as Iterable<NetServer>);
  else
    options.log.warn(
      "grpc-js's server changed shape: a call with several authorization headers is not refused",
    );
  let stopCaWatch = () => {};
  if (options.tls?.requestCert) {
    if (listening instanceof Map)
      stopCaWatch = closeConnectionsOnClientCaChange(
        listening.keys() as Iterable<NetServer>,
        options.tls,
        options.log,
      );
    else
      options.log.warn(
        "grpc-js's server changed shape: connections made under an earlier --tls-client-ca are not checked again",
      );
  }

  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      stopCaWatch();
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
      partialRequests?.close();
      answers.close();
      streams?.close();
    })();
    return closing;
  };
  return {
    port,
    health,
    partialRequests,
    largeCalls,
    unaryCalls: deps.unaryCalls,
    connections,
    streams,
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

/** Refused calls logged per second at most; the rest are counted in the next line. */
const REFUSALS_PER_SECOND = 20;

/**
 * One warning per refused call, naming principal, method and reason, at most
 * {@link REFUSALS_PER_SECOND} a second so that a hostile client cannot flood
 * the log; the lines it would have cost are counted in the next one.
 */
export function refusalLogger(log: Logger): (refusal: Refusal) => void {
  const limited = perSecond(REFUSALS_PER_SECOND);
  return (refusal) =>
    limited((suppressed) =>
      log.warn(
        {
          principal: refusal.principal || undefined,
          method: refusal.method,
          code: refusal.code === Code.Unauthenticated ? "UNAUTHENTICATED" : "PERMISSION_DENIED",
          reason: refusal.reason,
          peer: refusal.peer,
          ...(suppressed > 0 ? { suppressedBefore: suppressed } : {}),
        },
        `refused ${refusal.method}: ${refusal.message}`,
      ),
    );
}

/**
 * A stand-in for `server.addService` that makes every handler of the added
 * service authenticate its caller first (reflection with
 * `--reflection=authenticated`). Any authenticated principal may use it.
 */
function authenticatedRegistry(
  server: grpc.Server,
  authenticator: Authenticator,
  log: Logger,
  onRefused: (refusal: Refusal) => void,
): Pick<grpc.Server, "addService"> {
  return {
    addService(definition, implementation) {
      const wrapped: grpc.UntypedServiceImplementation = {};
      for (const [name, handler] of Object.entries(implementation)) {
        const path = definition[name]?.path ?? name;
        wrapped[name] = ((call: grpc.ServerDuplexStream<unknown, unknown>, ...rest: unknown[]) => {
          Promise.resolve()
            .then(() => authenticator.authenticate(call))
            .then(
              () => (handler as (...args: unknown[]) => void)(call, ...rest),
              (error: unknown) => {
                if (error instanceof LeaseholdError) {
                  onRefused({
                    principal: "",
                    method: path,
                    code: error.code,
                    reason: error.reason ?? "",
                    message: error.message,
                    peer: call.getPeer(),
                  });
                }
                call.emit("error", toStatusObject(error, log, path));
              },
            );
        }) as grpc.UntypedHandleCall;
      }
      server.addService(definition, wrapped);
    },
  };
}
