import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { pino } from "pino";
import { parseServerConfig, type RawServerOptions } from "../../src/config.js";
import { serializeError } from "../../src/log-errors.js";
import { type Client, createClient } from "../../src/rpc/client.js";
import { type LeaseholdServer, type ServerOverrides, startServer } from "../../src/server.js";
import { freshStore, type TestStore } from "./database.js";

/** A server on an ephemeral port with a fresh store, and clients for it. */
export interface TestServer extends AsyncDisposable {
  readonly server: LeaseholdServer;
  /** Log lines at the configured level (`config.logLevel`, default info) and above, parsed. */
  readonly logs: Record<string, unknown>[];
  readonly store: TestStore;
  readonly address: string;
  /** A client of `service`, closed with the server. */
  client<S extends GenServiceMethods>(service: GenService<S>): Client<S>;
  /** Stops the server, keeping the store (for restart tests). */
  stop(): Promise<void>;
  /** A new server on the same store, with the same settings (after `stop`, or stopping this one). */
  restart(): Promise<TestServer>;
  /**
   * Stops this server and starts one with other settings on the same store.
   * The new one drops the store when disposed if this one would have.
   */
  replace(options: { config?: RawServerOptions; overrides?: ServerOverrides }): Promise<TestServer>;
}

type TestServerOptions = { store?: TestStore; config?: RawServerOptions; overrides?: ServerOverrides };

/**
 * Starts a server; pass `store` to reuse one (restart tests). A store the
 * call creates is dropped when the server is disposed, and so is it by the
 * servers that `restart` and `replace` start on it.
 */
export function startTestServer(options: TestServerOptions = {}): Promise<TestServer> {
  return start(options, options.store === undefined);
}

async function start(options: TestServerOptions, ownsStore: boolean): Promise<TestServer> {
  const store = options.store ?? (await freshStore());
  const config = parseServerConfig({
    listen: "127.0.0.1:0",
    databaseUrl: store.url,
    dataDir: store.dataDir,
    metricsListen: "127.0.0.1:0",
    ...options.config,
  });
  // Logs are kept for assertions; LEASEHOLD_TEST_LOG=info also prints them.
  const logs: Record<string, unknown>[] = [];
  const echo = process.env.LEASEHOLD_TEST_LOG !== undefined;
  const log = pino(
    // The serve command's error serializer: tests read the lines an operator would.
    { level: config.logLevel, serializers: { err: serializeError } },
    {
      write(line: string) {
        logs.push(JSON.parse(line));
        if (echo) process.stdout.write(line);
      },
    },
  );
  // No handover by default: a close would wait up to 1.5 heartbeat intervals for heartbeats
  // that most tests' workers never send. restart.test.ts turns it on.
  // Test workers (helpers/worker.ts) acknowledge grants only when a test says so: the limit on
  // heartbeats that leave a grant unacknowledged (GRANTS_UNACKNOWLEDGED) is far off unless a
  // test sets it.
  const server = await startServer(config, log, {
    handOverMs: 0,
    ...options.overrides,
    limits: { grantAckLimitMs: 10 * 60_000, ...options.overrides?.limits },
  });
  const address = `127.0.0.1:${server.port}`;
  const clients: Client<GenServiceMethods>[] = [];
  const stop = async () => {
    for (const c of clients) c.close();
    await server.close();
  };
  return {
    server,
    logs,
    store,
    address,
    client(service) {
      const c = createClient(service, address);
      clients.push(c as unknown as Client<GenServiceMethods>);
      return c;
    },
    stop,
    restart: async () => {
      await stop();
      return start({ ...options, store }, ownsStore);
    },
    replace: async (changes) => {
      await stop();
      return start({ ...changes, store }, ownsStore);
    },
    [Symbol.asyncDispose]: async () => {
      await stop();
      if (ownsStore) await store.drop();
    },
  };
}

/**
 * Resolves with the first of `logs` (a test server's) for which `test` holds,
 * now or once it is written.
 */
export function waitForLog(
  logs: readonly Record<string, unknown>[],
  test: (line: Record<string, unknown>) => boolean,
): Promise<Record<string, unknown>> {
  return new Promise((resolve) => {
    const look = () => {
      const found = logs.find(test);
      if (found) return resolve(found);
      setImmediate(look);
    };
    look();
  });
}
