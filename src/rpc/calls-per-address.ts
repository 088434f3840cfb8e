import type { ServerHttp2Stream } from "node:http2";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import type { MethodCalls } from "./adapter.js";
import { perSecond } from "./per-second.js";
import { toStatusObject } from "./status.js";

/**
 * Open calls (unary calls being served and streams) per client address.
 *
 * The connection limit bounds connections per address and HTTP/2 bounds
 * streams per connection (256), which leaves one address 262,144 streams.
 * A client holding tens of thousands of streams that never send a hello
 * (or watches of one action) made the process spend its time on them:
 * heartbeat acks came seconds late, a well-behaved agent on another address
 * self-fenced and its action ran twice. A call past the address's limit is
 * answered RESOURCE_EXHAUSTED at once, before any work, and the rest of the
 * server never sees it. A call counts until its HTTP/2 stream closes, not
 * until its handler returns: an answer its client does not read keeps the
 * call open (see {@link callsPerAddressInterceptor}).
 */
export interface CallsPerAddress {
  /**
   * Counts a call from `peer` (grpc-js's "host:port"): the function that
   * forgets it (idempotent), or the error to answer it with when its address
   * holds its limit.
   */
  enter(peer: string): (() => void) | LeaseholdError;
}

/** Calls an address may hold open for each connection it may hold open (--max-connections-per-address). */
export const CALLS_PER_CONNECTION = 4;

const REFUSALS_PER_SECOND = 5;

/** The address of a grpc-js peer ("1.2.3.4:5", "[::1]:5"), without its port. */
export function addressOfPeer(peer: string): string {
  if (peer.startsWith("[")) {
    const end = peer.indexOf("]");
    return end === -1 ? peer : peer.slice(1, end);
  }
  const colon = peer.lastIndexOf(":");
  // More than one colon without brackets: an IPv6 address with no port.
  return colon === -1 || peer.indexOf(":") !== colon ? peer : peer.slice(0, colon);
}

/** `max` calls per address at once; 0 for no limit. */
export function limitCallsPerAddress(max: number, log: Logger): CallsPerAddress {
  const open = new Map<string, number>();
  const logRefusal = perSecond(REFUSALS_PER_SECOND);
  const NO_LIMIT = () => {};
  return {
    enter(peer) {
      if (max <= 0) return NO_LIMIT;
      const address = addressOfPeer(peer);
      const count = open.get(address) ?? 0;
      if (count >= max) {
        logRefusal((skipped) =>
          log.warn(
            { address, open: count, limit: max, ...(skipped > 0 ? { alsoRefused: skipped } : {}) },
            "call refused: its address holds as many open calls as one address may",
          ),
        );
        return new LeaseholdError(
          Code.ResourceExhausted,
          `this address (${address}) has ${count} calls open, as many as one address may: end calls it no ` +
            "longer needs (streams, watches) and retry; clients behind one address (a NAT) need the server's " +
            `--max-connections-per-address raised, which allows ${CALLS_PER_CONNECTION} open calls per connection`,
          { reason: "CALLS_PER_ADDRESS", metadata: { address, limit: String(max) } },
        );
      }
      open.set(address, count + 1);
      let left = false;
      return () => {
        if (left) return;
        left = true;
        const n = (open.get(address) ?? 1) - 1;
        if (n <= 0) open.delete(address);
        else open.set(address, n);
      };
    },
  };
}

/**
 * Counts every call (of every service: health and reflection too) against
 * its address's open calls from the moment grpc-js makes it until its HTTP/2
 * stream closes: an answer handed to grpc-js but not yet sent, because its
 * client does not read (a flow-control window of 0), holds memory and keeps
 * the call open. Counting until the handler returned let one address hold
 * 25,600 health checks, and 1,389 unsent answers of 2 MB. A call past the
 * limit ends RESOURCE_EXHAUSTED (reason CALLS_PER_ADDRESS) before its
 * request is read or its caller authenticated, counted for the metrics as
 * `methodCalls` says (none: not counted). Put it in the grpc-js server's
 * `interceptors` where it gets grpc-js's own call (its HTTP/2 stream); a
 * call of another shape passes uncounted, with one warning.
 */
export function callsPerAddressInterceptor(
  limit: CallsPerAddress,
  options: {
    readonly log: Logger;
    readonly methodCalls?: ((path: string) => MethodCalls | undefined) | undefined;
  },
): grpc.ServerInterceptor {
  let unfollowed = false;
  return (method, call) => {
    const stream = (call as { stream?: Partial<ServerHttp2Stream> }).stream;
    if (typeof stream?.once !== "function") {
      if (!unfollowed) {
        unfollowed = true;
        options.log.warn(
          { method: method.path },
          "open calls are not counted: the call is not grpc-js's own",
        );
      }
      return call as grpc.ServerInterceptingCall;
    }
    const entered = limit.enter(call.getPeer());
    if (typeof entered === "function") {
      if (stream.closed) entered();
      else stream.once("close", entered);
      // grpc-js passes the interceptors over one another, as the interface: the call goes on as it is.
      return call as grpc.ServerInterceptingCall;
    }
    const path = method.path.slice(1);
    const refuse = new grpc.ServerListenerBuilder()
      .withOnReceiveMetadata(() => {
        const status = toStatusObject(entered, options.log, path);
        const calls = options.methodCalls?.(method.path);
        calls?.started();
        calls?.ended(status.code, 0);
        call.sendStatus(status);
      })
      .build();
    // The listener passes nothing on: the call's handler never starts.
    return new grpc.ServerInterceptingCall(
      call,
      new grpc.ResponderBuilder().withStart((next) => next(refuse)).build(),
    );
  };
}
