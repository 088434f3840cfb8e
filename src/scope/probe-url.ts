/**
 * Why a deployment's readiness probe may not GET `url`, or undefined when it
 * may (ReadinessProbe.http_get in resource.proto): an http:// or https:// URL
 * on the agent's own host, the loopback (`localhost`, 127.0.0.0/8, `[::1]`),
 * with no user name or password. A probe is the agent's request, sent from
 * its network position: on any other host it would let whoever may create a
 * deployment (maybe allowed to run nothing but `sleep`) reach what the
 * agent's host reaches (cloud metadata, internal services), as `exec` probes
 * are held to the agent's command policy and `tcp_port` to 127.0.0.1.
 *
 * The host is judged as WHATWG URL parsing (which fetch uses) normalizes it:
 * `http://2130706433/` and `http://0x7f.1/` are 127.0.0.1; names other than
 * `localhost` are refused rather than resolved. Used by the server's
 * validation and, for deployments from an older server, by the agent, which
 * also follows a redirect only to a URL this accepts.
 */
export function probeUrlRefusal(url: string): string | undefined {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return "must be an http:// or https:// URL";
  }
  if (parsed.protocol !== "http:" && parsed.protocol !== "https:")
    return "must be an http:// or https:// URL";
  if (parsed.username !== "" || parsed.password !== "") {
    return "must not carry a user name or password (user:password@): the agent sends none";
  }
  if (!isLoopbackHost(parsed.hostname)) {
    return `must be on the agent's own host (localhost, 127.0.0.0/8 or [::1]), not ${JSON.stringify(parsed.hostname)}: the agent probes nothing else`;
  }
  return undefined;
}

/** `localhost`, an address of 127.0.0.0/8, or `[::1]`, as URL's `hostname` spells them. */
function isLoopbackHost(hostname: string): boolean {
  if (hostname === "localhost" || hostname === "[::1]") return true;
  const octets = hostname.split(".");
  return (
    octets.length === 4 &&
    octets[0] === "127" &&
    octets.every((o) => /^(0|[1-9][0-9]{0,2})$/.test(o) && Number(o) <= 255)
  );
}
