/**
 * The server's clock as seen from the page. Deadlines come from the server
 * (its database clock), so a countdown is only right if the page counts on
 * the server's time. Every response's `date` header (whole seconds) bounds
 * the offset between the two clocks; many responses narrow the bounds. While
 * the bounds contain zero the browser clock is trusted as is, so a synced
 * browser never gets a second of error from the header's coarse resolution.
 */

/** Current time in epoch milliseconds. */
export interface Clock {
  now(): number;
}

/** A Clock that learns the server's offset from `date` response headers. */
export interface ServerClock extends Clock {
  /**
   * Records one response: its `date` header, and the local times just before
   * the request was sent and just after the response headers arrived.
   */
  observe(dateHeader: string | null, sentMs: number, receivedMs: number): void;
}

export function createServerClock(local: Clock = { now: () => Date.now() }): ServerClock {
  // Bounds on (server time - local time), in ms.
  let low = Number.NEGATIVE_INFINITY;
  let high = Number.POSITIVE_INFINITY;
  return {
    observe(dateHeader, sentMs, receivedMs) {
      const stamped = dateHeader === null ? Number.NaN : Date.parse(dateHeader);
      if (Number.isNaN(stamped)) return;
      // The server read its clock at some point in [stamped, stamped + 1000)
      // while the local clock was somewhere in [sentMs, receivedMs].
      const sampleLow = stamped - receivedMs;
      const sampleHigh = stamped + 1000 - sentMs;
      low = Math.max(low, sampleLow);
      high = Math.min(high, sampleHigh);
      // Bounds that cross mean one of the clocks jumped: start over from this sample.
      if (low > high) [low, high] = [sampleLow, sampleHigh];
    },
    now() {
      // The offset in [low, high] closest to zero.
      const offset = Math.min(Math.max(0, low), high);
      return local.now() + offset;
    },
  };
}
