import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import * as grpc from "@grpc/grpc-js";
import type { Access } from "../auth/access.js";
import { authorize, type HandlerDeps, type MethodCalls, reportRefusal } from "./adapter.js";
import { type CallCredentials, certificateRefusalOf } from "./authenticator.js";
import { toStatusObject } from "./status.js";

/** Authorization of the calls of our services as they start. */
export interface CallAuthorization {
  /** Put it in the grpc-js server's `interceptors`, after the partial-request limit. */
  readonly interceptor: grpc.ServerInterceptor;
  /**
   * The access the interceptor gave the call whose request metadata these
   * are; undefined for a call it did not see (the handler authorizes it then).
   */
  accessOf(metadata: grpc.Metadata): Access | undefined;
}

/**
 * The TLS socket of a call's connection, read from grpc-js's
 * `BaseServerInterceptingCall` (1.14: `stream.session.socket`, as grpc-js's
 * own `getAuthContext` reads it); undefined if the call has another shape.
 */
function socketOf(call: grpc.ServerInterceptingCallInterface): unknown {
  return (call as { stream?: { session?: { socket?: unknown } } }).stream?.session?.socket;
}

/**
 * Authenticates every call of `services` when it starts, from its metadata
 * and its connection, and checks the method's right (`authorize`), before
 * grpc-js reads anything of its request: grpc-js hands a unary or
 * server-streaming call to its handler only once the whole request message
 * has come, and callers without credentials could make the server hold
 * request messages up to the budget of those still arriving
 * (partial-requests.ts), crowding out authenticated uploads. A refused call
 * ends with the status the handler would have sent (counted, and logged
 * through `onRefused`); its request is never read, and what its client
 * still sends is dropped as it comes. The handler takes the access given
 * here (`accessOf`) and checks what depends on the request (its cluster)
 * once it is decoded. Other methods (health, reflection, and streams the
 * client writes to, whose handlers start when they open) pass untouched.
 * Undefined when there is no authenticator: every call is allowed.
 */
export function createCallAuthorization(
  services: readonly GenService<GenServiceMethods>[],
  deps: Pick<HandlerDeps, "authenticator" | "onRefused" | "calls" | "log">,
): CallAuthorization | undefined {
  if (!deps.authenticator) return undefined;
  const methods = new Map<string, { readonly path: string; readonly calls: MethodCalls | undefined }>();
  for (const service of services) {
    for (const method of service.methods) {
      const path = `${service.typeName}/${method.name}`;
      // A stream the client writes to reaches its handler when it opens, which authorizes it before
      // reading a message (worker streams): wrapping it would only add a layer to every message.
      if (method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming") continue;
      methods.set(`/${path}`, {
        path,
        calls: deps.calls?.method(method.methodKind, service.typeName, method.name),
      });
    }
  }
  const granted = new WeakMap<grpc.Metadata, Access>();

  const interceptor: grpc.ServerInterceptor = (descriptor, call) => {
    const method = methods.get(descriptor.path);
    // grpc-js passes the interceptors over one another, as the interface: the call goes on as it is.
    if (!method) return call as grpc.ServerInterceptingCall;
    const refuse = (error: unknown) => {
      reportRefusal(error, deps.onRefused, { path: method.path, peer: call.getPeer(), access: undefined });
      const status = toStatusObject(error, deps.log, method.path);
      method.calls?.started();
      method.calls?.ended(status.code, 0);
      call.sendStatus(status);
    };
    const listener = new grpc.ServerListenerBuilder()
      .withOnReceiveMetadata((metadata, next) => {
        const credentials: CallCredentials = {
          metadata,
          getAuthContext: () => call.getAuthContext(),
          // grpc-js's auth context leaves out a certificate that did not verify, as if none came.
          certificateRefusal: () => certificateRefusalOf(socketOf(call)),
        };
        const pass = (access: Access) => {
          granted.set(metadata, access);
          next(metadata);
        };
        let access: Access | Promise<Access>;
        try {
          access = authorize(credentials, deps, method.path);
        } catch (error) {
          return refuse(error);
        }
        // A cached credential answers at once: no promise, no turn of the event loop.
        if (access instanceof Promise) access.then(pass, refuse);
        else pass(access);
      })
      .build();
    return new grpc.ServerInterceptingCall(
      call,
      new grpc.ResponderBuilder().withStart((next) => next(listener)).build(),
    );
  };

  return {
    interceptor,
    accessOf: (metadata) => granted.get(metadata),
  };
}
