import { lookup } from "node:dns/promises";
import { isIP } from "node:net";

/** Splits `--server a:1,b:2` into its addresses. */
export function splitAddresses(text: string): string[] {
  return text
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/** host:port → [host, port]; IPv6 hosts are written in brackets ([::1]:50051). */
function hostPort(address: string): [string, string] | undefined {
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(address) ?? /^([^:]+):(\d+)$/.exec(address);
  return match ? [match[1] as string, match[2] as string] : undefined;
}

/** One address to dial, and the host name it was resolved from (what a TLS certificate names). */
export interface Target {
  readonly address: string;
  /** The DNS name the address came from; undefined when it was given as an IP. */
  readonly name: string | undefined;
}

/**
 * Expands every address whose host is a DNS name into one address per
 * record (DNS round-robin: several replicas behind one name), keeping the
 * given order and the name each came from, so that TLS still verifies the
 * server's certificate against the name rather than the IP. Names that do
 * not resolve are kept as they are, so the connection attempt reports the
 * error.
 */
export async function expandTargets(addresses: readonly string[]): Promise<Target[]> {
  const expanded = new Map<string, Target>();
  for (const address of addresses) {
    const parts = hostPort(address);
    if (!parts || isIP(parts[0]) !== 0) {
      if (!expanded.has(address)) expanded.set(address, { address, name: undefined });
      continue;
    }
    const [host, port] = parts;
    // Sorted: resolvers that rotate the order must not make "the next address" the same one.
    const records = (await lookup(host, { all: true }).catch(() => [])).sort((a, b) =>
      a.address.localeCompare(b.address),
    );
    if (records.length === 0 && !expanded.has(address)) expanded.set(address, { address, name: host });
    for (const r of records) {
      const ip = r.family === 6 ? `[${r.address}]:${port}` : `${r.address}:${port}`;
      if (!expanded.has(ip)) expanded.set(ip, { address: ip, name: host });
    }
  }
  return [...expanded.values()];
}

/** {@link expandTargets} without the names. */
export async function expandAddresses(addresses: readonly string[]): Promise<string[]> {
  return (await expandTargets(addresses)).map((t) => t.address);
}

/**
 * The one DNS name the addresses were given with, if there is exactly one
 * (a name, possibly with several records): what TLS verifies when the
 * client dials the name's IPs. Undefined when they are IPs or several names.
 */
export function singleHostName(addresses: readonly string[]): string | undefined {
  const names = new Set(
    addresses.map((a) => hostPort(a)?.[0]).filter((h): h is string => h !== undefined && isIP(h) === 0),
  );
  return names.size === 1 ? [...names][0] : undefined;
}

/**
 * One gRPC target for `--server`: a single address as it is (grpc-js
 * resolves a name itself); several as an `ipv4:`/`ipv6:` list of their
 * addresses (names expanded), which grpc-js tries in order, moving along
 * when the one it uses dies.
 */
export async function grpcTarget(servers: string): Promise<string> {
  const given = splitAddresses(servers);
  if (given.length <= 1) return given[0] ?? servers;
  const expanded = await expandAddresses(given);
  const family = (n: 4 | 6) =>
    expanded.filter((a) => {
      const parts = hostPort(a);
      return parts !== undefined && isIP(parts[0]) === n;
    });
  const v4 = family(4);
  if (v4.length > 0) return `ipv4:${v4.join(",")}`;
  const v6 = family(6);
  if (v6.length > 0) return `ipv6:${v6.join(",")}`;
  return expanded[0] as string;
}
