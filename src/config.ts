import { isIP } from "node:net";
import { LeaseholdError } from "./errors.js";
import { DEFAULT_UNARY_CALLS } from "./rpc/unary-calls.js";

/** Log levels pino understands, quietest last. */
export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/**
 * Everything `leasehold serve` needs, parsed once from flags and environment
 * by the `serve` command and passed down frozen: nothing the server runs
 * reads `process.env` (only the entry points, `src/main.ts` and `src/cli/`).
 */
export interface ServerConfig {
  /** host:port to listen on. Default `127.0.0.1:50051`; port 0 picks a free one. */
  readonly listen: string;
  /** PostgreSQL URL; when unset the embedded PGlite in `dataDir` is used. */
  readonly databaseUrl: string | undefined;
  /** PGlite data directory (`memory://` for a throw-away one). Default `./.leasehold/data`. */
  readonly dataDir: string;
  /** Connections of the PostgreSQL pool for client calls and reports, 2–1000. Default 10. */
  readonly databasePoolSize: number;
  /** How long a silent session is trusted before it is reaped. Default 10 s, at least 2 s. */
  readonly gracePeriodMs: number;
  /** How often agents heartbeat. Default 2 s; must be below a third of the grace period. */
  readonly heartbeatIntervalMs: number;
  /** Sessions silent longer than this get no restart extension (SPEC rule 6). Default 10 × grace. */
  readonly maxSilenceMs: number;
  /**
   * How long a worker without a live session is kept
   * after it was last seen, and an ended session after it ended; 0 keeps
   * them forever (see `forgetWorkers`).
   */
  readonly workerRetentionMs: number;
  /**
   * How often the process looks at how the worker sessions are spread
   * over the processes on its database and moves what is over its share; 0
   * never (see `lease/rebalance.ts`). Only on PostgreSQL.
   */
  readonly rebalanceIntervalMs: number;
  /**
   * How long an ended action (with its attempts and events), a closed scope
   * lease record and any other event are kept; 0 keeps them forever (see
   * `remove-history.ts`).
   */
  readonly historyRetentionMs: number;
  /** Connections one peer address may hold open to the gRPC port; 0 for no limit. Default 1024. */
  readonly maxConnectionsPerAddress: number;
  /** Unary calls the process serves at once (--max-unary-calls); 0 for no limit. */
  readonly maxUnaryCalls: number;
  /**
   * SPEC rule 10: when more than this share of a cluster's live sessions holding leases (and at least two)
   * are lost (stream closed, or silent past the deadline), the cluster is partitioned and its
   * expiries pause, never past `maxSilenceMs`. Default 0.5; 1 turns the valve off.
   */
  readonly partitionShare: number;
  /**
   * How often each process looks for what no notification told it: queued
   * actions (retry backoffs ending), and revokes, drains, undrains and lease
   * ends whose notice from another process was lost. Default 1 s.
   */
  readonly dispatchPollMs: number;
  /** host:port of the Prometheus `/metrics` endpoint, or undefined when off. Default `127.0.0.1:9464`. */
  readonly metricsListen: string | undefined;
  /**
   * host:port of the web console (the page, and the v1 API over Connect), or
   * undefined when off (the default). Beyond loopback it needs what `listen`
   * needs: TLS and credentials, or `insecure`.
   */
  readonly consoleListen: string | undefined;
  /** OTLP/HTTP traces endpoint (`http(s)://host:port/v1/traces`); undefined: no tracing (the default). */
  readonly otlpEndpoint: string | undefined;
  /** TTL of a scope lease created without one. Default 1 h. */
  readonly leaseDefaultTtlMs: number;
  /** Longest TTL a scope lease may ask for. Default 24 h. */
  readonly leaseMaxTtlMs: number;
  /** Largest file resource accepted, in bytes. Default 3 MiB. */
  readonly maxFileBytes: number;
  /** pino level. Default `info`. */
  readonly logLevel: LogLevel;
  /** Allow listening beyond loopback without credentials. Default false. */
  readonly insecure: boolean;
  /** TLS on the gRPC port; undefined: plaintext. */
  readonly tls: TlsConfig | undefined;
  /** Authentication and authorization; `enabled` false means every call is allowed. */
  readonly auth: AuthConfig;
}

/** TLS of the gRPC port (`--tls-*`). Files are re-read when they change. */
export interface TlsConfig {
  readonly certFile: string;
  readonly keyFile: string;
  /** CA bundle that client certificates must chain to (mTLS). */
  readonly clientCaFile: string | undefined;
  /** `require`: no connection without a valid client certificate; `optional`: token callers may connect without one. */
  readonly clientAuth: "require" | "optional";
}

/** JWT checks (`--jwt-*`). */
export interface JwtConfig {
  /** JWKS file path or http(s) URL. */
  readonly jwks: string;
  readonly issuer: string;
  readonly audience: string;
  /** Tolerated clock skew. Default 30 s, at most 5 min. */
  readonly clockSkewMs: number;
  /** Claim naming the principal. Default `sub`. */
  readonly principalClaim: string;
  /** Longest validity a token may have, `iat` (or now) to `exp`. Default 24 h. */
  readonly maxLifetimeMs: number;
}

/** Who may call (`--auth-*`, `--jwt-*`, `--tls-client-ca`, `--reflection`). */
export interface AuthConfig {
  /** True once any credential is configured: then every call is denied unless the policy allows it. */
  readonly enabled: boolean;
  /** The policy file (`--auth-policy`). */
  readonly policyFile: string | undefined;
  /** The static tokens file (`--auth-tokens`). */
  readonly tokensFile: string | undefined;
  readonly jwt: JwtConfig | undefined;
  /** Who may use reflection: anyone (`open`, default) or authenticated callers. */
  readonly reflection: "open" | "authenticated";
}

/** Defaults, as `--help` shows them. */
export const DEFAULTS = {
  listen: "127.0.0.1:50051",
  dataDir: "./.leasehold/data",
  gracePeriod: "10s",
  heartbeatInterval: "2s",
  dispatchPoll: "1s",
  partitionShare: "0.5",
  workerRetention: "7d",
  rebalanceInterval: "30s",
  historyRetention: "7d",
  maxConnectionsPerAddress: "1024",
  maxUnaryCalls: String(DEFAULT_UNARY_CALLS),
  databasePoolSize: "10",
  metricsListen: "127.0.0.1:9464",
  leaseDefaultTtl: "1h",
  leaseMaxTtl: "24h",
  maxFileSize: "3145728",
  logLevel: "info",
  tlsClientAuth: "require",
  jwtClockSkew: "30s",
  jwtMaxLifetime: "24h",
  jwtPrincipalClaim: "sub",
  reflection: "open",
} as const;

/** Raw option values, as strings from flags or environment. */
export interface RawServerOptions {
  readonly listen?: string | undefined;
  readonly databaseUrl?: string | undefined;
  readonly databasePoolSize?: string | undefined;
  readonly dataDir?: string | undefined;
  readonly gracePeriod?: string | undefined;
  readonly heartbeatInterval?: string | undefined;
  readonly maxSilence?: string | undefined;
  readonly workerRetention?: string | undefined;
  readonly rebalanceInterval?: string | undefined;
  readonly historyRetention?: string | undefined;
  readonly maxConnectionsPerAddress?: string | undefined;
  readonly maxUnaryCalls?: string | undefined;
  readonly partitionShare?: string | undefined;
  readonly dispatchPoll?: string | undefined;
  readonly metricsListen?: string | undefined;
  readonly consoleListen?: string | undefined;
  readonly otlpEndpoint?: string | undefined;
  readonly leaseDefaultTtl?: string | undefined;
  readonly leaseMaxTtl?: string | undefined;
  readonly maxFileSize?: string | undefined;
  readonly logLevel?: string | undefined;
  readonly insecure?: boolean | undefined;
  readonly tlsCert?: string | undefined;
  readonly tlsKey?: string | undefined;
  readonly tlsClientCa?: string | undefined;
  readonly tlsClientAuth?: string | undefined;
  readonly authPolicy?: string | undefined;
  readonly authTokens?: string | undefined;
  readonly jwtJwks?: string | undefined;
  readonly jwtIssuer?: string | undefined;
  readonly jwtAudience?: string | undefined;
  readonly jwtClockSkew?: string | undefined;
  readonly jwtMaxLifetime?: string | undefined;
  readonly jwtPrincipalClaim?: string | undefined;
  readonly reflection?: string | undefined;
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/**
 * The longest duration {@link parseDuration} takes: a protobuf Duration's
 * maximum, 315,576,000,000 s (about 10,000 years). Anything longer fits no
 * request, and past 2^53 ms it is not even a whole number of milliseconds.
 */
export const MAX_DURATION_MS = 315_576_000_000_000;

/**
 * Parses `500ms`, `10s`, `1.5m`, `2h`, `7d` (a bare number means seconds) into
 * milliseconds, rounded to the nearest. With `wholeMs`, for a value kept in
 * whole milliseconds (a lease's TTL), one that is not a whole number of them
 * (`0.9995s`, compared exactly) is refused instead of rounded. Longer than
 * {@link MAX_DURATION_MS} is refused too.
 */
export function parseDuration(
  option: string,
  text: string,
  options: { readonly wholeMs?: boolean } = {},
): number {
  const match = /^(\d+)(?:\.(\d+))?(ms|s|m|h|d)?$/.exec(text.trim());
  if (!match && /^-\d/.test(text.trim()))
    throw configError(option, `must not be negative (got ${JSON.stringify(text)})`);
  if (!match)
    throw configError(option, `must be a duration like 500ms, 10s or 2m (got ${JSON.stringify(text)})`);
  const [, whole = "", fraction = "", unit = "s"] = match;
  const unitMs = UNITS[unit] ?? 1000;
  // In decimal, exactly: 0.9995 * 1000 is 999.4999999999999 as a float, and 999999999999999999999s
  // is past any float's whole milliseconds.
  const scale = 10n ** BigInt(fraction.length);
  const scaled = (BigInt(whole) * scale + BigInt(fraction || "0")) * BigInt(unitMs);
  if (scaled > BigInt(MAX_DURATION_MS) * scale) {
    throw configError(
      option,
      `must be at most ${MAX_DURATION_MS / 1000}s, about 10,000 years (got ${JSON.stringify(text)})`,
    );
  }
  if (options.wholeMs) {
    if (scaled % scale !== 0n)
      throw configError(option, `must be a whole number of milliseconds (got ${JSON.stringify(text)})`);
    return Number(scaled / scale);
  }
  return Math.round(Number(fraction ? `${whole}.${fraction}` : whole) * unitMs);
}

/**
 * What a message about a bad address of each listening flag shows as an
 * example: its default port, and `off` where the flag takes it.
 */
const LISTEN_EXAMPLES: Record<string, string> = {
  "--listen": "127.0.0.1:50051 or [::1]:50051",
  "--metrics-listen": '127.0.0.1:9464 or [::1]:9464, or "off"',
  "--console-listen": '127.0.0.1:8090 or [::1]:8090, or "off"',
};

/** Splits `host:port` (or `[v6]:port`); throws naming the option on anything else. */
export function parseListen(text: string, option = "--listen"): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  const port = Number(match?.[3]);
  const host = match?.[1] ?? match?.[2];
  if (!host || !(port >= 0 && port <= 65535)) {
    throw configError(
      option,
      `must be host:port, e.g. ${LISTEN_EXAMPLES[option] ?? LISTEN_EXAMPLES["--listen"]} (got ${JSON.stringify(text)})`,
    );
  }
  return { host, port };
}

/** Whether a host only accepts connections from this machine. */
export function isLoopback(host: string): boolean {
  if (host === "localhost") return true;
  if (isIP(host) === 4) return host.startsWith("127.");
  return host === "::1";
}

function configError(option: string, message: string): LeaseholdError {
  return LeaseholdError.invalidArgument(option, message);
}

/**
 * The error of a --lease-max-ttl shorter than --lease-default-ttl, naming the
 * flag that was set (--lease-max-ttl when both were) and both values: with
 * only one set, the other is its default, which the user may not know, so the
 * message says so and which one to change too.
 */
function ttlConflict(raw: RawServerOptions): LeaseholdError {
  const defaultTtl = raw.leaseDefaultTtl ?? `${DEFAULTS.leaseDefaultTtl}, the default`;
  const maxTtl = raw.leaseMaxTtl ?? `${DEFAULTS.leaseMaxTtl}, the default`;
  if (raw.leaseMaxTtl === undefined) {
    return configError(
      "--lease-default-ttl",
      `${raw.leaseDefaultTtl} is longer than --lease-max-ttl (${maxTtl}); raise --lease-max-ttl too`,
    );
  }
  return configError(
    "--lease-max-ttl",
    `${raw.leaseMaxTtl} is shorter than --lease-default-ttl (${defaultTtl})` +
      (raw.leaseDefaultTtl === undefined ? "; lower --lease-default-ttl too" : ""),
  );
}

/**
 * Validates raw options and fills in defaults. Throws an error naming the
 * option to fix. An option left undefined takes its default (see DEFAULTS),
 * which a message may then call the default.
 */
export function parseServerConfig(raw: RawServerOptions): ServerConfig {
  const listen = raw.listen ?? DEFAULTS.listen;
  const { host } = parseListen(listen);
  const insecure = raw.insecure ?? false;
  const tls = parseTls(raw);
  const auth = parseAuth(raw, tls);
  checkExposure("--listen", host, { insecure, tls, auth });
  const consoleListen = raw.consoleListen && raw.consoleListen !== "off" ? raw.consoleListen : undefined;
  if (consoleListen) {
    const { host: consoleHost } = parseListen(consoleListen, "--console-listen");
    checkExposure("--console-listen", consoleHost, { insecure, tls, auth });
  }
  const gracePeriodMs = parseDuration("--grace-period", raw.gracePeriod ?? DEFAULTS.gracePeriod);
  if (gracePeriodMs < 2000) throw configError("--grace-period", "must be at least 2s");
  const heartbeatIntervalMs = parseDuration(
    "--heartbeat-interval",
    raw.heartbeatInterval ?? DEFAULTS.heartbeatInterval,
  );
  if (heartbeatIntervalMs < 100) throw configError("--heartbeat-interval", "must be at least 100ms");
  if (heartbeatIntervalMs * 3 > gracePeriodMs) {
    throw configError(
      "--heartbeat-interval",
      `must be at most a third of --grace-period (${gracePeriodMs}ms), so one lost heartbeat never expires a lease`,
    );
  }
  const maxSilenceMs = raw.maxSilence ? parseDuration("--max-silence", raw.maxSilence) : 10 * gracePeriodMs;
  if (maxSilenceMs < gracePeriodMs)
    throw configError("--max-silence", "must not be shorter than --grace-period");
  const workerRetentionMs = parseDuration(
    "--worker-retention",
    raw.workerRetention ?? DEFAULTS.workerRetention,
  );
  if (workerRetentionMs !== 0 && workerRetentionMs < 60_000)
    throw configError("--worker-retention", "must be 0 (keep every worker) or at least 1m");
  const rebalanceIntervalMs = parseDuration(
    "--rebalance-interval",
    raw.rebalanceInterval ?? DEFAULTS.rebalanceInterval,
  );
  if (rebalanceIntervalMs !== 0 && rebalanceIntervalMs < 1000)
    throw configError("--rebalance-interval", "must be 0 (never move worker streams) or at least 1s");
  const historyRetentionMs = parseDuration(
    "--history-retention",
    raw.historyRetention ?? DEFAULTS.historyRetention,
  );
  if (historyRetentionMs !== 0 && historyRetentionMs < 60_000)
    throw configError("--history-retention", "must be 0 (keep all history) or at least 1m");
  const perAddressText = raw.maxConnectionsPerAddress ?? DEFAULTS.maxConnectionsPerAddress;
  const maxConnectionsPerAddress = Number(perAddressText);
  if (!/^\d+$/.test(perAddressText.trim()) || !Number.isSafeInteger(maxConnectionsPerAddress)) {
    throw configError(
      "--max-connections-per-address",
      `must be a whole number of connections, 0 for no limit (got ${JSON.stringify(perAddressText)})`,
    );
  }
  const unaryText = raw.maxUnaryCalls ?? DEFAULTS.maxUnaryCalls;
  const maxUnaryCalls = Number(unaryText);
  if (!/^\d+$/.test(unaryText.trim()) || !Number.isSafeInteger(maxUnaryCalls)) {
    throw configError(
      "--max-unary-calls",
      `must be a whole number of calls, 0 for no limit (got ${JSON.stringify(unaryText)})`,
    );
  }
  const shareText = raw.partitionShare ?? DEFAULTS.partitionShare;
  const partitionShare = Number(shareText);
  if (!/^\d+(\.\d+)?$/.test(shareText.trim()) || !(partitionShare > 0 && partitionShare <= 1)) {
    throw configError(
      "--partition-share",
      `must be a fraction above 0 and at most 1, e.g. 0.5; 1 turns the valve off (got ${JSON.stringify(shareText)})`,
    );
  }
  const dispatchPollMs = parseDuration("--dispatch-poll", raw.dispatchPoll ?? DEFAULTS.dispatchPoll);
  if (dispatchPollMs < 100) throw configError("--dispatch-poll", "must be at least 100ms");
  const metricsText = raw.metricsListen ?? DEFAULTS.metricsListen;
  const metricsListen = metricsText === "off" ? undefined : metricsText;
  if (metricsListen) {
    const { host: metricsHost } = parseListen(metricsListen, "--metrics-listen");
    if (!isLoopback(metricsHost) && !insecure) {
      throw configError(
        "--metrics-listen",
        `${metricsHost} is beyond loopback; pass --insecure to allow it, or "off"`,
      );
    }
  }
  const otlpEndpoint = raw.otlpEndpoint || undefined;
  if (
    otlpEndpoint !== undefined &&
    !(URL.canParse(otlpEndpoint) && /^https?:\/\/[^/\s]+/.test(otlpEndpoint))
  ) {
    throw configError(
      "--otlp-endpoint",
      `must be an http(s) URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (spans go to /v1/traces) or a full traces URL (got ${JSON.stringify(otlpEndpoint)})`,
    );
  }
  const leaseDefaultTtlMs = parseDuration(
    "--lease-default-ttl",
    raw.leaseDefaultTtl ?? DEFAULTS.leaseDefaultTtl,
  );
  const leaseMaxTtlMs = parseDuration("--lease-max-ttl", raw.leaseMaxTtl ?? DEFAULTS.leaseMaxTtl);
  if (leaseDefaultTtlMs < 1000) throw configError("--lease-default-ttl", "must be at least 1s");
  if (leaseMaxTtlMs < leaseDefaultTtlMs) throw ttlConflict(raw);
  const maxFileBytes = Number(raw.maxFileSize ?? DEFAULTS.maxFileSize);
  if (!Number.isInteger(maxFileBytes) || maxFileBytes < 1 || maxFileBytes > 64 * 1024 * 1024) {
    throw configError("--max-file-size", "must be a whole number of bytes between 1 and 67108864 (64 MiB)");
  }
  const databaseUrl = raw.databaseUrl || undefined;
  // postgres.js connects to PostgreSQL whatever the scheme says: mysql://… reached a PostgreSQL there.
  if (databaseUrl !== undefined && !/^postgres(ql)?:\/\//i.test(databaseUrl)) {
    // Only the scheme is repeated: the rest may hold a password.
    const scheme = /^[a-z][a-z0-9+.-]*:/i.exec(databaseUrl)?.[0];
    throw configError(
      "--database-url",
      `must be a PostgreSQL URL, postgres://user@host:port/database or postgresql://… (${scheme ? `got scheme ${scheme}` : "it has no scheme"})`,
    );
  }
  const poolText = raw.databasePoolSize ?? DEFAULTS.databasePoolSize;
  const databasePoolSize = Number(poolText);
  if (!/^\d+$/.test(poolText.trim()) || databasePoolSize < 2 || databasePoolSize > 1000)
    throw configError(
      "--database-pool-size",
      `must be a whole number of connections from 2 to 1000 (got ${JSON.stringify(poolText)})`,
    );
  if (raw.databasePoolSize !== undefined && databaseUrl === undefined)
    throw configError("--database-pool-size", "applies only with --database-url (PGlite has one connection)");
  const logLevel = (raw.logLevel ?? DEFAULTS.logLevel) as LogLevel;
  if (!LOG_LEVELS.includes(logLevel))
    throw configError("--log-level", `must be one of ${LOG_LEVELS.join(", ")}`);
  return Object.freeze({
    listen,
    databaseUrl,
    databasePoolSize,
    dataDir: raw.dataDir ?? DEFAULTS.dataDir,
    gracePeriodMs,
    heartbeatIntervalMs,
    maxSilenceMs,
    workerRetentionMs,
    rebalanceIntervalMs,
    historyRetentionMs,
    maxConnectionsPerAddress,
    maxUnaryCalls,
    partitionShare,
    dispatchPollMs,
    metricsListen,
    consoleListen,
    otlpEndpoint,
    leaseDefaultTtlMs,
    leaseMaxTtlMs,
    maxFileBytes,
    logLevel,
    insecure,
    tls,
    auth,
  });
}

/**
 * A port beyond loopback needs TLS and credentials (or --insecure); bearer
 * tokens never cross the network in plaintext, even with --insecure.
 */
function checkExposure(
  option: string,
  host: string,
  { insecure, tls, auth }: { insecure: boolean; tls: TlsConfig | undefined; auth: AuthConfig },
): void {
  if (isLoopback(host)) return;
  if ((auth.tokensFile || auth.jwt) && !tls) {
    throw configError(
      option,
      `${host} is beyond loopback and bearer tokens are configured without TLS, so tokens would cross the network in plaintext; add --tls-cert and --tls-key`,
    );
  }
  if (!insecure && !(tls && auth.enabled)) {
    throw configError(
      option,
      `${host} accepts connections from other machines, so it needs TLS (--tls-cert, --tls-key) and credentials ` +
        "(--tls-client-ca, --auth-tokens or --jwt-jwks, with --auth-policy); or listen on 127.0.0.1, or pass --insecure to accept unauthenticated clients from the network",
    );
  }
}

function parseTls(raw: RawServerOptions): TlsConfig | undefined {
  const certFile = raw.tlsCert || undefined;
  const keyFile = raw.tlsKey || undefined;
  const clientCaFile = raw.tlsClientCa || undefined;
  if (!certFile !== !keyFile) {
    throw configError(certFile ? "--tls-key" : "--tls-cert", "--tls-cert and --tls-key go together");
  }
  if (clientCaFile && !certFile) {
    throw configError("--tls-client-ca", "client certificates need TLS: add --tls-cert and --tls-key");
  }
  const clientAuth = raw.tlsClientAuth ?? DEFAULTS.tlsClientAuth;
  if (clientAuth !== "require" && clientAuth !== "optional") {
    throw configError("--tls-client-auth", `must be require or optional (got ${JSON.stringify(clientAuth)})`);
  }
  if (raw.tlsClientAuth && !clientCaFile) {
    throw configError("--tls-client-auth", "applies only with --tls-client-ca");
  }
  if (!certFile || !keyFile) return undefined;
  return Object.freeze({ certFile, keyFile, clientCaFile, clientAuth });
}

function parseAuth(raw: RawServerOptions, tls: TlsConfig | undefined): AuthConfig {
  const jwks = raw.jwtJwks || undefined;
  let jwt: JwtConfig | undefined;
  if (jwks) {
    if (!raw.jwtIssuer)
      throw configError("--jwt-issuer", "is required with --jwt-jwks (the iss every token must carry)");
    if (!raw.jwtAudience)
      throw configError("--jwt-audience", "is required with --jwt-jwks (the aud every token must carry)");
    const clockSkewMs = parseDuration("--jwt-clock-skew", raw.jwtClockSkew ?? DEFAULTS.jwtClockSkew);
    if (clockSkewMs > 5 * 60_000) throw configError("--jwt-clock-skew", "must be at most 5m");
    const maxLifetimeMs = parseDuration("--jwt-max-lifetime", raw.jwtMaxLifetime ?? DEFAULTS.jwtMaxLifetime);
    if (maxLifetimeMs <= 0) throw configError("--jwt-max-lifetime", "must be more than 0");
    jwt = Object.freeze({
      jwks,
      issuer: raw.jwtIssuer,
      audience: raw.jwtAudience,
      clockSkewMs,
      principalClaim: raw.jwtPrincipalClaim || DEFAULTS.jwtPrincipalClaim,
      maxLifetimeMs,
    });
  } else {
    for (const [flag, value] of [
      ["--jwt-issuer", raw.jwtIssuer],
      ["--jwt-audience", raw.jwtAudience],
      ["--jwt-clock-skew", raw.jwtClockSkew],
      ["--jwt-max-lifetime", raw.jwtMaxLifetime],
      ["--jwt-principal-claim", raw.jwtPrincipalClaim],
    ] as const) {
      if (value) throw configError(flag, "applies only with --jwt-jwks");
    }
  }
  const tokensFile = raw.authTokens || undefined;
  const enabled = Boolean(tls?.clientCaFile || tokensFile || jwt);
  const policyFile = raw.authPolicy || undefined;
  if (policyFile && !enabled) {
    throw configError(
      "--auth-policy",
      "nothing authenticates callers yet: add --tls-client-ca, --auth-tokens or --jwt-jwks",
    );
  }
  const reflection = raw.reflection ?? DEFAULTS.reflection;
  if (reflection !== "open" && reflection !== "authenticated") {
    throw configError("--reflection", `must be open or authenticated (got ${JSON.stringify(reflection)})`);
  }
  if (reflection === "authenticated" && !enabled) {
    throw configError(
      "--reflection",
      "authenticated needs credentials configured (--tls-client-ca, --auth-tokens or --jwt-jwks)",
    );
  }
  return Object.freeze({ enabled, policyFile, tokensFile, jwt, reflection });
}
