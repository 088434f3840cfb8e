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
  /** A held heartbeat: its stream, sequence, when it came, and whether it was answered. */
  type Held = { s: Hosted; sequence: bigint; at: number; answered: boolean };
  /** Heartbeats held for the next renewal. */
  let held: Held[] = [];
  /** The heartbeats whose renewal is in flight. */
  let renewing: Held[] = [];
  /** The renewals of held heartbeats, one after another until none is held. */
  let flushing: Promise<void> | undefined;

  const settleIfDone = () => {
    if (waiting.size === 0) allDone?.();
  };

  /** Answers a held heartbeat with the deadline stored now, once. */
  const answer = (h: Held) => {
    if (h.answered) return;
    h.answered = true;
    const { s } = h;
    if (s.ended) {
      if (waiting.delete(s)) settleIfDone();
      return;
    }
    s.link.send({
      type: "heartbeat_ack",
      sequence: h.sequence,
      remainingMs: remainingMs(s),
      databaseUnreachable: deps.databaseUnreachable(),
    });
    deps.heartbeatAckSeconds.observe((performance.now() - h.at) / 1000);
    if (waiting.delete(s)) {
      handedOver++;
      settleIfDone();
    }
  };

  /** Renews the sessions of the held heartbeats in one go, then answers them. */
  async function flush(): Promise<void> {
    while (held.length > 0) {
      renewing = held;
      held = [];
      try {
        await renewal.renewNow([...new Set(renewing.map((h) => h.s))]);
      } catch (error) {
        // The stored deadline stands: the acks below carry what it leaves, as any ack would.
        log.warn({ err: error }, "handover: could not renew the sessions of the heartbeats it holds");
      }
      for (const h of renewing) answer(h);
      renewing = [];
    }
  }

  return {
    active: () => running,
    heartbeat(s, sequence) {
      held.push({ s, sequence, at: performance.now(), answered: false });
      // Heartbeats that arrive in the same turn, or while a renewal runs, share the next one.
      flushing ??= new Promise((resolve) => setImmediate(resolve)).then(flush).finally(() => {
        flushing = undefined;
      });
    },
    ended(s) {
      if (waiting.delete(s)) settleIfDone();
    },
    async run(timeoutMs) {
      const streams = [...hosted.values()].filter((s) => !s.ended);
      if (streams.length === 0 || timeoutMs <= 0) return { handedOver: 0, streams: streams.length };
      for (const s of streams) waiting.add(s);
      running = true;
      log.info(
        { streams: streams.length, timeoutMs },
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
      // From now on heartbeats are answered at once, as usual. The ones held get their renewal's
      // answer, or, if it takes longer than a tenth of the wait (a database that stopped
      // answering), the deadline already stored: no ack is left out, and the close goes on.
      running = false;
      if (flushing) {
        let late: NodeJS.Timeout | undefined;
        await Promise.race([
          flushing,
          new Promise<void>((resolve) => {
            late = setTimeout(resolve, Math.max(100, timeoutMs / 10));
          }),
        ]);
        clearTimeout(late);
        for (const h of [...renewing, ...held]) answer(h);
        held = [];
      }
      waiting.clear();
      return { handedOver, streams: streams.length };
    },
  };
}
