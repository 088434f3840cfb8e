import { describe, expect, it } from "vitest";
import { isLoopback, parseDuration, parseServerConfig } from "../../src/config.js";

describe("server config", () => {
  it("fills in the documented defaults and freezes the result", () => {
    const config = parseServerConfig({});
    expect(config).toEqual({
      listen: "127.0.0.1:50051",
      databaseUrl: undefined,
      databasePoolSize: 10,
      dataDir: "./.leasehold/data",
      gracePeriodMs: 10_000,
      heartbeatIntervalMs: 2_000,
      maxSilenceMs: 100_000,
      maxUnaryCalls: 32,
      workerRetentionMs: 7 * 86_400_000,
      rebalanceIntervalMs: 30_000,
      historyRetentionMs: 7 * 86_400_000,
      maxConnectionsPerAddress: 1024,
      partitionShare: 0.5,
      dispatchPollMs: 1000,
      metricsListen: "127.0.0.1:9464",
      consoleListen: undefined,
      otlpEndpoint: undefined,
      leaseDefaultTtlMs: 3_600_000,
      leaseMaxTtlMs: 86_400_000,
      maxFileBytes: 3_145_728,
      logLevel: "info",
      insecure: false,
      tls: undefined,
      auth: {
        enabled: false,
        policyFile: undefined,
        tokensFile: undefined,
        jwt: undefined,
        reflection: "open",
      },
    });
    expect(Object.isFrozen(config)).toBe(true);
  });

  it("parses durations with units, a bare number meaning seconds", () => {
    expect(parseDuration("--x", "500ms")).toBe(500);
    expect(parseDuration("--x", "2.5s")).toBe(2500);
    expect(parseDuration("--x", "3")).toBe(3000);
    expect(parseDuration("--x", "1m")).toBe(60_000);
    // Past a protobuf Duration's maximum no request carries it (and a float has no whole milliseconds).
    expect(parseDuration("--x", "315576000000s")).toBe(315_576_000_000_000);
    expect(() => parseDuration("--ttl", "999999999999999999999s")).toThrow(
      '--ttl: must be at most 315576000000s, about 10,000 years (got "999999999999999999999s")',
    );
    expect(() => parseDuration("--x", "315576000000.001s")).toThrow(/--x: must be at most 315576000000s/);
    expect(() => parseDuration("--x", "100000000h", { wholeMs: true })).toThrow(/--x: must be at most/);
    expect(parseDuration("--x", "7d")).toBe(7 * 86_400_000);
    expect(() => parseDuration("--grace-period", "soon")).toThrow(/^--grace-period: must be a duration like/);
    expect(() => parseDuration("--ttl", "-5s")).toThrow('--ttl: must not be negative (got "-5s")');
    // Where the value is kept in whole milliseconds (a lease's TTL), a finer one is refused, not rounded.
    expect(parseDuration("--x", "0.9995s")).toBe(1000);
    expect(() => parseDuration("--ttl", "0.9995s", { wholeMs: true })).toThrow(
      '--ttl: must be a whole number of milliseconds (got "0.9995s")',
    );
    expect(() => parseDuration("--ttl", "1.5ms", { wholeMs: true })).toThrow(/whole number of milliseconds/);
    expect(parseDuration("--ttl", "1.001s", { wholeMs: true })).toBe(1001);
    expect(parseDuration("--ttl", "0.0005h", { wholeMs: true })).toBe(1800);
    expect(parseDuration("--ttl", "1.5000", { wholeMs: true })).toBe(1500);
    expect(parseServerConfig({ workerRetention: "0" }).workerRetentionMs).toBe(0);
    expect(() => parseServerConfig({ workerRetention: "30s" })).toThrow(
      "--worker-retention: must be 0 (keep every worker) or at least 1m",
    );
    expect(parseServerConfig({ rebalanceInterval: "0" }).rebalanceIntervalMs).toBe(0);
    expect(() => parseServerConfig({ rebalanceInterval: "500ms" })).toThrow(
      "--rebalance-interval: must be 0 (never move worker streams) or at least 1s",
    );
    expect(parseServerConfig({ historyRetention: "0" }).historyRetentionMs).toBe(0);
    expect(() => parseServerConfig({ historyRetention: "59s" })).toThrow(
      "--history-retention: must be 0 (keep all history) or at least 1m",
    );
    expect(parseServerConfig({ maxConnectionsPerAddress: "0" }).maxConnectionsPerAddress).toBe(0);
    expect(() => parseServerConfig({ maxConnectionsPerAddress: "many" })).toThrow(
      '--max-connections-per-address: must be a whole number of connections, 0 for no limit (got "many")',
    );
    expect(parseServerConfig({ maxUnaryCalls: "0" }).maxUnaryCalls).toBe(0);
    expect(() => parseServerConfig({ maxUnaryCalls: "-1" })).toThrow(
      '--max-unary-calls: must be a whole number of calls, 0 for no limit (got "-1")',
    );
  });

  it("refuses a listen address beyond loopback unless insecure", () => {
    expect(() => parseServerConfig({ listen: "0.0.0.0:50051" })).toThrow(
      /--listen: 0\.0\.0\.0 accepts connections/,
    );
    expect(parseServerConfig({ listen: "0.0.0.0:50051", insecure: true }).listen).toBe("0.0.0.0:50051");
    expect(parseServerConfig({ listen: "[::1]:1" }).listen).toBe("[::1]:1");
    expect(parseServerConfig({ listen: "localhost:0" }).listen).toBe("localhost:0");
  });

  it("names the TTL flag that was set when it conflicts with the other's default, with both values", () => {
    expect(() => parseServerConfig({ leaseDefaultTtl: "48h" })).toThrow(
      /^--lease-default-ttl: 48h is longer than --lease-max-ttl \(24h, the default\); raise --lease-max-ttl too$/,
    );
    expect(() => parseServerConfig({ leaseMaxTtl: "30m" })).toThrow(
      /^--lease-max-ttl: 30m is shorter than --lease-default-ttl \(1h, the default\); lower --lease-default-ttl too$/,
    );
    expect(parseServerConfig({ leaseDefaultTtl: "24h" }).leaseMaxTtlMs).toBe(86_400_000);
  });

  it("says what to fix for each bad option", () => {
    expect(() => parseServerConfig({ listen: "nope" })).toThrow(
      '--listen: must be host:port, e.g. 127.0.0.1:50051 or [::1]:50051 (got "nope")',
    );
    // Each listening flag's example is its own address, and "off" where the flag takes it.
    expect(() => parseServerConfig({ metricsListen: "127.0.0.1" })).toThrow(
      '--metrics-listen: must be host:port, e.g. 127.0.0.1:9464 or [::1]:9464, or "off" (got "127.0.0.1")',
    );
    expect(() => parseServerConfig({ consoleListen: "8080" })).toThrow(
      '--console-listen: must be host:port, e.g. 127.0.0.1:8090 or [::1]:8090, or "off" (got "8080")',
    );
    expect(() => parseServerConfig({ gracePeriod: "1s" })).toThrow(/^--grace-period: must be at least 2s/);
    expect(() => parseServerConfig({ gracePeriod: "3s", heartbeatInterval: "2s" })).toThrow(
      /^--heartbeat-interval: must be at most a third of --grace-period/,
    );
    expect(() => parseServerConfig({ logLevel: "loud" })).toThrow(/^--log-level: must be one of/);
    expect(() => parseServerConfig({ leaseDefaultTtl: "2h", leaseMaxTtl: "1h" })).toThrow(
      /^--lease-max-ttl: 1h is shorter than --lease-default-ttl \(2h\)$/,
    );
    expect(() => parseServerConfig({ maxFileSize: "lots" })).toThrow(
      /^--max-file-size: must be a whole number of bytes/,
    );
    for (const share of ["0", "1.5", "half", "-0.5"]) {
      expect(() => parseServerConfig({ partitionShare: share })).toThrow(
        /^--partition-share: must be a fraction above 0 and at most 1/,
      );
    }
    expect(parseServerConfig({ partitionShare: "1" }).partitionShare).toBe(1);
    expect(() => parseServerConfig({ databaseUrl: "mysql://root:secret@127.0.0.1/db" })).toThrow(
      /^--database-url: must be a PostgreSQL URL, postgres:\/\/user@host:port\/database or postgresql:\/\/… \(got scheme mysql:\)$/,
    );
    expect(() => parseServerConfig({ databaseUrl: "root:secret@127.0.0.1/db" })).toThrow(
      /\(got scheme root:\)$|\(it has no scheme\)$/,
    );
    for (const url of ["postgres://u@h:5432/db", "postgresql://u@h/db", "POSTGRES://u@h/db"]) {
      expect(parseServerConfig({ databaseUrl: url }).databaseUrl).toBe(url);
    }
  });

  it("serves the console only when asked, under the same rules as the gRPC port beyond loopback", () => {
    expect(parseServerConfig({ consoleListen: "off" }).consoleListen).toBeUndefined();
    expect(parseServerConfig({ consoleListen: "127.0.0.1:8080" }).consoleListen).toBe("127.0.0.1:8080");
    expect(() => parseServerConfig({ consoleListen: "8080" })).toThrow(
      /^--console-listen: must be host:port/,
    );
    expect(() => parseServerConfig({ consoleListen: "0.0.0.0:8080" })).toThrow(
      /^--console-listen: 0\.0\.0\.0 accepts connections from other machines, so it needs TLS/,
    );
    const secured = { tlsCert: "s.crt", tlsKey: "s.key", authTokens: "t.yaml" };
    expect(parseServerConfig({ consoleListen: "0.0.0.0:8080", ...secured }).consoleListen).toBe(
      "0.0.0.0:8080",
    );
    expect(() =>
      parseServerConfig({ consoleListen: "0.0.0.0:8080", authTokens: "t.yaml", insecure: true }),
    ).toThrow(/^--console-listen: .*tokens would cross the network in plaintext/);
    expect(parseServerConfig({ consoleListen: "0.0.0.0:8080", insecure: true }).consoleListen).toBe(
      "0.0.0.0:8080",
    );
  });

  it("needs TLS and credentials beyond loopback, and never sends tokens in plaintext there", () => {
    const tls = { tlsCert: "s.crt", tlsKey: "s.key" };
    expect(() => parseServerConfig({ listen: "0.0.0.0:1", ...tls })).toThrow(/needs TLS .* and credentials/);
    expect(parseServerConfig({ listen: "0.0.0.0:1", ...tls, tlsClientCa: "ca.crt" }).auth.enabled).toBe(true);
    expect(() => parseServerConfig({ listen: "0.0.0.0:1", authTokens: "t.yaml", insecure: true })).toThrow(
      /tokens would cross the network in plaintext/,
    );
    expect(parseServerConfig({ listen: "127.0.0.1:1", authTokens: "t.yaml" }).auth.tokensFile).toBe("t.yaml");
  });

  it("names the flag of a TLS or auth option that cannot work", () => {
    expect(() => parseServerConfig({ tlsCert: "s.crt" })).toThrow(
      /^--tls-key: --tls-cert and --tls-key go together/,
    );
    expect(() => parseServerConfig({ tlsClientCa: "ca.crt" })).toThrow(
      /^--tls-client-ca: client certificates need TLS/,
    );
    expect(() => parseServerConfig({ authPolicy: "p.yaml" })).toThrow(
      /^--auth-policy: nothing authenticates/,
    );
    expect(() => parseServerConfig({ jwtJwks: "k.json", jwtIssuer: "i" })).toThrow(
      /^--jwt-audience: is required/,
    );
    expect(() => parseServerConfig({ jwtIssuer: "i" })).toThrow(
      /^--jwt-issuer: applies only with --jwt-jwks/,
    );
    expect(() => parseServerConfig({ reflection: "authenticated" })).toThrow(
      /^--reflection: authenticated needs/,
    );
    expect(() =>
      parseServerConfig({ jwtJwks: "k.json", jwtIssuer: "i", jwtAudience: "a", jwtClockSkew: "10m" }),
    ).toThrow(/^--jwt-clock-skew: must be at most 5m/);
    expect(() =>
      parseServerConfig({ jwtJwks: "k.json", jwtIssuer: "i", jwtAudience: "a", jwtMaxLifetime: "0s" }),
    ).toThrow(/^--jwt-max-lifetime: must be more than 0/);
    expect(() => parseServerConfig({ jwtMaxLifetime: "1h" })).toThrow(
      /^--jwt-max-lifetime: applies only with --jwt-jwks/,
    );
    const jwt = (jwtMaxLifetime?: string) =>
      parseServerConfig({ jwtJwks: "k.json", jwtIssuer: "i", jwtAudience: "a", jwtMaxLifetime }).auth.jwt;
    expect(jwt()?.maxLifetimeMs).toBe(24 * 3600_000);
    expect(jwt("90m")?.maxLifetimeMs).toBe(90 * 60_000);
  });

  it("sizes the PostgreSQL pool with --database-pool-size, 2 to 1000, only with --database-url", () => {
    const url = "postgres://u@h/db";
    expect(parseServerConfig({}).databasePoolSize).toBe(10);
    expect(parseServerConfig({ databaseUrl: url, databasePoolSize: "40" }).databasePoolSize).toBe(40);
    for (const bad of ["1", "1001", "ten", "-3"])
      expect(() => parseServerConfig({ databaseUrl: url, databasePoolSize: bad })).toThrow(
        /^--database-pool-size: must be a whole number of connections from 2 to 1000/,
      );
    expect(() => parseServerConfig({ databasePoolSize: "5" })).toThrow(
      /^--database-pool-size: applies only with --database-url/,
    );
  });

  it("knows which hosts are loopback", () => {
    expect(["127.0.0.1", "127.1.2.3", "::1", "localhost"].map(isLoopback)).toEqual([true, true, true, true]);
    expect(["0.0.0.0", "10.0.0.1", "::", "example.com"].map(isLoopback)).toEqual([
      false,
      false,
      false,
      false,
    ]);
  });
});
