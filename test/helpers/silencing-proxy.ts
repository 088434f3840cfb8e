import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";

/** A TCP proxy whose connections can be made silent, as a dead peer's or a hung backend's are. */
export interface SilencingProxy {
  readonly port: number;
  /** From now on, nothing more passes on the connections open now; new ones work. */
  silenceOpenConnections(): void;
  /**
   * On: the connections whose client has sent the proxy's `marker` go silent
   * at once, and so does any other as soon as it sends it (that message and
   * everything after, both ways, are dropped): the connection of one kind of
   * statement hangs, whichever it is and however often it is replaced. Off:
   * new connections pass again (those already silent stay so).
   */
  silenceCarriers(on: boolean): void;
  /** How many connections have sent `marker` so far. */
  carriers(): number;
  close(): void;
}

/**
 * A TCP proxy to host:port whose connections can be made silent (see
 * {@link SilencingProxy}); `marker` is what its client sends that picks a
 * connection out (a statement's text, sent when it is first prepared).
 */
export async function silencingProxy(host: string, port: number, marker = ""): Promise<SilencingProxy> {
  const open = new Set<{ silent: boolean; carrier: boolean; sockets: Socket[] }>();
  let silencing = false;
  let carriers = 0;
  const server: Server = createServer((client) => {
    const upstream = tcpConnect(port, host);
    const pair = { silent: false, carrier: false, sockets: [client, upstream] };
    open.add(pair);
    /** The end of what the client sent last, so that a marker split over two chunks is seen. */
    let tail = "";
    client.on("data", (chunk) => {
      if (marker && !pair.carrier) {
        const text = tail + chunk.toString("latin1");
        tail = text.slice(-marker.length);
        if (text.includes(marker)) {
          pair.carrier = true;
          carriers++;
        }
      }
      if (silencing && pair.carrier) pair.silent = true;
      if (!pair.silent) upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (!pair.silent) client.write(chunk);
    });
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
    silenceCarriers(on) {
      silencing = on;
      if (on) for (const pair of open) if (pair.carrier) pair.silent = true;
    },
    carriers: () => carriers,
    close() {
      for (const pair of open) for (const s of pair.sockets) s.destroy();
      server.close();
    },
  };
}
