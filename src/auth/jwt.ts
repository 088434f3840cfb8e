import { createPublicKey, type JsonWebKey } from "node:crypto";
import {
  createLocalJWKSet,
  createRemoteJWKSet,
  decodeProtectedHeader,
  errors,
  type JSONWebKeySet,
  type JWK,
  type JWTPayload,
  type JWTVerifyGetKey,
  jwtVerify,
} from "jose";
import type { Logger } from "pino";
import { Code, LeaseholdError, quote } from "../errors.js";
import { type Identity, principalProblem } from "./access.js";
import { createFileReloader, type ReloadOutcome, readCredentialFileSync } from "./file-reloader.js";

/** How bearer JWTs are checked (`serve --jwt-jwks … --jwt-issuer … --jwt-audience …`). */
export interface JwtOptions {
  /** A JWKS file path, or an http(s):// URL. */
  readonly jwks: string;
  /** The `iss` tokens must carry. */
  readonly issuer: string;
  /** The `aud` tokens must carry (one of their audiences). */
  readonly audience: string;
  /** Tolerated clock skew; default 30 s, at most 5 min. */
  readonly clockSkewMs: number;
  /** Claim holding the principal; default "sub". */
  readonly principalClaim: string;
  /**
   * The longest a token may be valid: from its `iat` (or, without one, from
   * now) to its `exp`, beyond the clock skew. Default 24 h.
   */
  readonly maxLifetimeMs: number;
}

/** Checks bearer JWTs. */
export interface JwtVerifier {
  /**
   * The identity of a valid token; throws LeaseholdError UNAUTHENTICATED
   * (code 16) with ErrorInfo reason TOKEN_EXPIRED, TOKEN_NOT_YET_VALID,
   * TOKEN_WRONG_AUDIENCE, TOKEN_WRONG_ISSUER, TOKEN_BAD_SIGNATURE or
   * TOKEN_LIFETIME_TOO_LONG, TOKEN_INVALID and a message saying what is wrong. When the keys of a
   * JWKS URL cannot be fetched, throws UNAVAILABLE (reason JWKS_UNAVAILABLE):
   * the token may be fine, and the caller may retry.
   */
  verify(token: string): Promise<Identity>;
  /**
   * Re-reads a JWKS file now if it changed (a poll does it too); a JWKS URL
   * is refreshed by its cache rules, so this resolves "unchanged" for one.
   */
  reload(): Promise<ReloadOutcome>;
  /**
   * Which keys {@link verify} checks against: a number that changes whenever
   * they change (a JWKS file reloaded, a JWKS URL fetched again), or
   * undefined while a JWKS URL's keys are due to be fetched again. A token
   * verified under one number is not known to verify under another: a
   * cache of verified tokens keeps an entry only while the number stays.
   */
  keysVersion(): number | undefined;
  /**
   * Calls `listener` after a changed JWKS file is put in force (never for a
   * JWKS URL, whose keys are fetched again when a token needs them). Returns
   * its off.
   */
  onReload(listener: () => void): () => void;
  /** Stops watching a JWKS file. */
  close(): void;
}

/** Default of {@link JwtOptions.maxLifetimeMs}. */
export const DEFAULT_JWT_MAX_LIFETIME_MS = 24 * 60 * 60_000;

/** Default of {@link JwtOptions.clockSkewMs}. */
export const DEFAULT_JWT_CLOCK_SKEW_MS = 30_000;
/** Largest {@link JwtOptions.clockSkewMs}: more would keep expired tokens alive for long. */
export const MAX_JWT_CLOCK_SKEW_MS = 5 * 60_000;
/** Default of {@link JwtOptions.principalClaim}. */
export const DEFAULT_JWT_PRINCIPAL_CLAIM = "sub";

/**
 * The signature algorithms accepted: asymmetric only. `none` would accept
 * unsigned tokens; HMAC (HS*) would make the verification key a shared
 * secret, one that could mint tokens, and mixing the two is the classic
 * "alg confusion" hole.
 */
export const JWT_ALGORITHMS = [
  "RS256",
  "RS384",
  "RS512",
  "PS256",
  "PS384",
  "PS512",
  "ES256",
  "ES384",
  "ES512",
  "EdDSA",
  "Ed25519",
];

/** How long a fetched JWKS is used before it is fetched again (jose's `cacheMaxAge`). */
const REMOTE_JWKS_MAX_AGE_MS = 10 * 60_000;
/**
 * Least time between two fetches (jose's `cooldownDuration`): a token with an
 * unknown `kid` refetches the set (a key rotation), but a flood of them
 * cannot make us hammer the issuer.
 */
const REMOTE_JWKS_COOLDOWN_MS = 30_000;
/**
 * Least time between two fetches while they fail: jose's cooldown counts
 * from a fetch that worked, so with the issuer down every call with a
 * token fetched again (20 calls, 20 fetches, each waiting up to 5 s).
 */
const REMOTE_JWKS_RETRY_MS = 5_000;
const REMOTE_JWKS_TIMEOUT_MS = 5_000;

const PUBLIC_KEY_TYPES = ["RSA", "EC", "OKP"];

/**
 * Whether `token` has the shape of a compact JWS (three base64url segments),
 * to tell it from other bearer tokens. The signature may be empty, as an
 * unsigned token's (alg "none") is: the verifier then says it is unsigned.
 */
export function looksLikeJwt(token: string): boolean {
  return /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(token);
}

/**
 * A verifier of bearer JWTs against a JWKS: a file (read at start, and again
 * when it changes) or an http(s) URL (fetched with jose's remote set: cached
 * for 10 minutes, refetched at most every 30 s when a token names an unknown
 * key, and at most every 5 s while fetches fail). Tokens must be signed with an asymmetric algorithm, carry the issuer
 * and audience configured, expire (`exp`) and not be issued in the future
 * (`iat`), within the tolerated clock
 * skew. Throws INVALID_ARGUMENT naming the flag for bad options or a bad
 * JWKS file.
 */
export function createJwtVerifier(
  options: JwtOptions,
  log: Logger,
  deps: { now?: () => number; pollMs?: number } = {},
): JwtVerifier {
  const now = deps.now ?? Date.now;
  if (options.issuer === "") throw LeaseholdError.invalidArgument("--jwt-issuer", "must not be empty");
  if (options.audience === "") throw LeaseholdError.invalidArgument("--jwt-audience", "must not be empty");
  if (
    !Number.isFinite(options.clockSkewMs) ||
    options.clockSkewMs < 0 ||
    options.clockSkewMs > MAX_JWT_CLOCK_SKEW_MS
  )
    throw LeaseholdError.invalidArgument(
      "--jwt-clock-skew",
      `must be between 0 and ${MAX_JWT_CLOCK_SKEW_MS / 1000} s (got ${options.clockSkewMs} ms)`,
    );
  if (options.principalClaim === "")
    throw LeaseholdError.invalidArgument("--jwt-principal-claim", "must name a claim, e.g. sub");
  if (!Number.isFinite(options.maxLifetimeMs) || options.maxLifetimeMs <= 0)
    throw LeaseholdError.invalidArgument(
      "--jwt-max-lifetime",
      `must be a positive duration (got ${options.maxLifetimeMs} ms)`,
    );

  let getKey: JWTVerifyGetKey;
  let keysVersion: () => number | undefined;
  let close = () => {};
  let reload = async (): Promise<ReloadOutcome> => "unchanged";
  let onReload = (_listener: () => void) => () => {};
  const remote = /^https?:\/\//i.test(options.jwks);
  if (remote) {
    let url: URL;
    try {
      url = new URL(options.jwks);
    } catch (error) {
      throw LeaseholdError.invalidArgument("--jwt-jwks", `not a valid URL (${(error as Error).message})`);
    }
    // Keys fetched in plaintext could be swapped by anyone on the path, who could then mint tokens.
    if (url.protocol === "http:" && !["localhost", "127.0.0.1", "[::1]"].includes(url.hostname))
      throw LeaseholdError.invalidArgument(
        "--jwt-jwks",
        `must be https:// (or http:// to this machine): over plain http anyone on the path to ${url.hostname} could swap the keys`,
      );
    const set = createRemoteJWKSet(url, {
      cacheMaxAge: REMOTE_JWKS_MAX_AGE_MS,
      cooldownDuration: REMOTE_JWKS_COOLDOWN_MS,
      timeoutDuration: REMOTE_JWKS_TIMEOUT_MS,
    });
    let version = 0;
    let seen = set.jwks();
    keysVersion = () => {
      // jose replaces the set's JWKS object with each fetch.
      const current = set.jwks();
      if (current !== seen) {
        seen = current;
        version++;
      }
      return set.fresh ? version : undefined;
    };
    let failed: { at: number; error: JwksUnavailable } | undefined;
    getKey = async (header, token) => {
      // While fetches fail, a call that would fetch (keys stale, or a key not among them) is
      // answered with the last failure until the retry pause has passed; keys in hand still serve.
      const inHand =
        set.fresh && (header.kid === undefined || set.jwks()?.keys.some((k) => k.kid === header.kid));
      if (failed && now() - failed.at < REMOTE_JWKS_RETRY_MS && !inHand) throw failed.error;
      try {
        return await set(header, token);
      } catch (error) {
        if (isKeySelectionError(error)) throw error;
        failed = { at: now(), error: new JwksUnavailable(url.href, error) };
        throw failed.error;
      }
    };
  } else {
    const path = options.jwks;
    const content = readCredentialFileSync(path, "--jwt-jwks");
    let set = parseJwksFile(content, path);
    let version = 0;
    keysVersion = () => version;
    const reloader = createFileReloader({
      files: [path],
      initial: [content],
      what: "JWKS",
      log,
      pollMs: deps.pollMs,
      parse: ([next]) => parseJwksFile(next ?? Buffer.alloc(0), path),
      apply(next) {
        set = next;
        version++;
        log.info({ file: path, keys: next.jwks().keys.length }, "JWKS reloaded");
      },
    });
    getKey = (header, token) => set(header, token);
    close = reloader.close;
    reload = reloader.reload;
    onReload = reloader.onApplied;
  }

  const verifyOptions = () => ({
    issuer: options.issuer,
    audience: options.audience,
    algorithms: JWT_ALGORITHMS,
    clockTolerance: options.clockSkewMs / 1000,
    requiredClaims: ["exp"],
    currentDate: new Date(now()),
  });

  return {
    async verify(token) {
      let payload: JWTPayload;
      try {
        payload = (await jwtVerify(token, getKey, verifyOptions())).payload;
      } catch (error) {
        if (error instanceof errors.JWKSMultipleMatchingKeys) {
          // Several keys fit the token's header (no `kid`): the one that verifies wins.
          payload = await verifyWithAny(token, error, verifyOptions());
        } else {
          throw tokenError(error, options, now(), token);
        }
      }
      // jose checks iat only against a maxTokenAge (none here): one later than now, beyond the
      // skew that exp and nbf get, says a clock is wrong.
      if (typeof payload.iat === "number" && payload.iat * 1000 > now() + options.clockSkewMs)
        throw tokenError(
          new errors.JWTClaimValidationFailed(
            "the token was issued in the future",
            payload,
            "iat",
            "check_failed",
          ),
          options,
          now(),
          token,
        );
      // A token valid for a year is as good as a password to whoever copies it: refused, as
      // Kubernetes bounds service-account tokens. Without iat, what is left of it counts.
      const expMs = (payload.exp as number) * 1000;
      const fromMs = typeof payload.iat === "number" ? payload.iat * 1000 : now();
      if (expMs - fromMs > options.maxLifetimeMs + options.clockSkewMs)
        throw unauthenticated(
          "TOKEN_LIFETIME_TOO_LONG",
          `the token is valid for ${hours(expMs - fromMs)} (${typeof payload.iat === "number" ? `iat ${iso(payload.iat)}` : "from now"} to exp ${iso(payload.exp)}), longer than the server accepts (--jwt-max-lifetime ${hours(options.maxLifetimeMs)}); get a shorter-lived one`,
        );
      const principal = payload[options.principalClaim];
      if (typeof principal !== "string" || principal === "")
        throw unauthenticated(
          "TOKEN_INVALID",
          `the token has no ${quote(options.principalClaim)} claim with the principal (a non-empty string)`,
        );
      const problem = principalProblem(principal);
      if (problem)
        throw unauthenticated(
          "TOKEN_INVALID",
          `the token's ${quote(options.principalClaim)} claim ${JSON.stringify(principal)} ${problem}; it cannot name a principal`,
        );
      // Accepted until the skew past exp: a stream opened with it ends then, not earlier, or its
      // client would reconnect with the same token and be accepted again.
      return { principal, via: "jwt", expiresAtMs: expMs + options.clockSkewMs };
    },
    reload: () => reload(),
    keysVersion: () => keysVersion(),
    onReload: (listener) => onReload(listener),
    close,
  };

  async function verifyWithAny(
    token: string,
    candidates: errors.JWKSMultipleMatchingKeys,
    verifyOptions: Parameters<typeof jwtVerify>[2],
  ): Promise<JWTPayload> {
    let last: unknown = candidates;
    for await (const key of candidates) {
      try {
        return (await jwtVerify(token, key, verifyOptions)).payload;
      } catch (error) {
        last = error;
        if (!(error instanceof errors.JWSSignatureVerificationFailed)) break;
      }
    }
    throw tokenError(last, options, now(), token);
  }
}

/** The alg of a token's header, as it says ("" if it cannot be read). */
function algOf(token: string): string {
  try {
    return String(decodeProtectedHeader(token).alg ?? "");
  } catch {
    return "";
  }
}

/** A JWKS file's keys; throws INVALID_ARGUMENT `--jwt-jwks` saying what is wrong. */
function parseJwksFile(content: Buffer, path: string): ReturnType<typeof createLocalJWKSet> {
  const fail = (problem: string) => LeaseholdError.invalidArgument("--jwt-jwks", `${path}: ${problem}`);
  let jwks: unknown;
  try {
    jwks = JSON.parse(content.toString("utf8"));
  } catch (error) {
    throw fail(`not JSON (${(error as Error).message}); expected a JWKS: {"keys": [...]}`);
  }
  const keys = (jwks as { keys?: unknown } | null)?.keys;
  if (!Array.isArray(keys) || keys.length === 0)
    throw fail('expected a JWKS with at least one key: {"keys": [...]}');
  keys.forEach((key: unknown, i) => {
    const jwk = key as JWK | null;
    if (typeof jwk !== "object" || jwk === null) throw fail(`keys[${i}]: must be a JSON object (a JWK)`);
    if (!PUBLIC_KEY_TYPES.includes(String(jwk.kty)))
      throw fail(
        `keys[${i}]: kty ${quote(String(jwk.kty))} is not accepted; only public keys (RSA, EC, OKP) verify tokens`,
      );
    if ("d" in jwk) throw fail(`keys[${i}]: holds a private key; the JWKS must hold only public keys`);
    try {
      createPublicKey({ key: jwk as JsonWebKey, format: "jwk" });
    } catch (error) {
      throw fail(`keys[${i}]: not a usable public key (${(error as Error).message})`);
    }
  });
  try {
    return createLocalJWKSet(jwks as JSONWebKeySet);
  } catch (error) {
    throw fail(`not a valid JWKS (${(error as Error).message})`);
  }
}

/** A failure to get the keys of a JWKS URL (not the token's fault). */
class JwksUnavailable extends Error {
  constructor(
    readonly url: string,
    cause: unknown,
  ) {
    super(`cannot get the JWKS from ${url}: ${(cause as Error)?.message ?? String(cause)}`, { cause });
  }
}

function isKeySelectionError(error: unknown): boolean {
  return (
    error instanceof errors.JWKSNoMatchingKey ||
    error instanceof errors.JWKSMultipleMatchingKeys ||
    error instanceof errors.JOSENotSupported
  );
}

function unauthenticated(
  reason: string,
  message: string,
  metadata: Record<string, string> = {},
): LeaseholdError {
  return new LeaseholdError(Code.Unauthenticated, message, { reason, metadata });
}

const iso = (seconds: unknown) =>
  typeof seconds === "number" ? new Date(seconds * 1000).toISOString() : String(seconds);

/** Milliseconds in hours, to two places at most: "24 h", "0.25 h", "8760 h". */
const hours = (ms: number) => `${Number((ms / 3_600_000).toFixed(2))} h`;

const audiences = (aud: unknown) =>
  Array.isArray(aud) ? aud.map((a) => quote(String(a))).join(", ") : quote(String(aud));

/** The UNAUTHENTICATED (or UNAVAILABLE) error for a failed verification. */
function tokenError(error: unknown, options: JwtOptions, nowMs: number, token: string): LeaseholdError {
  if (error instanceof LeaseholdError) return error;
  if (error instanceof JwksUnavailable)
    return new LeaseholdError(Code.Unavailable, `${error.message}; try again later`, {
      reason: "JWKS_UNAVAILABLE",
      metadata: { jwks: error.url },
      cause: error.cause,
    });
  const skew = `tolerated clock skew ${options.clockSkewMs / 1000} s`;
  if (error instanceof errors.JWTExpired) {
    return unauthenticated(
      "TOKEN_EXPIRED",
      `the token expired at ${iso(error.payload.exp)} (now ${new Date(nowMs).toISOString()}, ${skew}); get a new one`,
    );
  }
  if (error instanceof errors.JWTClaimValidationFailed) {
    const { claim, reason, payload } = error;
    if (claim === "exp" && reason === "missing")
      return unauthenticated(
        "TOKEN_INVALID",
        "the token has no exp claim: only tokens that expire are accepted",
      );
    if (claim === "nbf")
      return unauthenticated(
        "TOKEN_NOT_YET_VALID",
        `the token is not valid before ${iso(payload.nbf)} (now ${new Date(nowMs).toISOString()}, ${skew})`,
      );
    if (claim === "iat")
      return unauthenticated(
        "TOKEN_NOT_YET_VALID",
        `the token was issued in the future (iat ${iso(payload.iat)}, now ${new Date(nowMs).toISOString()}, ${skew}); check the clocks`,
      );
    if (claim === "aud")
      return unauthenticated(
        "TOKEN_WRONG_AUDIENCE",
        payload.aud === undefined
          ? `the token has no aud claim; it must be issued for ${quote(options.audience)}`
          : `the token is for audience ${audiences(payload.aud)}, not ${quote(options.audience)}`,
        { expected: options.audience },
      );
    if (claim === "iss")
      return unauthenticated(
        "TOKEN_WRONG_ISSUER",
        payload.iss === undefined
          ? `the token has no iss claim; it must be issued by ${quote(options.issuer)}`
          : `the token was issued by ${quote(String(payload.iss))}, not ${quote(options.issuer)}`,
        { expected: options.issuer },
      );
    return unauthenticated("TOKEN_INVALID", `the token's ${claim} claim is not valid (${error.message})`);
  }
  if (error instanceof errors.JWSSignatureVerificationFailed)
    return unauthenticated(
      "TOKEN_BAD_SIGNATURE",
      "the token's signature does not verify with the keys of the JWKS",
    );
  if (error instanceof errors.JWKSNoMatchingKey)
    return unauthenticated(
      "TOKEN_BAD_SIGNATURE",
      "no key of the JWKS matches the token's kid and alg: is it from another issuer, or was its key removed?",
    );
  if (error instanceof errors.JOSEAlgNotAllowed) {
    const alg = algOf(token);
    return unauthenticated(
      "TOKEN_INVALID",
      `${alg === "none" ? 'the token is not signed (alg "none")' : `the token is signed with ${quote(alg)}, an algorithm that is not accepted`}; only asymmetric ones are (${JWT_ALGORITHMS.join(", ")})`,
    );
  }
  if (error instanceof errors.JOSEError || error instanceof TypeError)
    return unauthenticated("TOKEN_INVALID", `the token is not a valid JWT (${error.message})`);
  return new LeaseholdError(Code.Internal, "the token could not be checked", { cause: error });
}
