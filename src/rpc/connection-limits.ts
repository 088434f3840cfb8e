import { readFileSync } from "node:fs";
import type { Server } from "node:net";
import type { Logger } from "pino";
import { perSecond } from "./per-second.js";

/** Why a connection was refused: its address holds its share, or the process holds all it may. */
export type ConnectionRefusal = "per_address" | "total";

/** Counts connections as they open, close and are refused (the metrics). */
export interface ConnectionObserver {
  opened(): void;
  closed(): void;
  refused(reason: ConnectionRefusal): void;
}

/** Options of {@link limitConnections}. */
export interface ConnectionLimitOptions {
  /** Connections one peer address may hold open at once; 0 for no limit. */
  readonly maxPerAddress: number;
  /** Connections the process may hold open at once. */
  readonly maxTotal: number;
  readonly log: Logger;
  readonly observer?: ConnectionObserver | undefined;
}

/** Default of `ConnectionLimitOptions.maxPerAddress`. */
export const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 1024;

/**
 * File descriptors kept free of client connections: the database pool's
 * sockets, the console's and the metrics', files, a reconnect after
 * PostgreSQL restarted.
 */
const RESERVED_DESCRIPTORS = 1024;

/**
 * The default of `ConnectionLimitOptions.maxTotal`: the process's limit on
 * open files (Node raises the soft limit to the hard one as it starts) less
 * {@link RESERVED_DESCRIPTORS}, at least 256; 65,536 where the limit cannot
 * be read or has none.
 */
export function defaultMaxConnections(limitsFile = "/proc/self/limits"): number {
  let text: string;
  try {
    text = readFileSync(limitsFile, "utf8");
  } catch {
    return 65_536;
  }
  const soft = /^Max open files\s+(\d+|unlimited)/m.exec(text)?.[1];
  if (soft === undefined || soft === "unlimited") return 65_536;
  return Math.max(256, Number(soft) - RESERVED_DESCRIPTORS);
}

/** Refusals logged per second at most; the rest are counted in the next line. */
const REFUSALS_PER_SECOND = 5;

/**
 * Bounds the connections `servers` accept, as Nomad bounds the RPC
 * connections of one client address: a peer that opens connections without
 * end (each costs a file descriptor and an HTTP/2 session) fills its
 * address's share, not the process's file table, and the process keeps
 * descriptors for its database and for every other address. A connection
 * past a bound is closed as it is accepted, before TLS or HTTP/2; its client
 * sees the connection reset (gRPC UNAVAILABLE) and retries with backoff, as
 * for any lost connection. Refusals are logged (a few a second at most) and
 * counted.
 */
export function limitConnections(
  servers: Iterable<Server>,
  { maxPerAddress, maxTotal, log, observer }: ConnectionLimitOptions,
): ConnectionLimit {
  const byAddress = new Map<string, number>();
  let open = 0;
  const logRefusal = perSecond(REFUSALS_PER_SECOND);
  const add = (server: Server) => {
    // First, before grpc-js's own listeners: a refused socket never reaches TLS or HTTP/2.
    server.prependListener("connection", (socket) => {
      const address = socket.remoteAddress ?? "";
      const fromAddress = byAddress.get(address) ?? 0;
      const reason: ConnectionRefusal | undefined =
        open >= maxTotal
          ? "total"
          : maxPerAddress > 0 && fromAddress >= maxPerAddress
            ? "per_address"
            : undefined;
      if (reason) {
        socket.destroy();
        observer?.refused(reason);
        logRefusal((skipped) =>
          log.warn(
            { address, open, fromAddress, skipped: skipped || undefined },
            reason === "total"
              ? `refused a connection: ${open} are open, the most this process takes (its open-file limit less ${RESERVED_DESCRIPTORS})`
              : `refused a connection from ${address}: it holds ${fromAddress}, the most one address may (--max-connections-per-address)`,
          ),
        );
        return;
      }
      open += 1;
      byAddress.set(address, fromAddress + 1);
      observer?.opened();
      socket.once("close", () => {
        open -= 1;
        const left = (byAddress.get(address) ?? 1) - 1;
        if (left === 0) byAddress.delete(address);
        else byAddress.set(address, left);
        observer?.closed();
      });
    });
  };
  for (const server of servers) add(server);
  return { open: () => open, add };
}

/** The connections {@link limitConnections} counts. */
export interface ConnectionLimit {
  /** Connections open now, on every server counted. */
  readonly open: () => number;
  /**
   * Counts `server`'s connections too, against the same bounds: the console's
   * port, so that a peer cannot fill the file table through it instead.
   */
  readonly add: (server: Server) => void;
}
