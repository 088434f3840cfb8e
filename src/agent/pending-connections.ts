import type * as grpc from "@grpc/grpc-js";

/** What this module reaches of a grpc-js 1.14 subchannel (not its public API). */
interface Subchannel {
  connector?: { shutdown?: () => void };
}

/** What this module reaches of a grpc-js 1.14 channel (not its public API). */
interface ChannelInternals {
  internalChannel?: {
    subchannelPool?: {
      getOrCreateSubchannel?: (...args: unknown[]) => Subchannel;
    };
  };
}

const subchannelsOf = new WeakMap<grpc.Client, Set<Subchannel>>();

/**
 * Keeps track of the connections `client` opens, for
 * {@link closeWithPendingConnections}. Only for a client created with
 * `grpc.use_local_subchannel_pool`: its pool, and so what is tracked, is its
 * own, not the process-wide pool that other clients share. Returns `client`.
 *
 * It reaches into grpc-js's channel (the version package-lock.json pins);
 * should that change shape, nothing is tracked, and the agent test "leaves
 * a peer that never starts HTTP/2, closing each connection it opened" fails
 * for the sockets left open.
 */
export function trackingConnections<C extends grpc.Client>(client: C): C {
  const pool = (client.getChannel() as unknown as ChannelInternals).internalChannel?.subchannelPool;
  const create = pool?.getOrCreateSubchannel;
  if (!pool || typeof create !== "function") return client;
  const subchannels = new Set<Subchannel>();
  subchannelsOf.set(client, subchannels);
  pool.getOrCreateSubchannel = (...args: unknown[]) => {
    const subchannel = create.apply(pool, args);
    subchannels.add(subchannel);
    return subchannel;
  };
  return client;
}

/**
 * Closes `client`, and with it the connections its channel is still
 * opening. grpc-js waits for a server's HTTP/2 SETTINGS without a bound, and
 * keeps waiting after the client is closed: a peer that accepted the TCP
 * connection and never answers (a middlebox whose backend hangs, a frozen
 * server) would keep each abandoned attempt's socket open for as long as it
 * does, one more at every retry. A client not made with
 * {@link trackingConnections} is only closed.
 */
export function closeWithPendingConnections(client: grpc.Client): void {
  client.close();
  const subchannels = subchannelsOf.get(client);
  if (!subchannels) return;
  subchannelsOf.delete(client);
  for (const subchannel of subchannels) {
    try {
      subchannel.connector?.shutdown?.();
    } catch {
      // A connector already gone: nothing of it to close.
    }
  }
}
