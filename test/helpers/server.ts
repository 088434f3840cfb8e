import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { pino } from "pino";
import { parseServerConfig, type RawServerOptions } from "../../src/config.js";
import { type Client, createClient } from "../../src/rpc/client.js";
import { type LeaseholdServer, type ServerOverrides, startServer } from "../../src/server.js";
import { freshStore, type TestStore } from "./database.js";

/** A server on an ephemeral port with a fresh store, and clients for it. */
export interface TestServer extends AsyncDisposable {
  readonly server: LeaseholdServer;
  /** Log lines at info and above, parsed. */
  readonly logs: Record<string, unknown>[];
  readonly store: TestStore;
  readonly address: string;
  /** A client of `service`, closed with the server. */
  client<S extends GenServiceMethods>(service: GenService<S>): Client<S>;
  /** Stops the server, keeping the store (for restart tests). */
  stop(): Promise<void>;
  /** A new server on the same store. */
  restart(): Promise<TestServer>;
}

/** Starts a server; pass `store` to reuse one (restart tests). */
export async function startTestServer(
  options: { store?: TestStore; config?: RawServerOptions; overrides?: ServerOverrides } = {},
): Promise<TestServer> {
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
    { level: "info" },
    {
      write(line: string) {
        logs.push(JSON.parse(line));
        if (echo) process.stdout.write(line);
      },
    },
  );
  const server = await startServer(config, log, options.overrides);
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
      return startTestServer({ ...options, store });
    },
    [Symbol.asyncDispose]: async () => {
      await stop();
      if (!options.store) await store.drop();
    },
  };
}
