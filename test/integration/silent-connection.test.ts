import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Database, openDatabase } from "../../src/store/database.js";
import { checkOnce } from "../../src/store/database-watch.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";

/**
 * A connection that goes silent (a hung backend, a middlebox that forgot it)
 * while new connections work: the database watch must not wait behind it.
 */
describe.runIf(runsPostgresTests())("the database check after its connection went silent", () => {
  let store: TestStore;
  let proxy: SilencingProxy;
  let database: Database;

  beforeAll(async () => {
    store = await freshPostgresDatabase();
    const target = new URL(store.url as string);
    proxy = await silencingProxy(target.hostname, Number(target.port || 5432));
    target.host = `127.0.0.1:${proxy.port}`;
    database = await openDatabase({ url: target.toString(), dataDir: "" });
  });
  afterAll(async () => {
    proxy?.close();
    await database?.close();
    await store?.drop();
  });

  it("checks on a fresh connection once a check went unanswered", async () => {
    const ping = database.ping as () => Promise<void>;
    expect(await checkOnce(ping, 5000).result).toEqual({ ok: true });
    proxy.silenceOpenConnections();
    // Nothing comes back on the connection the check used.
    expect(await checkOnce(ping, 300).result).toMatchObject({ ok: false, kind: "timeout" });
    // The next check does not queue behind that one: a new connection answers.
    expect(await checkOnce(ping, 5000).result).toEqual({ ok: true });
  });
});

interface SilencingProxy {
  readonly port: number;
  /** From now on, nothing more passes on the connections open now; new ones work. */
  silenceOpenConnections(): void;
  close(): void;
}

/** A TCP proxy to host:port whose open connections can be made silent, as a dead peer's are. */
async function silencingProxy(host: string, port: number): Promise<SilencingProxy> {
  const open = new Set<{ silent: boolean; sockets: Socket[] }>();
  const server: Server = createServer((client) => {
    const upstream = tcpConnect(port, host);
    const pair = { silent: false, sockets: [client, upstream] };
    open.add(pair);
    const forward = (from: Socket, to: Socket) =>
      from.on("data", (chunk) => {
        if (!pair.silent) to.write(chunk);
      });
    forward(client, upstream);
    forward(upstream, client);
    const end = () => {
      open.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const s of pair.sockets) {
      s.on("error", end);
      s.on("close", end);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  return {
    port: typeof address === "object" && address ? address.port : 0,
    silenceOpenConnections() {
      for (const pair of open) pair.silent = true;
    },
    close() {
      for (const pair of open) for (const s of pair.sockets) s.destroy();
      server.close();
    },
  };
}
