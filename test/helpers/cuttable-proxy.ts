import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";

export interface CuttableProxy {
  readonly port: number;
  /** Ends every connection and refuses new ones: the database is gone for whoever uses this proxy. */
  cut(): void;
  /** Lets new connections through again. */
  restore(): void;
  /**
   * Stops forwarding in both directions, keeping every connection open, and
   * holds new ones the same way: the database hangs (a stopped process).
   */
  freeze(): void;
  /** Forwards again what waited, and everything after. */
  thaw(): void;
  close(): void;
}

/** A TCP proxy to host:port that can cut its clients off the target. */
export async function cuttableProxy(host: string, port: number): Promise<CuttableProxy> {
  const open = new Set<Socket>();
  /** Each connection's two directions, to stop and start forwarding them. */
  const pairs = new Set<{ flow(on: boolean): void }>();
  let cut = false;
  let frozen = false;
  const server: Server = createServer((client) => {
    if (cut) {
      client.destroy();
      return;
    }
    const upstream = tcpConnect(port, host);
    const pair = {
      flow(on: boolean) {
        if (on) {
          client.pipe(upstream);
          upstream.pipe(client);
        } else {
          client.unpipe(upstream);
          upstream.unpipe(client);
          client.pause();
          upstream.pause();
        }
      },
    };
    pairs.add(pair);
    upstream.on("close", () => pairs.delete(pair));
    for (const s of [client, upstream]) {
      open.add(s);
      s.on("error", () => {});
      s.on("close", () => {
        open.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    pair.flow(!frozen);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  const destroyAll = () => {
    for (const s of open) s.destroy();
  };
  return {
    port: typeof address === "object" && address ? address.port : 0,
    cut() {
      cut = true;
      destroyAll();
    },
    restore() {
      cut = false;
    },
    freeze() {
      frozen = true;
      for (const p of pairs) p.flow(false);
    },
    thaw() {
      frozen = false;
      for (const p of pairs) p.flow(true);
    },
    close() {
      destroyAll();
      server.close();
    },
  };
}
