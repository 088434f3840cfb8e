/**
 * The largest reconnect delay before the agent has learned the server's grace
 * period from a welcome. An agent that was never welcomed holds no lease, so
 * this only paces the wait for a server that is not up yet; 1 s is an eighth
 * of an 8 s grace, a bit below the server's 10 s default.
 */
export const BACKOFF_CAP_BEFORE_WELCOME_MS = 1000;

/** What {@link reconnectDelayMs} needs to know. */
export interface ReconnectBackoff {
  /** Failed connection attempts since the last welcome (0 for the first retry). */
  readonly attempt: number;
  /** The first delay's ceiling; each further attempt doubles it. */
  readonly initialMs: number;
  /** An explicit largest delay (AgentOptions.maxBackoffMs), if any. */
  readonly maxMs: number | undefined;
  /** The grace period of the last welcome; undefined before any welcome. */
  readonly graceMs: number | undefined;
  /** A number in [0, 1); Math.random by default. */
  readonly random?: () => number;
}

/**
 * The ceiling of the next reconnect delay: `initialMs` doubled per failed
 * attempt, never above grace/8 (SPEC rule 11), nor above an explicit
 * `maxMs`, nor above {@link BACKOFF_CAP_BEFORE_WELCOME_MS} before the grace
 * is known. Held leases survive a lost stream until the session's deadline
 * (last contact + grace); a server back within the grace must find the agent
 * again well before the agent's own self-fence deadline, which is shorter than
 * the grace by up to two heartbeats and the margin.
 */
export function reconnectCeilingMs(b: Omit<ReconnectBackoff, "random">): number {
  const cap = Math.min(
    b.maxMs ?? Number.POSITIVE_INFINITY,
    b.graceMs === undefined ? BACKOFF_CAP_BEFORE_WELCOME_MS : b.graceMs / 8,
  );
  return Math.max(0, Math.min(cap, b.initialMs * 2 ** Math.min(b.attempt, 30)));
}

/**
 * The next reconnect delay with full jitter (uniform between zero and the
 * ceiling), so agents that lost the same server do not come back in lockstep.
 */
export function reconnectDelayMs(b: ReconnectBackoff): number {
  return Math.floor((b.random ?? Math.random)() * reconnectCeilingMs(b));
}

/** The longest wait between attempts whose credentials the server refused. */
export const REFUSED_BACKOFF_CAP_MS = 30_000;

/**
 * The delay before trying again after the server refused the agent's
 * credentials (UNAUTHENTICATED, PERMISSION_DENIED): such a refusal is not
 * an outage, and retrying at the reconnect pace would only flood the
 * server's log. 2 s doubling per refusal up to 30 s, between half and all of
 * that (a rotated token file or policy may fix it, so the agent keeps trying).
 */
export function refusedDelayMs(refusals: number, random: () => number = Math.random): number {
  const ceiling = Math.min(REFUSED_BACKOFF_CAP_MS, 2000 * 2 ** Math.min(Math.max(refusals - 1, 0), 30));
  return Math.floor(ceiling / 2 + (random() * ceiling) / 2);
}
