import type { Logger } from "pino";
import type { Hosted, HostedSessions } from "./hosted.js";
import { remainingMs } from "./hosted.js";
import type { Renewal } from "./renewal.js";

/**
 * A closing process's last service to its workers. A worker's self-fence
 * deadline counts from the heartbeat of its last ack, plus the `remaining`
 * that ack carried, which the renewal stored up to a heartbeat interval
 * before: it may fall two intervals short of the grace period. A restart
 * longer than what is left of it made the workers stop and re-run their
 * work, though the server restarting extends every session.
 *
 * During the handover, each hosted stream's next heartbeat is answered only
 * once its session's deadline was stored afresh (heard now + grace), so the
 * worker's deadline counts a whole grace period (less its margin) from that
 * heartbeat. The process ends its streams after every stream it hosted was
 * answered so, or ended, or the wait ran out (a stream that does not
 * heartbeat keeps the deadline it had).
 */
export interface Handover {
  /** Whether heartbeats are answered after a renewal of their session, not at once. */
  active(): boolean;
  /** Answers a heartbeat of `s` once its session's deadline is stored afresh. */
  heartbeat(s: Hosted, sequence: bigint): void;
  /** `s` ended: it is no longer waited for. */
  ended(s: Hosted): void;
  /**
   * Hands over every stream hosted now, waiting at most `timeoutMs` for their
   * heartbeats; resolves with how many were answered afresh, of how many.
   */
  run(timeoutMs: number): Promise<{ readonly handedOver: number; readonly streams: number }>;
}

export function createHandover(deps: {
  log: Logger;
  hosted: HostedSessions;
  renewal: Pick<Renewal, "renewNow">;
  /** Whether this process cannot reach its database now: every ack says so (worker.proto). */
  databaseUnreachable: () => boolean;
  heartbeatAckSeconds: { observe(seconds: number): void };
}): Handover {
  const { log, hosted, renewal } = deps;
  let running = false;
  /** The streams hosted when the handover began and not answered afresh yet. */
  const waiting = new Set<Hosted>();
  let handedOver = 0;
  let allDone: (() => void) | undefined;
  /** Heartbeats held for the next renewal: the stream, the sequence and when it came. */
  let held: { s: Hosted; sequence: bigint; at: number }[] = [];
  /** The renewals of held heartbeats, one after another until none is held. */
  let flushing: Promise<void> | undefined;

  const settleIfDone = () => {
    if (waiting.size === 0) allDone?.();
  };

  /** Renews the sessions of the held heartbeats in one go, then answers them. */
  async function flush(): Promise<void> {
    while (held.length > 0) {
      const batch = held;
      held = [];
      try {
        await renewal.renewNow([...new Set(batch.map((h) => h.s))]);
      } catch (error) {
        // The stored deadline stands: the acks below carry what it leaves, as any ack would.
        log.warn({ err: error }, "handover: could not renew the sessions of the heartbeats it holds");
      }
      for (const { s, sequence, at } of batch) {
        if (s.ended) continue;
        s.link.send({
          type: "heartbeat_ack",
          sequence,
          remainingMs: remainingMs(s),
          databaseUnreachable: deps.databaseUnreachable(),
        });
        deps.heartbeatAckSeconds.observe((performance.now() - at) / 1000);
        if (waiting.delete(s)) handedOver++;
      }
      settleIfDone();
    }
  }

  return {
    active: () => running,
    heartbeat(s, sequence) {
      held.push({ s, sequence, at: performance.now() });
      // Heartbeats that arrive in the same turn, or while a renewal runs, share the next one.
      flushing ??= new Promise((resolve) => setImmediate(resolve)).then(flush).finally(() => {
        flushing = undefined;
      });
    },
    ended(s) {
      if (waiting.delete(s)) settleIfDone();
    },
    async run(timeoutMs) {
      for (const s of hosted.values()) if (!s.ended) waiting.add(s);
      const streams = waiting.size;
      if (streams === 0 || timeoutMs <= 0) return { handedOver: 0, streams };
      running = true;
      log.info(
        { streams, timeoutMs },
        "handing over: answering each worker stream's next heartbeat with a deadline stored afresh, so that its leases outlast a restart",
      );
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        allDone = resolve;
        timer = setTimeout(resolve, timeoutMs);
        settleIfDone();
      });
      clearTimeout(timer);
      allDone = undefined;
      // Heartbeats still held are answered before the streams end.
      await flushing;
      running = false;
      return { handedOver, streams };
    },
  };
}
