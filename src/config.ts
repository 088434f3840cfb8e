import { isIP } from "node:net";
import { LeaseholdError } from "./errors.js";

/** Log levels pino understands, quietest last. */
export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/**
 * Everything `leasehold serve` needs, parsed once from flags and environment
 * in `main.ts` and passed down frozen. Nothing else reads `process.env`.
 */
export interface ServerConfig {
  /** host:port to listen on. Default `127.0.0.1:50051`; port 0 picks a free one. */
  readonly listen: string;
  /** PostgreSQL URL; when unset the embedded PGlite in `dataDir` is used. */
  readonly databaseUrl: string | undefined;
  /** PGlite data directory (`memory://` for a throw-away one). Default `./.leasehold/data`. */
  readonly dataDir: string;
  /** How long a silent session is trusted before it is reaped. Default 10 s, at least 2 s. */
  readonly gracePeriodMs: number;
  /** How often agents heartbeat. Default 2 s; must be below a third of the grace period. */
  readonly heartbeatIntervalMs: number;
  /** Sessions silent longer than this get no restart extension (SPEC rule 6). Default 10 × grace. */
  readonly maxSilenceMs: number;
  /**
   * SPEC rule 10: when more than this share of a cluster's live sessions (and at least two)
   * are lost (stream closed, or silent past the deadline), the cluster is partitioned and its
   * expiries pause, never past `maxSilenceMs`. Default 0.5; 1 turns the valve off.
   */
  readonly partitionShare: number;
  /**
   * How often each process looks for what no notification told it: queued
   * actions (retry backoffs ending), and revokes, drains and lease ends whose
   * notice from another process was lost. Default 1 s.
   */
  readonly dispatchPollMs: number;
  /** host:port of the Prometheus `/metrics` endpoint, or undefined when off. Default `127.0.0.1:9464`. */
  readonly metricsListen: string | undefined;
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
}

/** Defaults, as `--help` shows them. */
export const DEFAULTS = {
  listen: "127.0.0.1:50051",
  dataDir: "./.leasehold/data",
  gracePeriod: "10s",
  heartbeatInterval: "2s",
  dispatchPoll: "1s",
  partitionShare: "0.5",
  metricsListen: "127.0.0.1:9464",
  leaseDefaultTtl: "1h",
  leaseMaxTtl: "24h",
  maxFileSize: "3145728",
  logLevel: "info",
} as const;

/** Raw option values, as strings from flags or environment. */
export interface RawServerOptions {
  readonly listen?: string | undefined;
  readonly databaseUrl?: string | undefined;
  readonly dataDir?: string | undefined;
  readonly gracePeriod?: string | undefined;
  readonly heartbeatInterval?: string | undefined;
  readonly maxSilence?: string | undefined;
  readonly partitionShare?: string | undefined;
  readonly dispatchPoll?: string | undefined;
  readonly metricsListen?: string | undefined;
  readonly leaseDefaultTtl?: string | undefined;
  readonly leaseMaxTtl?: string | undefined;
  readonly maxFileSize?: string | undefined;
  readonly logLevel?: string | undefined;
  readonly insecure?: boolean | undefined;
}

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };

/** Parses `500ms`, `10s`, `1.5m`, `2h` (a bare number means seconds) into milliseconds. */
export function parseDuration(option: string, text: string): number {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(text.trim());
  if (!match)
    throw configError(option, `must be a duration like 500ms, 10s or 2m (got ${JSON.stringify(text)})`);
  return Math.round(Number(match[1]) * (UNITS[match[2] ?? "s"] ?? 1000));
}

/** Splits `host:port` (or `[v6]:port`); throws naming the option on anything else. */
export function parseListen(text: string, option = "--listen"): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  const port = Number(match?.[3]);
  const host = match?.[1] ?? match?.[2];
  if (!host || !(port >= 0 && port <= 65535)) {
    throw configError(
      option,
      `must be host:port, e.g. 127.0.0.1:50051 or [::1]:50051 (got ${JSON.stringify(text)})`,
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

/** Validates raw options and fills in defaults. Throws an error naming the option to fix. */
export function parseServerConfig(raw: RawServerOptions): ServerConfig {
  const listen = raw.listen ?? DEFAULTS.listen;
  const { host } = parseListen(listen);
  const insecure = raw.insecure ?? false;
  if (!isLoopback(host) && !insecure) {
    throw configError(
      "--listen",
      `${host} accepts connections from other machines, and no credentials are configured; ` +
        "listen on 127.0.0.1, or pass --insecure to accept unauthenticated clients from the network",
    );
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
  const leaseDefaultTtlMs = parseDuration(
    "--lease-default-ttl",
    raw.leaseDefaultTtl ?? DEFAULTS.leaseDefaultTtl,
  );
  const leaseMaxTtlMs = parseDuration("--lease-max-ttl", raw.leaseMaxTtl ?? DEFAULTS.leaseMaxTtl);
  if (leaseDefaultTtlMs < 1000) throw configError("--lease-default-ttl", "must be at least 1s");
  if (leaseMaxTtlMs < leaseDefaultTtlMs)
    throw configError("--lease-max-ttl", "must not be shorter than --lease-default-ttl");
  const maxFileBytes = Number(raw.maxFileSize ?? DEFAULTS.maxFileSize);
  if (!Number.isInteger(maxFileBytes) || maxFileBytes < 1 || maxFileBytes > 64 * 1024 * 1024) {
    throw configError("--max-file-size", "must be a whole number of bytes between 1 and 67108864 (64 MiB)");
  }
  const logLevel = (raw.logLevel ?? DEFAULTS.logLevel) as LogLevel;
  if (!LOG_LEVELS.includes(logLevel))
    throw configError("--log-level", `must be one of ${LOG_LEVELS.join(", ")}`);
  return Object.freeze({
    listen,
    databaseUrl: raw.databaseUrl || undefined,
    dataDir: raw.dataDir ?? DEFAULTS.dataDir,
    gracePeriodMs,
    heartbeatIntervalMs,
    maxSilenceMs,
    partitionShare,
    dispatchPollMs,
    metricsListen,
    leaseDefaultTtlMs,
    leaseMaxTtlMs,
    maxFileBytes,
    logLevel,
    insecure,
  });
}
