import { createHash } from "node:crypto";
import { setMaxListeners } from "node:events";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { extname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { isLoopback } from "../config.js";
import { Code, LeaseholdError } from "../errors.js";
import type { Refusal } from "../rpc/adapter.js";
import type { Authenticator } from "../rpc/authenticator.js";
import type { ConnectionLimit } from "../rpc/connection-limits.js";
import type { PartialRequestLimit } from "../rpc/partial-requests.js";
import type { ServiceBinding } from "../rpc/server.js";
import type { TlsMaterialSource } from "../rpc/tls.js";
import { type ConsoleRouteDeps, callerValues, consoleRoutes } from "./connect-routes.js";
import { createRequestGuard } from "./request-guard.js";

/** Where `npm run build` puts the page (src/console/web bundled); the same from src/ and dist/. */
export const DEFAULT_STATIC_DIR = fileURLToPath(new URL("../../dist/console/web/", import.meta.url));

/** Options of {@link serveConsole}. */
export interface ConsoleOptions {
  readonly host: string;
  /** 0 picks a free port. */
  readonly port: number;
  /** The services to answer over Connect: the gRPC port's own implementations. */
  readonly services: readonly ServiceBinding[];
  readonly log: Logger;
  /** The gRPC port's authentication; undefined when no credentials are configured. */
  readonly authenticator: Authenticator | undefined;
  readonly onRefused?: ((refusal: Refusal) => void) | undefined;
  /** The gRPC port's open streams, which the console's join (checked again on reloads and expiries). */
  readonly streams?: ConsoleRouteDeps["streams"];
  /** The gRPC port's certificates (followed when they rotate); undefined serves plain HTTP. */
  readonly tls?: TlsMaterialSource | undefined;
  /** Largest request body accepted, as on the gRPC port. */
  readonly maxRequestBytes: number;
  /** The gRPC port's budget of requests still arriving, which API request bodies share. */
  readonly requestBodies?: Pick<PartialRequestLimit, "hold"> | undefined;
  /** The gRPC port's bounds on client connections, which this port's connections count against. */
  readonly connections?: Pick<ConnectionLimit, "add"> | undefined;
  /** A request body that gains less than 16 KiB in this long is ended; default 30 s, as on the gRPC port. */
  readonly requestStallMs?: number | undefined;
  /** The built page; default {@link DEFAULT_STATIC_DIR}. */
  readonly staticDir?: string;
  /** How long `close()` waits for open requests before cutting them. Default 2000 ms. */
  readonly shutdownTimeoutMs?: number;
}

/** The running console. */
export interface ConsoleServer {
  readonly port: number;
  /** `http://…` or `https://…`, with the bound port. */
  readonly url: string;
  /** Ends open streams (UNAVAILABLE: pages reconnect), stops accepting, cuts what is left after the timeout. */
  close(): Promise<void>;
}

const CONTENT_TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
};

/**
 * The page may load only its own files and talk only to its own origin; no
 * frame may embed it (clickjacking of the operator's buttons).
 */
const PAGE_HEADERS = {
  "content-security-policy":
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
  "cache-control": "no-cache",
} as const;

interface StaticFile {
  readonly body: Buffer;
  /** The same, gzipped once at start (the bundle shrinks to about a third). */
  readonly gzipped: Buffer;
  readonly type: string;
  readonly etag: string;
}

/** The built page's files, read once: a few hundred kilobytes at most. */
function readStaticFiles(dir: string): Map<string, StaticFile> {
  const files = new Map<string, StaticFile>();
  if (!existsSync(dir)) return files;
  for (const name of readdirSync(dir)) {
    const type = CONTENT_TYPES[extname(name)];
    if (!type) continue;
    const body = readFileSync(join(dir, name));
    const etag = `"${createHash("sha256").update(body).digest("base64url").slice(0, 22)}"`;
    files.set(`/${name}`, { body, gzipped: gzipSync(body), type, etag });
  }
  return files;
}

/** A loopback name the Host header may carry, with or without a port. */
function loopbackHost(header: string | undefined): boolean {
  if (!header) return false;
  const host = header.startsWith("[") ? header.slice(1, header.indexOf("]")) : header.split(":")[0];
  return host !== undefined && isLoopback(host);
}

/**
 * `leasehold serve --console-listen`: the web console and the v1 API over the
 * Connect protocol (HTTP/1.1, JSON or binary) on one origin.
 *
 * Guards, beside the gRPC port's authentication and rights:
 * - On a loopback address, requests must name a loopback host: a web page
 *   elsewhere that rebinds its own domain to 127.0.0.1 gets 421, not the API.
 * - Connect calls must carry `Connect-Protocol-Version`, which no HTML form
 *   can send and which makes a browser ask first (CORS preflight) before a
 *   cross-origin call; the console answers no preflight, so other origins
 *   cannot call it from a browser.
 * - The page may load nothing from elsewhere (Content-Security-Policy).
 */
export async function serveConsole(options: ConsoleOptions): Promise<ConsoleServer> {
  const { log } = options;
  const staticDir = options.staticDir ?? DEFAULT_STATIC_DIR;
  const files = readStaticFiles(staticDir);
  if (!files.has("/index.html")) {
    log.warn({ staticDir }, "the console page is not built (run `npm run build`); serving the API only");
  }
  const shutdown = new AbortController();
  setMaxListeners(0, shutdown.signal);
  const checkHost = isLoopback(options.host);

  const api = connectNodeAdapter({
    routes: consoleRoutes(options.services, {
      log,
      shutdown: shutdown.signal,
      authenticator: options.authenticator,
      onRefused: options.onRefused,
      streams: options.streams,
    }),
    contextValues: callerValues,
    // Browsers speak Connect; gRPC clients have the gRPC port.
    grpc: false,
    grpcWeb: false,
    requireConnectProtocolHeader: true,
    readMaxBytes: options.maxRequestBytes,
    fallback: (_request, response) => {
      (response as ServerResponse)
        .writeHead(404, { "content-type": "text/plain; charset=utf-8" })
        .end(
          "not found: the console serves its page at / and the v1 API at /leasehold.v1.<Service>/<Method>\n",
        );
    },
  });

  const guard = createRequestGuard({
    log,
    authenticator: options.authenticator,
    onRefused: options.onRefused,
    budget: options.requestBodies,
    maxRequestBytes: options.maxRequestBytes,
    stallMs: options.requestStallMs,
  });

  const handle = (request: IncomingMessage, response: ServerResponse) => {
    if (checkHost && !loopbackHost(request.headers.host)) {
      response
        .writeHead(421, { "content-type": "text/plain; charset=utf-8" })
        .end("this console listens on loopback and answers only to a loopback host name, e.g. 127.0.0.1\n");
      return;
    }
    const path = (request.url ?? "/").split("?")[0] ?? "/";
    const file = files.get(path === "/" ? "/index.html" : path);
    if (file && (request.method === "GET" || request.method === "HEAD")) {
      const headers = {
        ...PAGE_HEADERS,
        "content-type": file.type,
        etag: file.etag,
        vary: "accept-encoding",
      };
      if (request.headers["if-none-match"] === file.etag) {
        response.writeHead(304, headers).end();
        return;
      }
      const gzip = /\bgzip\b/.test(String(request.headers["accept-encoding"] ?? ""));
      const body = gzip ? file.gzipped : file.body;
      response.writeHead(200, {
        ...headers,
        ...(gzip ? { "content-encoding": "gzip" } : {}),
        "content-length": body.length,
      });
      response.end(request.method === "HEAD" ? undefined : body);
      return;
    }
    if (path === "/" && !file) {
      response
        .writeHead(503, { "content-type": "text/plain; charset=utf-8" })
        .end(`the console page is not built: run \`npm run build\` (looked in ${staticDir})\n`);
      return;
    }
    // Every API call has a body (Connect: POST), and is authenticated before it is read.
    if (request.method === "POST") guard(request, response, () => api(request, response));
    else api(request, response);
  };

  const tls = options.tls;
  let offRotation: (() => void) | undefined;
  let server: ReturnType<typeof createHttpServer> | ReturnType<typeof createHttpsServer>;
  if (tls) {
    const https = createHttpsServer(
      { ...tls.current(), requestCert: tls.requestCert, rejectUnauthorized: tls.rejectUnauthorized },
      handle,
    );
    // Rotated with the gRPC port: open connections keep theirs, new handshakes get the new ones.
    offRotation = tls.onChange((material) => https.setSecureContext(material));
    server = https;
  } else server = createHttpServer(handle);
  options.connections?.add(server);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  server.on("error", (error) => log.error({ err: error }, "console server error"));
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : options.port;
  const hostText = options.host.includes(":") ? `[${options.host}]` : options.host;

  let closing: Promise<void> | undefined;
  return {
    port,
    url: `${tls ? "https" : "http"}://${hostText}:${port}/`,
    close() {
      closing ??= new Promise<void>((resolve) => {
        offRotation?.();
        shutdown.abort(
          new LeaseholdError(Code.Unavailable, "the server is shutting down; reconnect", {
            reason: "SHUTTING_DOWN",
          }),
        );
        const timer = setTimeout(() => server.closeAllConnections(), options.shutdownTimeoutMs ?? 2_000);
        server.close(() => {
          clearTimeout(timer);
          resolve();
        });
        server.closeIdleConnections();
      });
      return closing;
    },
  };
}
