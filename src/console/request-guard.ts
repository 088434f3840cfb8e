import type { IncomingMessage, ServerResponse } from "node:http";
import type { TLSSocket } from "node:tls";
import { codeToHttpStatus, errorToJson } from "@connectrpc/connect/protocol-connect";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Code, LeaseholdError } from "../errors.js";
import type { Refusal } from "../rpc/adapter.js";
import { type Authenticator, certificateRefusalOf } from "../rpc/authenticator.js";
import {
  DEFAULT_REQUEST_STALL_MS,
  type PartialRequestLimit,
  STALL_PROGRESS_BYTES,
} from "../rpc/partial-requests.js";
import { perSecond } from "../rpc/per-second.js";
import { connectErrorOf } from "./connect-routes.js";

/** Options of {@link createRequestGuard}. */
export interface RequestGuardOptions {
  readonly log: Logger;
  /** The gRPC port's authentication; undefined when no credentials are configured. */
  readonly authenticator: Authenticator | undefined;
  readonly onRefused?: ((refusal: Refusal) => void) | undefined;
  /** The gRPC port's budget of requests still arriving, shared; undefined: not bounded. */
  readonly budget: Pick<PartialRequestLimit, "hold"> | undefined;
  /** Largest request body accepted: what a body without a length is counted as. */
  readonly maxRequestBytes: number;
  /** A body that gains less than 16 KiB in this long is ended. Default 30 s, as on the gRPC port. */
  readonly stallMs?: number | undefined;
}

/** Log lines about ended requests per second at most. */
const ENDED_LOGGED_PER_SECOND = 10;

/**
 * The console's API requests, before their body is read: the same bounds as
 * the gRPC port puts on request messages still arriving (rpc/partial-requests.ts).
 * - The caller is authenticated from the headers (and the client
 *   certificate) first: a caller without valid credentials is answered
 *   UNAUTHENTICATED at once, and its body is never read or held.
 * - The body is counted against the gRPC port's server-wide budget, as what
 *   its Content-Length announces (the largest body accepted when it names
 *   none), from its first byte until it has all arrived: one that would take
 *   the total past the budget is answered RESOURCE_EXHAUSTED (reason
 *   PARTIAL_REQUESTS_OVER_BUDGET) unread.
 * - A body that gains less than 16 KiB in a stall period is answered
 *   RESOURCE_EXHAUSTED (reason REQUEST_STALLED) and its connection closed.
 * Each answer closes the connection (`connection: close`): HTTP/1.1 cannot
 * skip the rest of a body other than by reading it.
 */
export function createRequestGuard(
  options: RequestGuardOptions,
): (request: IncomingMessage, response: ServerResponse, next: () => void) => void {
  const { log } = options;
  const stallMs = options.stallMs ?? DEFAULT_REQUEST_STALL_MS;
  const logLimited = perSecond(ENDED_LOGGED_PER_SECOND);

  const refuse = (request: IncomingMessage, response: ServerResponse, error: LeaseholdError) => {
    const path = (request.url ?? "/").split("?")[0] ?? "/";
    if (error.code === Code.Unauthenticated) {
      options.onRefused?.({
        principal: "",
        method: path.replace(/^\//, ""),
        code: error.code,
        reason: error.reason ?? "",
        message: error.message,
        peer: `${request.socket.remoteAddress}:${request.socket.remotePort}`,
      });
    } else {
      logLimited((suppressed) =>
        log.warn(
          {
            path,
            reason: error.reason,
            peer: request.socket.remoteAddress,
            ...(suppressed > 0 ? { suppressedBefore: suppressed } : {}),
          },
          `ended a request of ${path}: ${error.message}`,
        ),
      );
    }
    if (!response.headersSent) {
      const connectError = connectErrorOf(error, log, path);
      const body = JSON.stringify(errorToJson(connectError, undefined));
      response.writeHead(codeToHttpStatus(connectError.code), {
        "content-type": "application/json",
        "content-length": Buffer.byteLength(body),
        connection: "close",
      });
      response.end(body);
    }
    // What is left of the body is not read: the connection goes once the answer is out.
    response.once("finish", () => request.socket.destroySoon());
    if (response.writableFinished) request.socket.destroySoon();
  };

  return (request, response, next) => {
    const authenticated = options.authenticator
      ? Promise.resolve().then(() => options.authenticator?.authenticate(credentialsOf(request)))
      : Promise.resolve();
    // Nothing of the body is read meanwhile: the request stream is not consumed until `next`.
    const admit = () => {
      if (request.complete) return next();
      const length = Number(request.headers["content-length"]);
      const announced = Number.isSafeInteger(length) && length >= 0 ? length : options.maxRequestBytes;
      const release = options.budget
        ? options.budget.hold(Math.min(announced, options.maxRequestBytes))
        : () => {};
      if (!release) {
        refuse(
          request,
          response,
          new LeaseholdError(
            Code.ResourceExhausted,
            "requests still arriving hold as much memory as the server allows; try again later",
            { reason: "PARTIAL_REQUESTS_OVER_BUDGET" },
          ),
        );
        return;
      }
      const socket = request.socket;
      let mark = socket.bytesRead;
      let timer: NodeJS.Timeout | undefined;
      const done = () => {
        clearInterval(timer);
        release();
      };
      timer = setInterval(() => {
        if (request.complete) return done();
        if (socket.bytesRead - mark >= STALL_PROGRESS_BYTES) {
          mark = socket.bytesRead;
          return;
        }
        done();
        refuse(
          request,
          response,
          new LeaseholdError(
            Code.ResourceExhausted,
            `the request body gained less than ${STALL_PROGRESS_BYTES / 1024} KiB in ${stallMs / 1000} s`,
            { reason: "REQUEST_STALLED" },
          ),
        );
        socket.destroy();
      }, stallMs);
      timer.unref();
      request.once("end", done);
      request.once("close", done);
      next();
    };
    authenticated.then(admit, (error: unknown) => {
      // Refused credentials are final; anything else (a JWKS that cannot be fetched) the call's
      // own handler answers, as on the gRPC port.
      if (error instanceof LeaseholdError && error.code === Code.Unauthenticated)
        refuse(request, response, error);
      else admit();
    });
  };
}

/** The credentials of an HTTP request, as the authenticator reads a call's. */
function credentialsOf(request: IncomingMessage) {
  const metadata = new grpc.Metadata();
  const authorization = request.headers.authorization;
  if (authorization !== undefined) metadata.add("authorization", authorization);
  const socket = request.socket as TLSSocket;
  const certificate =
    socket.authorized && typeof socket.getPeerCertificate === "function"
      ? socket.getPeerCertificate()
      : undefined;
  return {
    metadata,
    getAuthContext: () => ({
      sslPeerCertificate: certificate && Object.keys(certificate).length > 0 ? certificate : undefined,
    }),
    certificateRefusal: () => certificateRefusalOf(socket),
  };
}
