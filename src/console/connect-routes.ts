import type { PeerCertificate, TLSSocket } from "node:tls";
import {
  type DescMethod,
  type DescService,
  fromBinary,
  type MessageShape,
  toBinary,
} from "@bufbuild/protobuf";
import {
  type HandlerContext as ConnectContext,
  ConnectError,
  type ConnectRouter,
  type ContextValues,
  createContextKey,
  createContextValues,
} from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import type { Access } from "../auth/access.js";
import type { LeaseholdError } from "../errors.js";
import {
  authorize,
  EncodedResponse,
  type HandlerContext,
  type Refusal,
  reportRefusal,
} from "../rpc/adapter.js";
import type { Authenticator, CallCredentials } from "../rpc/authenticator.js";
import { requestValidator } from "../rpc/request-validator.js";
import type { ServiceBinding } from "../rpc/server.js";
import { toStatus } from "../rpc/status.js";
import type { StreamRegistry } from "../rpc/stream-registry.js";

/** What the console's Connect routes need from the server. */
export interface ConsoleRouteDeps {
  readonly log: Logger;
  /** Aborted when the console closes: open streams end UNAVAILABLE, so pages reconnect. */
  readonly shutdown: AbortSignal;
  /** The gRPC port's authentication; undefined when no credentials are configured. */
  readonly authenticator: Authenticator | undefined;
  /** Logs one refused call, as the gRPC port does. */
  readonly onRefused?: ((refusal: Refusal) => void) | undefined;
  /**
   * The gRPC port's open streams, which the console's join: checked again
   * on reloads and expiries. None: a stream is checked when it opens.
   */
  readonly streams?: Pick<StreamRegistry, "open"> | undefined;
}

/** What the HTTP request tells of its caller, passed from the Node adapter to the handlers. */
interface Caller {
  readonly peer: string;
  /** The client certificate, only when it verified against --tls-client-ca. */
  readonly certificate: PeerCertificate | undefined;
}

const callerKey = createContextKey<Caller>({ peer: "unknown", certificate: undefined });

/**
 * Per-request context values for `connectNodeAdapter`: the peer address and
 * a verified client certificate, which the Connect handler context does not
 * carry by itself.
 */
export function callerValues(request: { readonly socket: unknown }): ContextValues {
  const socket = request.socket as TLSSocket;
  const certificate =
    socket.authorized && typeof socket.getPeerCertificate === "function"
      ? socket.getPeerCertificate()
      : undefined;
  const host = socket.remoteAddress ?? "unknown";
  const peer = host.includes(":") ? `[${host}]:${socket.remotePort}` : `${host}:${socket.remotePort}`;
  return createContextValues().set(callerKey, {
    peer,
    certificate: certificate && Object.keys(certificate).length > 0 ? certificate : undefined,
  });
}

/**
 * The same service implementations the gRPC port runs, registered on a
 * Connect router: one v1 API, two transports. Each call is authorized with
 * the gRPC port's authenticator and method rights, each request is checked
 * by the same validator as on the gRPC port, and each error becomes the same
 * status (code, message, ErrorInfo and field violations). Bidirectional
 * methods (the agents' stream) are left out: browsers cannot open them over
 * HTTP/1.1, and agents use the gRPC port.
 */
export function consoleRoutes(
  bindings: readonly ServiceBinding[],
  deps: ConsoleRouteDeps,
): (router: ConnectRouter) => void {
  return (router) => {
    for (const { service, impl } of bindings) {
      const methods: Record<string, unknown> = {};
      for (const method of service.methods) {
        const fn = (impl as Record<string, unknown>)[method.localName];
        if (typeof fn !== "function") continue;
        if (method.methodKind === "unary") methods[method.localName] = unary(service, method, fn, deps);
        else if (method.methodKind === "server_streaming")
          methods[method.localName] = serverStream(service, method, fn, deps);
      }
      // Methods left out answer UNIMPLEMENTED (Connect's router does that).
      router.service(service as DescService, methods as never);
    }
  };
}

type UnaryFn = (request: unknown, ctx: HandlerContext) => Promise<unknown>;
type StreamFn = (request: unknown, ctx: HandlerContext) => AsyncIterable<unknown>;

/** The call as the authenticator reads it: headers as metadata, and the verified certificate. */
function credentialsOf(
  connect: ConnectContext,
  caller: Caller,
): CallCredentials & { metadata: grpc.Metadata } {
  const metadata = new grpc.Metadata();
  connect.requestHeader.forEach((value, key) => {
    // Binary headers mean nothing to any handler; the rest pass as they are (authorization, traceparent).
    if (!key.endsWith("-bin")) metadata.add(key, value);
  });
  return { metadata, getAuthContext: () => ({ sslPeerCertificate: caller.certificate }) };
}

/**
 * Authorizes the call, validates its request and builds the handler context
 * the gRPC port would; the context's signal follows the HTTP request, its
 * timeout and the console's shutdown.
 */
async function prepare(
  service: DescService,
  method: DescMethod,
  request: unknown,
  connect: ConnectContext,
  deps: ConsoleRouteDeps,
  validate: ReturnType<typeof requestValidator>,
  /** Ends the call (a stream whose credentials changed): aborts its signal. */
  ended?: AbortSignal,
): Promise<HandlerContext & { readonly credentials: CallCredentials }> {
  const caller = connect.values.get(callerKey);
  const call = credentialsOf(connect, caller);
  const path = `${service.typeName}/${method.name}`;
  const access = await authorize(call, deps, path);
  const invalid = validate(request as MessageShape<DescService["methods"][number]["input"]>);
  if (invalid) throw invalid;
  const timeoutMs = connect.timeoutMs();
  return {
    credentials: call,
    signal: AbortSignal.any([connect.signal, deps.shutdown, ...(ended ? [ended] : [])]),
    deadline: timeoutMs === undefined ? undefined : new Date(Date.now() + timeoutMs),
    peer: caller.peer,
    metadata: call.metadata,
    access,
    // As the gRPC port measures it (a SubmitActions answer is bounded by its request's size);
    // measured only when asked, as most calls never do.
    get requestBytes() {
      return method.methodKind === "unary"
        ? toBinary(method.input, request as MessageShape<typeof method.input>).byteLength
        : 0;
    },
  };
}

/** A thrown error as the Connect error with the gRPC port's status; refusals are logged first. */
function toConnectError(
  error: unknown,
  service: DescService,
  method: DescMethod,
  deps: ConsoleRouteDeps,
  caller: Caller,
  access: Access | undefined,
): ConnectError {
  const path = `${service.typeName}/${method.name}`;
  reportRefusal(error, deps.onRefused, { path, peer: caller.peer, access });
  return connectErrorOf(error, deps.log, path);
}

/** A thrown error as the Connect error carrying the gRPC port's status, details included. */
export function connectErrorOf(error: unknown, log: Logger, path: string): ConnectError {
  const status = toStatus(error, log, path);
  const connectError = new ConnectError(status.message, status.code as number);
  // Already encoded: ErrorInfo, BadRequest, PreconditionFailure as the gRPC port sends them.
  for (const any of status.details) {
    connectError.details.push({
      type: any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1),
      value: any.value,
    });
  }
  return connectError;
}

function unary(service: DescService, method: DescMethod, fn: unknown, deps: ConsoleRouteDeps) {
  const validate = requestValidator(method.input);
  return async (request: unknown, connect: ConnectContext) => {
    let ctx: HandlerContext | undefined;
    try {
      ctx = await prepare(service, method, request, connect, deps, validate);
      const response = await (fn as UnaryFn)(request, ctx);
      return response instanceof EncodedResponse ? fromBinary(method.output, response.bytes) : response;
    } catch (error) {
      throw toConnectError(error, service, method, deps, connect.values.get(callerKey), ctx?.access);
    }
  };
}

function serverStream(service: DescService, method: DescMethod, fn: unknown, deps: ConsoleRouteDeps) {
  const validate = requestValidator(method.input);
  const path = `${service.typeName}/${method.name}`;
  return async function* (request: unknown, connect: ConnectContext) {
    let ctx: HandlerContext | undefined;
    // Set when the registry ends the stream: its credentials no longer allow it.
    let revoked: LeaseholdError | undefined;
    const ending = new AbortController();
    let forget = () => {};
    try {
      const prepared = await prepare(service, method, request, connect, deps, validate, ending.signal);
      ctx = prepared;
      if (deps.streams && prepared.access.enforced) {
        const opened = deps.streams.open({
          credentials: prepared.credentials,
          path,
          access: prepared.access,
          end(error) {
            revoked ??= error;
            ending.abort(error);
          },
        });
        forget = opened.close;
        ctx = { ...prepared, access: opened.access };
      }
      for await (const message of (fn as StreamFn)(request, ctx)) {
        if (ctx.signal.aborted) break;
        yield message;
      }
      if (revoked) throw revoked;
      // A stream the console's shutdown ended says so, so that the page reconnects.
      if (deps.shutdown.aborted) throw deps.shutdown.reason;
    } catch (error) {
      throw toConnectError(
        revoked ?? error,
        service,
        method,
        deps,
        connect.values.get(callerKey),
        ctx?.access,
      );
    } finally {
      forget();
    }
  };
}
