import { randomUUID } from "node:crypto";
import { format } from "node:util";
import { setFlagsFromString } from "node:v8";
import { Command, Option } from "commander";
import { DEFAULTS, LOG_LEVELS, parseServerConfig } from "../config.js";
import { Code, LeaseholdError } from "../errors.js";
import type { LeaseholdServer } from "../server.js";
import { CliError, EXIT, guardOutput, stdoutLines, variableSwitch } from "./output.js";
import { exitOnSignal, interruptCounter } from "./signals.js";

/** `leasehold serve`: flags and environment become one frozen config, here and nowhere else. */
export function serveCommand(): Command {
  return new Command("serve")
    .description(
      "Run the control plane: gRPC API, health and reflection on one port. The port answers NOT_SERVING until the database is ready, and again while it is unreachable (checked every --heartbeat-interval on a connection of its own; two failed checks in a row, a late timer of a busy process counting as one step); an unreachable PostgreSQL is waited for at start, a misconfigured one exits 1.",
    )
    .addOption(
      new Option("--listen <host:port>", "address to listen on (port 0 picks a free port)")
        .env("LEASEHOLD_LISTEN")
        .default(DEFAULTS.listen),
    )
    .addOption(
      new Option(
        "--database-url <url>",
        "PostgreSQL URL (postgres://user@host:port/db); unset: embedded PGlite in --data-dir",
      ).env("DATABASE_URL"),
    )
    .addOption(
      new Option(
        "--database-pool-size <n>",
        "PostgreSQL connections for client calls and reports (2–1000; default 10); a process opens 3 more of its own (LISTEN, the health check, the renewal of deadlines)",
      ).env("LEASEHOLD_DATABASE_POOL_SIZE"),
    )
    .addOption(
      new Option("--data-dir <dir>", "PGlite data directory (memory:// for a throw-away database)")
        .env("LEASEHOLD_DATA_DIR")
        .default(DEFAULTS.dataDir),
    )
    .addOption(
      new Option(
        "--grace-period <duration>",
        "how long a silent worker session is trusted before it is reaped (≥ 2s)",
      )
        .env("LEASEHOLD_GRACE_PERIOD")
        .default(DEFAULTS.gracePeriod),
    )
    .addOption(
      new Option(
        "--heartbeat-interval <duration>",
        "how often agents heartbeat (at least 100ms, and ≤ a third of the grace period)",
      )
        .env("LEASEHOLD_HEARTBEAT_INTERVAL")
        .default(DEFAULTS.heartbeatInterval),
    )
    .addOption(
      new Option(
        "--max-silence <duration>",
        "sessions silent longer than this get no grace extension when the server restarts (default: 10 × grace period)",
      ).env("LEASEHOLD_MAX_SILENCE"),
    )
    .addOption(
      new Option(
        "--worker-retention <duration>",
        "how long a worker that is not connected is kept after it was last seen, with its sessions, and an ended session after it ended; then they are forgotten (ListWorkers no longer shows them); 0 keeps them forever, else at least 1m",
      )
        .env("LEASEHOLD_WORKER_RETENTION")
        .default(DEFAULTS.workerRetention),
    )
    .addOption(
      new Option(
        "--rebalance-interval <duration>",
        "on PostgreSQL, how often this process looks at how the agents' streams are spread over the server processes on the database (those that marked themselves alive within the last three heartbeat intervals and still have a connection open: not a hung one); when it hosts more than its share it ends a few of them UNAVAILABLE (reason REBALANCING) and their agents reconnect to another address, their sessions and leases intact; 0 never, else at least 1s",
      )
        .env("LEASEHOLD_REBALANCE_INTERVAL")
        .default(DEFAULTS.rebalanceInterval),
    )
    .addOption(
      new Option(
        "--history-retention <duration>",
        "how long an ended action is kept after it ended, with its attempts and events, and a closed scope lease record after it closed; older events of sessions, workers and clusters go too, and a request_id can be used again once its action is gone; 0 keeps everything forever, else at least 1m",
      )
        .env("LEASEHOLD_HISTORY_RETENTION")
        .default(DEFAULTS.historyRetention),
    )
    .addOption(
      new Option(
        "--max-connections-per-address <n>",
        "client connections one peer address may hold open to the gRPC port and the console's together; one past it is closed as it is accepted, so a peer opening connections without end cannot take every file descriptor; the address may also hold 4 open gRPC calls per connection (a call past that is refused RESOURCE_EXHAUSTED, CALLS_PER_ADDRESS); raise it for many agents behind one NAT address; 0 for no limit of either",
      )
        .env("LEASEHOLD_MAX_CONNECTIONS_PER_ADDRESS")
        .default(DEFAULTS.maxConnectionsPerAddress),
    )
    .addOption(
      new Option(
        "--max-unary-calls <n>",
        "unary gRPC calls (every call but worker streams and watches) this process serves at once; past it a call waits its turn, callers (principals, else addresses) taking turns, up to 7 times as many waiting, and past those the caller with the most calls waiting is refused RESOURCE_EXHAUSTED (UNARY_CALLS_OVER_LIMIT, with a RetryInfo) before any work, so that a flood of reads cannot starve heartbeats of the event loop and the database; worker streams, heartbeats and reports are never refused by it; 0 for no limit",
      )
        .env("LEASEHOLD_MAX_UNARY_CALLS")
        .default(DEFAULTS.maxUnaryCalls),
    )
    .addOption(
      new Option(
        "--partition-share <fraction>",
        "when more than this share of a cluster's sessions holding leases (and at least two) are lost, stream closed or silent past the deadline, the cluster is marked partitioned and its lease expiries pause until the share drops or an operator resumes them (never past --max-silence); 1 turns this off",
      )
        .env("LEASEHOLD_PARTITION_SHARE")
        .default(DEFAULTS.partitionShare),
    )
    .addOption(
      new Option(
        "--dispatch-poll <duration>",
        "how often to look for what no notification told this process: queued actions (retry backoffs), and revokes, drains, undrains and lease ends another process's lost notice carried; at least 100ms",
      )
        .env("LEASEHOLD_DISPATCH_POLL")
        .default(DEFAULTS.dispatchPoll),
    )
    .addOption(
      new Option("--metrics-listen <host:port>", 'Prometheus /metrics address, or "off"')
        .env("LEASEHOLD_METRICS_LISTEN")
        .default(DEFAULTS.metricsListen),
    )
    .addOption(
      new Option(
        "--console-listen <host:port>",
        "serve the web console (and the v1 API over Connect, HTTP/1.1 and JSON) at this address, e.g. 127.0.0.1:8090; beyond loopback it needs TLS and credentials like --listen, and uses the same ones (default: off)",
      ).env("LEASEHOLD_CONSOLE_LISTEN"),
    )
    .addOption(
      new Option(
        "--otlp-endpoint <url>",
        "export traces over OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318 (default: off)",
      ).env("LEASEHOLD_OTLP_ENDPOINT"),
    )
    .addOption(
      new Option("--lease-default-ttl <duration>", "TTL of a scope lease created without one")
        .env("LEASEHOLD_LEASE_DEFAULT_TTL")
        .default(DEFAULTS.leaseDefaultTtl),
    )
    .addOption(
      new Option("--lease-max-ttl <duration>", "longest TTL a scope lease may ask for")
        .env("LEASEHOLD_LEASE_MAX_TTL")
        .default(DEFAULTS.leaseMaxTtl),
    )
    .addOption(
      new Option("--max-file-size <bytes>", "largest file resource accepted (up to 64 MiB)")
        .env("LEASEHOLD_MAX_FILE_SIZE")
        .default(DEFAULTS.maxFileSize),
    )
    .addOption(
      new Option(
        "--log-level <level>",
        "log level; debug adds a line for every lease granted, report answered and revoke sent",
      )
        .choices(LOG_LEVELS)
        .env("LEASEHOLD_LOG_LEVEL")
        .default(DEFAULTS.logLevel),
    )
    .addOption(
      new Option(
        "--insecure",
        "allow listening beyond loopback without credentials (anyone who can reach the port can call every method); the variable turns it on with 1, true, yes or on, leaves it off when empty, 0, false, no or off, and any other value exits 2",
      ).env("LEASEHOLD_INSECURE"),
    )
    .addOption(
      new Option(
        "--tls-cert <file>",
        "PEM certificate (chain) of the gRPC port; turns TLS on. Re-read when it changes: open streams keep going, new connections get the new certificate",
      ).env("LEASEHOLD_SERVER_TLS_CERT"),
    )
    .addOption(
      new Option("--tls-key <file>", "PEM private key of --tls-cert").env("LEASEHOLD_SERVER_TLS_KEY"),
    )
    .addOption(
      new Option(
        "--tls-client-ca <file>",
        "PEM CA bundle that client certificates must chain to (mTLS); a client's principal is its certificate's first URI SAN, else its first DNS SAN",
      ).env("LEASEHOLD_TLS_CLIENT_CA"),
    )
    .addOption(
      new Option(
        "--tls-client-auth <mode>",
        "with --tls-client-ca: require a client certificate on every connection, or make it optional so that token callers connect without one (default: require)",
      )
        .choices(["require", "optional"])
        .env("LEASEHOLD_TLS_CLIENT_AUTH"),
    )
    .addOption(
      new Option(
        "--auth-policy <file>",
        'YAML policy binding principals (exact or globs) to roles (agent, reader, submitter, operator) in clusters (each binding names them; ["*"] for all); with credentials configured, whatever it does not allow is refused. Re-read when it changes',
      ).env("LEASEHOLD_AUTH_POLICY"),
    )
    .addOption(
      new Option(
        "--auth-tokens <file>",
        "static bearer tokens, stored as SHA-256 hashes (add with `leasehold token create`); re-read when it changes",
      ).env("LEASEHOLD_AUTH_TOKENS"),
    )
    .addOption(
      new Option(
        "--jwt-jwks <file|url>",
        "JWKS (file or http(s) URL) whose keys sign accepted JWT bearer tokens",
      ).env("LEASEHOLD_JWT_JWKS"),
    )
    .addOption(new Option("--jwt-issuer <iss>", "the iss every JWT must carry").env("LEASEHOLD_JWT_ISSUER"))
    .addOption(
      new Option("--jwt-audience <aud>", "the aud every JWT must carry").env("LEASEHOLD_JWT_AUDIENCE"),
    )
    .addOption(
      new Option(
        "--jwt-clock-skew <duration>",
        "clock skew tolerated on exp, nbf and iat (at most 5m; default 30s)",
      ).env("LEASEHOLD_JWT_CLOCK_SKEW"),
    )
    .addOption(
      new Option(
        "--jwt-max-lifetime <duration>",
        "longest validity of an accepted JWT, from its iat (or now) to its exp (default 24h)",
      ).env("LEASEHOLD_JWT_MAX_LIFETIME"),
    )
    .addOption(
      new Option("--jwt-principal-claim <claim>", "JWT claim naming the principal (default: sub)").env(
        "LEASEHOLD_JWT_PRINCIPAL_CLAIM",
      ),
    )
    .addOption(
      new Option(
        "--reflection <who>",
        "who may use server reflection: open (anyone) or authenticated (callers with valid credentials); health needs no credentials (but a client certificate to connect under --tls-client-auth require)",
      )
        .choices(["open", "authenticated"])
        .env("LEASEHOLD_REFLECTION")
        .default(DEFAULTS.reflection),
    )
    .action(async (options: Record<string, string | boolean | undefined>, command: Command) => {
      let config: ReturnType<typeof parseServerConfig>;
      try {
        config = parseServerConfig({
          listen: options.listen as string,
          databaseUrl: options.databaseUrl as string | undefined,
          databasePoolSize: options.databasePoolSize as string | undefined,
          dataDir: options.dataDir as string,
          gracePeriod: options.gracePeriod as string,
          heartbeatInterval: options.heartbeatInterval as string,
          maxSilence: options.maxSilence as string | undefined,
          workerRetention: options.workerRetention as string,
          rebalanceInterval: options.rebalanceInterval as string,
          historyRetention: options.historyRetention as string,
          maxConnectionsPerAddress: options.maxConnectionsPerAddress as string,
          maxUnaryCalls: options.maxUnaryCalls as string,
          partitionShare: options.partitionShare as string,
          dispatchPoll: options.dispatchPoll as string,
          metricsListen: options.metricsListen as string,
          consoleListen: options.consoleListen as string | undefined,
          otlpEndpoint: options.otlpEndpoint as string | undefined,
          // Undefined when not given, so that a message about the two can say which was the default.
          leaseDefaultTtl: given(command, "leaseDefaultTtl"),
          leaseMaxTtl: given(command, "leaseMaxTtl"),
          maxFileSize: options.maxFileSize as string,
          logLevel: options.logLevel as string,
          // Commander turns a boolean on whenever its variable is set; LEASEHOLD_INSECURE="" or "false" is off.
          insecure:
            command.getOptionValueSource("insecure") === "env"
              ? variableSwitch("LEASEHOLD_INSECURE", process.env.LEASEHOLD_INSECURE)
              : Boolean(options.insecure),
          tlsCert: options.tlsCert as string | undefined,
          tlsKey: options.tlsKey as string | undefined,
          tlsClientCa: options.tlsClientCa as string | undefined,
          tlsClientAuth: options.tlsClientAuth as string | undefined,
          authPolicy: options.authPolicy as string | undefined,
          authTokens: options.authTokens as string | undefined,
          jwtJwks: options.jwtJwks as string | undefined,
          jwtIssuer: options.jwtIssuer as string | undefined,
          jwtAudience: options.jwtAudience as string | undefined,
          jwtClockSkew: options.jwtClockSkew as string | undefined,
          jwtMaxLifetime: options.jwtMaxLifetime as string | undefined,
          jwtPrincipalClaim: options.jwtPrincipalClaim as string | undefined,
          reflection: options.reflection as string,
        });
      } catch (error) {
        // A bad option: say which and how to fix it, and exit 2 like other usage errors.
        if (error instanceof LeaseholdError)
          throw new CliError(saidOfItsSource(error.message, command), EXIT.usage);
        throw error;
      }
      await serve(config, (message) => saidOfItsSource(message, command));
    });
}

/** The value of option `key` when it was given (a flag or its variable), else undefined. */
function given(command: Command, key: string): string | undefined {
  return command.getOptionValueSource(key) === "default"
    ? undefined
    : (command.getOptionValue(key) as string);
}

/**
 * A message about a flag (`--grace-period: must be at least 2s`) whose value
 * came from the flag's environment variable, said of the variable, where the
 * user has to look: `LEASEHOLD_GRACE_PERIOD (--grace-period): must be at least 2s`.
 * Any other message is returned as it is.
 */
export function saidOfItsSource(message: string, command: Command): string {
  const flag = /^(--[a-z-]+):/.exec(message)?.[1];
  const option = flag === undefined ? undefined : command.options.find((o) => o.long === flag);
  if (!option?.envVar || command.getOptionValueSource(option.attributeName()) !== "env") return message;
  return `${option.envVar} (${flag})${message.slice((flag as string).length)}`;
}

/** `sayOfSource` turns a message naming a flag into one naming its variable when the value came from there. */
async function serve(
  config: ReturnType<typeof parseServerConfig>,
  sayOfSource: (message: string) => string,
): Promise<void> {
  // A closed stdout (`leasehold serve | tee log`, then Ctrl-C) drops the logs, never the server.
  guardOutput("drop");
  // V8 otherwise allocates straight into the old generation the objects of any allocation site
  // whose objects often outlived a young-generation collection. With 10,000 worker streams those
  // include per-message objects (grpc-js's read queue entries, decoded heartbeats) that die within
  // a second, and then wait for a full collection. Without it: a fifth less time collecting,
  // and 12 % less RSS (bench/HISTORY.md, heartbeats, 304a04e); the burn-downs and restart are unchanged.
  setFlagsFromString("--no-allocation-site-pretenuring");
  // Loaded here, not at the top: every other command starts faster without the server's modules.
  const [{ pino }, { startServer }, { serializeError }] = await Promise.all([
    import("pino"),
    import("../server.js"),
    import("../log-errors.js"),
  ]);
  // Made here, not by startServer, so that this function's own lines (signals, grpc-js) name the process too.
  const serverId = randomUUID();
  const log = pino(
    {
      level: config.logLevel,
      base: { service: "leasehold", serverId },
      serializers: { err: serializeError },
    },
    stdoutLines,
  );
  // grpc-js writes its own errors to stderr: into the log with the rest instead.
  const { setLogger } = await import("@grpc/grpc-js");
  setLogger({
    error: (...args: unknown[]) => {
      const text = format(...args);
      // Said just before grpc-js throws the bind error that the message naming --listen reports, with
      // the reason this line lacks: a log line above that message only adds noise.
      if (/^No address added out of total \d+ resolved$/.test(text)) return;
      log.warn(`grpc-js: ${text}`);
    },
    // Traces asked for with GRPC_VERBOSITY / GRPC_TRACE.
    info: (...args: unknown[]) => log.info(`grpc-js: ${format(...args)}`),
    debug: (...args: unknown[]) => log.debug(`grpc-js: ${format(...args)}`),
  });
  const stopBeforeReady = new AbortController();
  let server: LeaseholdServer | undefined;
  const interrupts = interruptCounter();
  /** A first signal came: the server is shutting down. */
  let stopping = false;
  const closeAndExit = (running: LeaseholdServer) => {
    running.close().then(
      () => process.exit(EXIT.ok),
      (error: unknown) => {
        log.error({ err: error }, "shutdown failed");
        process.exit(EXIT.failed);
      },
    );
  };
  const stop = (signal: NodeJS.Signals) => {
    const count = interrupts();
    if (count === undefined) return;
    if (count > 1) {
      // The operator will not wait for streams to drain or the final renewal.
      log.warn({ signal }, "second signal; exiting without finishing the shutdown");
      process.exit(exitOnSignal(signal));
    }
    stopping = true;
    log.info({ signal }, "shutting down");
    if (server) closeAndExit(server);
    else {
      // Still starting (e.g. waiting for the database): stop waiting, close the port.
      stopBeforeReady.abort(
        new LeaseholdError(Code.Unavailable, `stopped by ${signal} before it was ready`, {
          reason: "SHUTTING_DOWN",
        }),
      );
    }
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  // A promise rejected with nobody waiting on it (seen once: a raw ECONNRESET while PostgreSQL
  // restarted under load) would end the process and every stream with it. Every loop retries
  // on its own, so the server logs it as the bug it is and keeps serving.
  process.on("unhandledRejection", (reason) => {
    log.error({ err: reason }, "a promise was rejected with nobody to handle it; still serving");
  });
  try {
    server = await startServer(config, log, { signal: stopBeforeReady.signal, serverId });
  } catch (error) {
    // A certificate, key, token or policy file that cannot be used, or a --listen or --console-listen
    // address that cannot be bound: a usage error naming its flag.
    if (error instanceof LeaseholdError && error.code === Code.InvalidArgument)
      throw new CliError(sayOfSource(error.message), EXIT.usage);
    if (error !== stopBeforeReady.signal.reason) throw error;
    log.info("leasehold stopped");
    process.exit(EXIT.ok);
  }
  // A signal that came after the database answered: the start finished first.
  if (stopping) closeAndExit(server);
}
