import { createServer, type Server, type Socket, connect as tcpConnect } from "node:net";

/**
 * A fault-injecting TCP proxy for one agent: one listener per server, each
 * forwarding every connection to its server. The faults apply to all of the
 * agent's connections at once, as a network problem near the agent would:
 *
 * - `cut()`: destroys every open connection (both sockets, at once);
 * - `stall()` … `unstall()`: forwards nothing in either direction; bytes wait
 *   (in the proxy and in the kernels' buffers, then the senders block) and
 *   flow again when it ends. Connections opened meanwhile are accepted and
 *   connected upstream but stalled too: a black hole, not a refusal;
 * - `refuse()` … `unrefuse()`: cuts every open connection, then closes every
 *   new one as soon as it is accepted (with a reset).
 *
 * The proxy only applies faults; the orchestrator measures when they start and end.
 */
export interface AgentProxy {
  /** The listeners' addresses (host:port), in server order. */
  readonly addresses: readonly string[];
  /** Connections open now. */
  readonly open: number;
  cut(): void;
  stall(): void;
  unstall(): void;
  refuse(): void;
  unrefuse(): void;
  close(): Promise<void>;
}

interface Pair {
  readonly client: Socket;
  readonly upstream: Socket;
}

/** Starts listeners on 127.0.0.1 (free ports) forwarding to `targets` (host:port each). */
export async function createAgentProxy(targets: readonly string[]): Promise<AgentProxy> {
  const pairs = new Set<Pair>();
  let stalled = false;
  let refusing = false;

  const drop = (pair: Pair) => {
    pairs.delete(pair);
    pair.client.destroy();
    pair.upstream.destroy();
  };

  /** Copies `from` to `to`, honouring back-pressure and stalls. */
  const forward = (from: Socket, to: Socket) => {
    from.on("data", (chunk: Buffer) => {
      if (!to.write(chunk)) from.pause();
    });
    to.on("drain", () => {
      if (!stalled) from.resume();
    });
  };

  const accept = (target: string) => (client: Socket) => {
    if (refusing) {
      client.resetAndDestroy();
      return;
    }
    const [host, port] = splitHostPort(target);
    const upstream = tcpConnect({ host, port });
    const pair: Pair = { client, upstream };
    pairs.add(pair);
    for (const socket of [client, upstream]) {
      socket.setNoDelay(true);
      socket.on("error", () => drop(pair));
      socket.on("close", () => drop(pair));
      if (stalled) socket.pause();
    }
    forward(client, upstream);
    forward(upstream, client);
  };

  const servers: Server[] = [];
  const addresses: string[] = [];
  for (const target of targets) {
    const server = createServer({ pauseOnConnect: false }, accept(target));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    const address = server.address();
    if (!address || typeof address === "string") throw new Error("proxy: no TCP address");
    servers.push(server);
    addresses.push(`127.0.0.1:${address.port}`);
  }

  const cut = () => {
    for (const pair of [...pairs]) {
      pair.client.resetAndDestroy();
      pair.upstream.resetAndDestroy();
      pairs.delete(pair);
    }
  };

  return {
    addresses,
    get open() {
      return pairs.size;
    },
    cut,
    stall() {
      stalled = true;
      for (const { client, upstream } of pairs) {
        client.pause();
        upstream.pause();
      }
    },
    unstall() {
      stalled = false;
      for (const { client, upstream } of pairs) {
        client.resume();
        upstream.resume();
      }
    },
    refuse() {
      refusing = true;
      cut();
    },
    unrefuse() {
      refusing = false;
    },
    async close() {
      cut();
      await Promise.all(servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    },
  };
}

function splitHostPort(address: string): [string, number] {
  const at = address.lastIndexOf(":");
  return [address.slice(0, at), Number(address.slice(at + 1))];
}
