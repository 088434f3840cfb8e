import type { PeerCertificate } from "node:tls";
import type * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import {
  type Access,
  accessOf,
  type Identity,
  principalProblem,
  UNAUTHENTICATED_REASON,
} from "../auth/access.js";
import type { JwtVerifier } from "../auth/jwt.js";
import { looksLikeJwt } from "../auth/jwt.js";
import type { Policy } from "../auth/policy.js";
import type { StaticTokens } from "../auth/static-tokens.js";
import { Code, LeaseholdError } from "../errors.js";
import { principalOfCertificate } from "./tls.js";

/** What authentication reads of a call. */
export interface CallCredentials {
  readonly metadata: grpc.Metadata;
  /** grpc-js's auth context: the client certificate, only when it verified against the client CA. */
  getAuthContext(): { readonly sslPeerCertificate?: PeerCertificate | undefined };
  /**
   * Why the client certificate the peer presented was not accepted (see
   * {@link certificateRefusalOf}); undefined when it presented none, or it
   * was accepted, or this is not known. Asked only for a call that proved
   * nothing else, to say why in its refusal.
   */
  certificateRefusal?(): string | undefined;
}

/**
 * Why the client certificate presented on `socket` (a TLS socket, or the
 * proxy of one an HTTP/2 session has) was not accepted: Node's
 * `authorizationError`, e.g. CERT_HAS_EXPIRED or
 * UNABLE_TO_VERIFY_LEAF_SIGNATURE. Undefined when the peer presented none,
 * or it verified, or `socket` is no TLS socket. Under `--tls-client-auth
 * optional` such a certificate is ignored, and its caller is left without
 * credentials unless it sent a token.
 */
export function certificateRefusalOf(socket: unknown): string | undefined {
  const tls = socket as
    | { authorized?: unknown; authorizationError?: unknown; getPeerCertificate?: unknown }
    | undefined;
  if (tls?.authorized !== false || typeof tls.getPeerCertificate !== "function") return undefined;
  const presented = (tls.getPeerCertificate as () => { raw?: unknown } | null)();
  if (!presented?.raw) return undefined;
  const why = tls.authorizationError;
  if (why instanceof Error) return (why as { code?: unknown }).code?.toString() || why.message;
  return why === undefined || why === null ? "not verified" : String(why);
}

/** Turns a call's credentials into what the caller may do. */
export interface Authenticator {
  /** The caller's access; throws UNAUTHENTICATED when it proved nothing (or something invalid). */
  authenticate(call: CallCredentials): Access | Promise<Access>;
  /**
   * Calls `listener` whenever what `authenticate` decides may have changed:
   * the token file, a JWKS file or the policy was reloaded. Open streams are
   * checked again then (stream-registry.ts). Returns its off.
   */
  onChange?(listener: () => void): () => void;
}

/** Options of {@link createAuthenticator}. */
export interface AuthenticatorOptions {
  readonly policy: Policy;
  /** Static tokens (`--auth-tokens`), if configured. */
  readonly staticTokens?: StaticTokens | undefined;
  /** JWT verification (`--jwt-jwks`), if configured. */
  readonly jwt?: JwtVerifier | undefined;
  readonly log: Logger;
  /** Clock for cache expiry (tests). Default Date.now. */
  readonly now?: () => number;
}

/** Entries of the token cache; past it the cache starts over (a flood of distinct tokens costs verification, not memory). */
const CACHE_ENTRIES = 10_000;
/** Longest a verified JWT is trusted without verifying it again, even when it expires later. */
const CACHE_MS = 5 * 60_000;

function unauthenticated(message: string, reason = UNAUTHENTICATED_REASON): LeaseholdError {
  return new LeaseholdError(Code.Unauthenticated, message, { reason });
}

/**
 * Authentication in the order a caller's proofs are trusted:
 * 1. `authorization: Bearer <token>` metadata: a static token (`lh_…`,
 *    looked up by hash) or a JWT (signature, issuer, audience, expiry). A bad
 *    token is refused even when a client certificate came with it: a caller
 *    that sends one means to be its principal.
 * 2. Otherwise the verified client certificate (mTLS): its first URI SAN,
 *    else its first DNS SAN.
 * 3. Otherwise UNAUTHENTICATED.
 * The principal's rights are the policy's bindings for it plus the roles a
 * static token carries. Every call, and every open stream when the
 * credentials change (`onChange`) or its credential expires
 * (stream-registry.ts), hits a cache keyed by the token (or the
 * certificate's fingerprint), kept no longer than the credential's expiry,
 * the policy and token file it was decided under, and a JWT's entry no
 * longer than the JWKS keys it verified against (a reload drops it). A client
 * certificate past its notAfter is refused (CERT_EXPIRED) even on a
 * connection whose handshake verified it before it expired.
 */
export function createAuthenticator(options: AuthenticatorOptions): Authenticator {
  const now = options.now ?? Date.now;
  // One cache per kind of credential: a key of one kind must never be
  // presentable as the other (a bearer token "cert:<fingerprint>" would
  // otherwise hit a certificate's entry: fingerprints are public).
  // A JWT's entry also holds the verifier's keys version: a key removed from the JWKS must stop
  // working once the reload is seen, not when the entry runs out.
  type Entry = {
    access: Access;
    untilMs: number;
    policyVersion: number;
    tokensVersion: number;
    keysVersion?: number | undefined;
  };
  const tokens = new Map<string, Entry>();
  const certificates = new Map<string, Entry>();
  const remember = (
    cache: Map<string, Entry>,
    key: string,
    access: Access,
    untilMs: number,
    keysVersion?: number,
  ) => {
    if (cache.size >= CACHE_ENTRIES) cache.clear();
    cache.set(key, {
      access,
      untilMs,
      policyVersion: options.policy.version,
      tokensVersion: options.staticTokens?.version ?? 0,
      keysVersion,
    });
    return access;
  };
  /**
   * A cached access still good: the credential not expired, the policy and
   * the token file not changed since (a removed token stops working once the
   * reload is seen), and for a JWT the keys it verified against still the ones
   * in use (an undefined version, keys due to be fetched, matches nothing).
   */
  const fresh = (hit: Entry | undefined) =>
    hit !== undefined &&
    hit.untilMs > now() &&
    hit.policyVersion === options.policy.version &&
    hit.tokensVersion === (options.staticTokens?.version ?? 0) &&
    (hit.keysVersion === undefined || hit.keysVersion === options.jwt?.keysVersion());
  const accessFor = (identity: Identity) =>
    accessOf(
      identity.principal,
      [...options.policy.bindingsOf(identity.principal), ...(identity.bindings ?? [])],
      identity.expiresAtMs,
    );

  const fromToken = (token: string): Access | Promise<Access> => {
    const hit = tokens.get(token);
    if (hit && fresh(hit)) return hit.access;
    if (token.startsWith("lh_") && options.staticTokens) {
      const identity = options.staticTokens.verify(token);
      if (!identity) throw unauthenticated("the bearer token is not known to this server", "TOKEN_UNKNOWN");
      // Static tokens do not expire; the cache is short besides the file's version.
      return remember(tokens, token, accessFor(identity), now() + 10_000);
    }
    if (options.jwt && looksLikeJwt(token)) {
      const jwt = options.jwt;
      return jwt.verify(token).then((identity) => {
        const untilMs = Math.min(identity.expiresAtMs ?? Number.POSITIVE_INFINITY, now() + CACHE_MS);
        // NaN equals no version: keys already due again are not trusted for the next call.
        return remember(tokens, token, accessFor(identity), untilMs, jwt.keysVersion() ?? Number.NaN);
      });
    }
    throw unauthenticated(
      options.staticTokens || options.jwt
        ? "the bearer token is neither a known static token nor a JWT this server checks"
        : "this server takes no bearer tokens; authenticate with a client certificate",
      "TOKEN_UNKNOWN",
    );
  };

  const sources = [options.policy, options.staticTokens, options.jwt];
  return {
    onChange(listener) {
      const offs = sources.map((source) => source?.onReload?.(listener));
      return () => {
        for (const off of offs) off?.();
      };
    },
    authenticate(call) {
      const header = call.metadata.get("authorization");
      if (header.length > 1)
        throw unauthenticated("send one authorization header, not several", "BAD_AUTHORIZATION");
      const value = header[0];
      if (value !== undefined) {
        const match = /^Bearer +(\S+)\s*$/i.exec(String(value));
        if (!match?.[1])
          throw unauthenticated('the authorization header must be "Bearer <token>"', "BAD_AUTHORIZATION");
        return fromToken(match[1]);
      }
      const certificate = call.getAuthContext().sslPeerCertificate;
      if (certificate) {
        const key = certificate.fingerprint256;
        const hit = certificates.get(key);
        if (hit && fresh(hit)) return hit.access;
        const principal = principalOfCertificate(certificate);
        if (!principal)
          throw unauthenticated(
            "the client certificate has no URI or DNS subject alternative name",
            "CERT_NO_SAN",
          );
        const problem = principalProblem(principal);
        if (problem)
          throw unauthenticated(
            `the client certificate's principal (its first URI, else DNS, subject alternative name) ${JSON.stringify(principal)} ${problem}`,
            "CERT_INVALID_PRINCIPAL",
          );
        // Verified when its connection opened, which may have been before it expired: a
        // connection lives on, and grpc-js reports its certificate verified for every call.
        const validTo = Date.parse(certificate.valid_to);
        if (validTo <= now())
          throw unauthenticated(
            `the client certificate expired at ${new Date(validTo).toISOString()}; connect again with a valid one`,
            "CERT_EXPIRED",
          );
        const expiresAtMs = Number.isFinite(validTo) ? validTo : undefined;
        return remember(
          certificates,
          key,
          accessFor({ principal, via: "mtls", ...(expiresAtMs !== undefined ? { expiresAtMs } : {}) }),
          Math.min(Number.isFinite(validTo) ? validTo : Number.POSITIVE_INFINITY, now() + CACHE_MS),
        );
      }
      const refused = call.certificateRefusal?.();
      throw unauthenticated(
        refused
          ? `the client certificate was not accepted (${refused}); send \`authorization: Bearer <token>\` or connect with a client certificate the server's client CA verifies`
          : "this server needs credentials: send `authorization: Bearer <token>` or connect with a client certificate",
      );
    },
  };
}
