import { X509Certificate } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { isIP } from "node:net";
import { createSecureContext } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { isLoopback } from "../config.js";
import { LeaseholdError, quote } from "../errors.js";
import { singleHostName } from "./targets.js";

/** How a client proves itself and checks the server. */
export interface ClientSecurity {
  /** PEM file of the CA(s) that signed the server's certificate. Setting it (or tlsCert) turns TLS on. */
  readonly tlsCa?: string | undefined;
  /** PEM client certificate and key for mTLS (both or neither). Setting them turns TLS on. */
  readonly tlsCert?: string | undefined;
  readonly tlsKey?: string | undefined;
  /** Use TLS with the system's trusted CAs even without tlsCa. */
  readonly tls?: boolean | undefined;
  /**
   * Name to verify in the server's certificate instead of the address's host
   * (grpc.ssl_target_name_override + grpc.default_authority). Needs TLS.
   */
  readonly serverName?: string | undefined;
  /** Bearer token sent as `authorization: Bearer <token>` on every call. */
  readonly token?: string | undefined;
  /**
   * File holding the bearer token (surrounding whitespace ignored); read at
   * creation, then again before a call whenever the file changed (rotated
   * tokens, e.g. Kubernetes projected tokens). A file that cannot be read at
   * that moment keeps the last token in use. Exclusive with `token`.
   */
  readonly tokenFile?: string | undefined;
}

/** What a client channel is built from: pass all three to `createClient`. */
export interface ClientChannel {
  readonly credentials: grpc.ChannelCredentials;
  readonly options: grpc.ChannelOptions;
  /** Interceptors that add the token where call credentials cannot be used (plaintext to loopback). */
  readonly interceptors: grpc.Interceptor[];
  /** Whether the channel uses TLS. */
  readonly tls: boolean;
  /** Whether the name to verify was given (`serverName`); otherwise it follows the address dialed. */
  readonly serverNameFixed: boolean;
}

/** The flag (and environment) name of each field, for messages: the CLI is where most of them come from. */
const FLAG = {
  tlsCa: "--tls-ca",
  tlsCert: "--tls-cert",
  tlsKey: "--tls-key",
  tls: "--tls",
  serverName: "--tls-server-name",
  token: "--token",
  tokenFile: "--token-file",
} as const;

/** RFC 6750 tokens are visible ASCII; anything else cannot travel in a metadata value. */
const TOKEN_CHARS = /^[\x21-\x7e]+$/;

/**
 * The credentials, channel options and interceptors of a client of
 * `addresses` (host:port each, as given to `--server`). Certificate and key
 * files are read here, once. Throws LeaseholdError.invalidArgument naming the
 * flag on a bad combination or an unreadable file:
 * - TLS is on when `tls`, `tlsCa` or `tlsCert` is set; `tlsCert` and `tlsKey`
 *   go together; `serverName` needs TLS;
 * - `token` and `tokenFile` are exclusive. With TLS the token travels as call
 *   credentials. Without TLS it is sent only when every address is loopback
 *   (127.x, ::1, localhost), by an interceptor, since grpc-js refuses call
 *   credentials on insecure channels; to any other host it is refused rather
 *   than sent in plaintext.
 */
export function clientChannel(security: ClientSecurity, addresses: readonly string[]): ClientChannel {
  const s = security;
  if (s.tlsKey && !s.tlsCert)
    throw LeaseholdError.invalidArgument(FLAG.tlsKey, "needs --tls-cert: give the client certificate too");
  if (s.tlsCert && !s.tlsKey)
    throw LeaseholdError.invalidArgument(
      FLAG.tlsCert,
      "needs --tls-key: give the client certificate's key too",
    );
  if (s.token && s.tokenFile)
    throw LeaseholdError.invalidArgument(FLAG.token, "give either --token or --token-file, not both");
  const tls = Boolean(s.tls || s.tlsCa || s.tlsCert);
  if (s.serverName && !tls)
    throw LeaseholdError.invalidArgument(
      FLAG.serverName,
      "applies only to TLS; add --tls-ca (or --tls for the system's trusted CAs)",
    );

  const token = tokenSource(s);
  if (!tls) {
    const interceptors: grpc.Interceptor[] = [];
    if (token) {
      const remote = addresses.find((a) => !isLocalTarget(a));
      if (remote !== undefined) {
        throw LeaseholdError.invalidArgument(
          FLAG.token,
          `refusing to send a token in plaintext to ${hostOf(remote)}; use TLS (--tls-ca) or a loopback address`,
        );
      }
      interceptors.push(tokenInterceptor(token));
    }
    return {
      credentials: grpc.credentials.createInsecure(),
      // grpc-js sends a channel through the proxy http_proxy or grpc_proxy names, loopback
      // addresses included: the token would cross the network in plaintext after all.
      options: token ? { "grpc.enable_http_proxy": 0 } : {},
      interceptors,
      tls: false,
      serverNameFixed: false,
    };
  }

  const ca = s.tlsCa ? readPem("tlsCa", s.tlsCa) : null;
  const cert = s.tlsCert ? readPem("tlsCert", s.tlsCert) : null;
  const key = s.tlsKey ? readPem("tlsKey", s.tlsKey) : null;
  // Node parses PEM lazily, at the handshake; parsing now turns a wrong file into a usage error
  // that names the flag instead of an UNAVAILABLE on every call.
  // (A CA bundle is checked by its first certificate: createSecureContext skips what is not PEM.)
  if (ca) checkPem("tlsCa", () => new X509Certificate(ca));
  if (cert && key) checkPem("tlsCert", () => createSecureContext({ cert, key }));
  const ssl = grpc.credentials.createSsl(ca, key, cert);
  const credentials = token
    ? grpc.credentials.combineChannelCredentials(
        ssl,
        grpc.credentials.createFromMetadataGenerator((_params, callback) =>
          callback(null, bearerMetadata(token())),
        ),
      )
    : ssl;
  // Several addresses become one list of IPs (or the agent dials a name's IPs one by one): the
  // certificate is still checked against the name they were given with, when there is one.
  const name = s.serverName ?? (addresses.length > 1 ? singleHostName(addresses) : undefined);
  const options: grpc.ChannelOptions = s.serverName
    ? { "grpc.ssl_target_name_override": s.serverName, "grpc.default_authority": s.serverName }
    : name
      ? { "grpc.ssl_target_name_override": name }
      : {};
  return { credentials, options, interceptors: [], tls: true, serverNameFixed: Boolean(s.serverName) };
}

/**
 * The channel of a client that takes either raw `credentials` or `security`
 * (the SDK's options): `clientChannel(security)`, or the credentials as they
 * are (insecure when neither is given). Both at once is INVALID_ARGUMENT.
 */
export function channelOf(
  given: { readonly credentials?: grpc.ChannelCredentials; readonly security?: ClientSecurity },
  addresses: readonly string[],
): ClientChannel {
  if (given.security && given.credentials) {
    throw LeaseholdError.invalidArgument("security", "give either credentials or security, not both");
  }
  if (given.security) return clientChannel(given.security, addresses);
  const credentials = given.credentials ?? grpc.credentials.createInsecure();
  return { credentials, options: {}, interceptors: [], tls: credentials._isSecure(), serverNameFixed: false };
}

function readPem(field: "tlsCa" | "tlsCert" | "tlsKey", path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    throw LeaseholdError.invalidArgument(
      FLAG[field],
      `cannot read ${quote(path)}: ${(error as Error).message}`,
    );
  }
}

function checkPem(field: "tlsCa" | "tlsCert", parse: () => unknown): void {
  try {
    parse();
  } catch (error) {
    const what =
      field === "tlsCa"
        ? "is not a PEM certificate (or bundle) of a CA"
        : "and --tls-key are not a matching PEM certificate and unencrypted private key";
    throw LeaseholdError.invalidArgument(FLAG[field], `${what} (${(error as Error).message})`);
  }
}

/** The current token, or undefined when none is configured. */
function tokenSource(s: ClientSecurity): (() => string) | undefined {
  if (s.token) {
    const token = s.token.trim();
    if (!TOKEN_CHARS.test(token))
      throw LeaseholdError.invalidArgument(
        FLAG.token,
        "must be printable ASCII without spaces or line breaks",
      );
    return () => token;
  }
  if (!s.tokenFile) return undefined;
  const path = s.tokenFile;
  const version = () => {
    const st = statSync(path);
    return `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
  };
  let seen: string;
  let token: string;
  try {
    seen = version();
    token = readFileSync(path, "utf8").trim();
  } catch (error) {
    throw LeaseholdError.invalidArgument(
      FLAG.tokenFile,
      `cannot read ${quote(path)}: ${(error as Error).message}`,
    );
  }
  if (!TOKEN_CHARS.test(token)) {
    throw LeaseholdError.invalidArgument(
      FLAG.tokenFile,
      `${quote(path)} must hold one token: printable ASCII without spaces or line breaks`,
    );
  }
  // One stat per call: cheap next to a call, and it notices a rotation at once (a projected
  // token is replaced by swapping a symlink, which changes the inode stat follows to).
  return () => {
    try {
      const now = version();
      if (now !== seen) {
        const next = readFileSync(path, "utf8").trim();
        // Mid-rotation (empty or partly written): keep the last token, look again next call.
        if (TOKEN_CHARS.test(next)) {
          token = next;
          seen = now;
        }
      }
    } catch {
      // Unreadable for now: the last token may still be valid; the server decides.
    }
    return token;
  };
}

function bearerMetadata(token: string): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

/** Adds `authorization: Bearer <token>` to every call's metadata (a copy: the caller's stays as it was). */
function tokenInterceptor(token: () => string): grpc.Interceptor {
  return (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        const withToken = metadata.clone();
        withToken.set("authorization", `Bearer ${token()}`);
        next(withToken, listener);
      },
    });
}

/** The host of a target (`host:port`, `[v6]:port`, `dns:///host:port`, `ipv4:a:p,b:p`, …), for messages. */
function hostOf(target: string): string {
  return hostsOf(target)[0] ?? target;
}

/** Every host a target names. */
function hostsOf(target: string): string[] {
  let rest = target.trim();
  const scheme = /^(dns|ipv4|ipv6):(?:\/\/[^/]*\/)?/.exec(rest);
  if (scheme) rest = rest.slice(scheme[0].length);
  return rest
    .split(",")
    .map((a) => a.trim())
    .filter((a) => a !== "")
    .map((a) => {
      if (isIP(a) !== 0) return a; // a bare address, IPv6 without brackets included
      const bracketed = /^\[([^\]]+)\](?::\d+)?$/.exec(a);
      if (bracketed) return bracketed[1] as string;
      const colon = a.lastIndexOf(":");
      return colon > 0 ? a.slice(0, colon) : a;
    });
}

/** Whether every host of `target` is this machine: loopback addresses and names, or a Unix socket. */
function isLocalTarget(target: string): boolean {
  if (/^unix(-abstract)?:/.test(target.trim())) return true;
  const hosts = hostsOf(target);
  return hosts.length > 0 && hosts.every((h) => isLoopback(h.toLowerCase()));
}
