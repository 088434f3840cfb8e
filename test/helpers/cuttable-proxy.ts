import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";

export interface CuttableProxy {
  readonly port: number;
  /** Ends every connection and refuses new ones: the database is gone for whoever uses this proxy. */
  cut(): void;
  /** Lets new connections through again. */
  restore(): void;
  close(): void;
}

/** A TCP proxy to host:port that can cut its clients off the target. */
export async function cuttableProxy(host: string, port: number): Promise<CuttableProxy> {
  const open = new Set<Socket>();
  let cut = false;
  const server: Server = createServer((client) => {
    if (cut) {
      client.destroy();
      return;
    }
    const upstream = tcpConnect(port, host);
    for (const s of [client, upstream]) {
      open.add(s);
      s.on("error", () => {});
      s.on("close", () => {
        open.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream);
    upstream.pipe(client);
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
    close() {
      destroyAll();
      server.close();
    },
  };
}
