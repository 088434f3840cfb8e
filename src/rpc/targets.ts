import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { LeaseholdError, quote } from "../errors.js";

/** Splits `--server a:1,b:2` into its addresses. */
export function splitAddresses(text: string): string[] {
  return text
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/** What `--server` takes, for the message that refuses a malformed address. */
const EXPECTED =
  "expected host:port or [ipv6]:port, e.g. 127.0.0.1:50051 or [::1]:50051, several separated by commas " +
  "(or a gRPC target: dns:///host:port, unix:/path/to.sock)";

/**
 * Refuses, as INVALID_ARGUMENT naming `--server`, addresses that grpc-js
 * cannot dial: it would report them only when a call fails, as UNAVAILABLE
 * ("Failed to parse DNS address"), which reads like a server that is down.
 * Each address is host:port or [ipv6]:port, or a target URI of a scheme
 * grpc-js resolves: `dns:[//authority/]host:port`, `ipv4:ip:port`,
 * `ipv6:[ip]:port`, `unix:path`. A port is required everywhere (grpc-js
 * would otherwise dial 443, rarely what a missing port means here).
 */
export function checkAddresses(addresses: readonly string[]): void {
  if (addresses.length === 0)
    throw LeaseholdError.invalidArgument("--server", `no address given; ${EXPECTED}`);
  for (const address of addresses) {
    const problem = addressProblem(address);
    if (problem)
      throw LeaseholdError.invalidArgument("--server", `${quote(address)} ${problem}; ${EXPECTED}`);
    // Several addresses become one balanced target of host:port entries (grpcTarget): a target
    // URI among them would be dropped without a word.
    if (addresses.length > 1 && TARGET_URI.test(address))
      throw LeaseholdError.invalidArgument(
        "--server",
        `${quote(address)} is a gRPC target, which must be the only address; list several servers as host:port`,
      );
  }
}

/** The target URI schemes grpc-js resolves (its dns, ipv4, ipv6 and unix resolvers), with their optional authority. */
const TARGET_URI = /^(dns|ipv4|ipv6|unix):(?:\/\/[^/]*\/)?(.*)$/;

/** What is wrong with one address, as the end of a sentence that starts with it; undefined when nothing is. */
function addressProblem(address: string): string | undefined {
  const uri = TARGET_URI.exec(address);
  const scheme = uri?.[1];
  const rest = uri ? (uri[2] as string) : address;
  if (scheme === "unix") return rest === "" ? "names no socket path after unix:" : undefined;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(rest))
    return "starts with a scheme: give host:port alone (without http:// or similar)";
  let host: string;
  let port: string | undefined;
  const bracketed = /^\[([^\]]*)\](?::(.*))?$/.exec(rest);
  if (bracketed) {
    host = bracketed[1] as string;
    port = bracketed[2];
    if (isIP(host) !== 6) return "has brackets around something other than an IPv6 address";
  } else {
    if (rest.startsWith("[")) return "is not [ipv6]:port";
    const parts = rest.split(":");
    if (parts.length > 2)
      return "has more than one colon: an IPv6 address goes in brackets, e.g. [::1]:50051";
    host = parts[0] as string;
    port = parts[1];
  }
  if (host === "") return "has no host";
  if (/[\s/@[\]]/.test(host)) return `has ${quote(host)} as its host, which is not a host name or IP address`;
  if (port === undefined) return "has no port";
  if (!/^\d{1,5}$/.test(port) || Number(port) < 1 || Number(port) > 65535)
    return `has port ${quote(port)}, not a whole number from 1 to 65535`;
  if (scheme === "ipv4" && isIP(host) !== 4) return "needs an IPv4 address after ipv4:";
  if (scheme === "ipv6" && !bracketed)
    return "needs a bracketed IPv6 address after ipv6:, e.g. ipv6:[::1]:50051";
  return undefined;
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

/**
 * The index of the address to try after the one at `index` (taken modulo):
 * one of the other addresses, at random. Going to the next one in order
 * would move every agent of a server that went away onto one server, and a
 * rolling restart of all of them would leave them all on the last one's
 * successor.
 */
export function anotherAddress(
  targets: readonly { readonly address: string }[],
  index: number,
  random: () => number = Math.random,
): number {
  const here = index % targets.length;
  const current = targets[here]?.address;
  const others = targets.flatMap((t, i) => (t.address === current ? [] : [i]));
  return others.length === 0 ? here : (others[Math.floor(random() * others.length)] as number);
}
