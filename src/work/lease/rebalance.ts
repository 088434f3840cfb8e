import type { Logger } from "pino";
import { Code, LeaseholdError } from "../../errors.js";
import type { StreamSpread } from "../../store/queries/stream-spread.js";
import type { Hosted, HostedSessions } from "./hosted.js";

/**
 * Spreading worker streams over the server processes of one database.
 *
 * Agents given several addresses connect to one and move only when it fails
 * them: after a rolling restart the process restarted last hosts nobody, and
 * one that was down for an hour stays empty. Each process looks at the
 * spread now and then; one that hosts more than its share (the live sessions
 * over the processes alive, rounded up, plus a tenth: a hung process, whose
 * liveness mark ran out, is not one; see stream-spread.ts) ends some of its streams
 * UNAVAILABLE with reason REBALANCING. Their workers reconnect, to another
 * address if they have one (worker.proto), and their sessions and leases
 * resume there: nothing is lost or run again. A round moves half the excess
 * over the share (at least one), streams holding the fewest leases first:
 * a moved worker picks one of its other addresses at random, so some land
 * on another full process, and the processes converge over a few rounds
 * instead of passing a crowd back and forth.
 *
 * A worker that comes back to this process after being moved has nowhere
 * else to go (one address, or a load balancer that sent it back): it is
 * left here for 10 minutes, doubled on each return, up to a day.
 */
export interface Rebalancer {
  /** Looks at the spread and moves what is over this process's share. */
  run(): Promise<void>;
  /** A hello of `workerId` was accepted here. */
  opened(workerId: string): void;
}

/** The first stay of a worker that came back after a move. */
export const FIRST_STAY_MS = 10 * 60_000;
const LONGEST_STAY_MS = 24 * 60 * 60_000;

/** How many streams a process hosting `spread.mine` should move now (0 when within its share). */
export function streamsOverShare(spread: StreamSpread): number {
  if (spread.servers < 2) return 0;
  const share = Math.ceil(spread.total / spread.servers);
  const excess = spread.mine - share - Math.max(1, Math.floor(share / 10));
  if (excess <= 0) return 0;
  return Math.ceil((spread.mine - share) / 2);
}

export function createRebalancer(deps: {
  hosted: HostedSessions;
  log: Logger;
  /** The spread now, or undefined when it cannot be known. */
  spread: () => Promise<StreamSpread | undefined>;
  /** Whether moving is off for now (the database unreachable, the process closing). */
  paused: () => boolean;
  moved: { inc(n?: number): void };
  now?: () => number;
}): Rebalancer {
  const { hosted, log } = deps;
  const now = deps.now ?? (() => performance.now());
  /** Workers moved from here: when, and how long to leave them here if they come back. */
  const moves = new Map<string, { at: number; stayMs: number }>();
  /** Workers that came back: not moved again before `until`. */
  const stays = new Map<string, { until: number; stayMs: number }>();

  const forgetOld = (at: number) => {
    for (const [id, m] of moves) if (at - m.at > m.stayMs) moves.delete(id);
    for (const [id, s] of stays) if (at >= s.until + s.stayMs) stays.delete(id);
  };

  return {
    async run() {
      if (deps.paused()) return;
      const spread = await deps.spread();
      if (!spread || deps.paused()) return;
      const at = now();
      forgetOld(at);
      const count = streamsOverShare({ ...spread, mine: Math.min(spread.mine, hosted.size) });
      if (count === 0) return;
      const candidates: Hosted[] = [];
      for (const s of hosted.values()) {
        if (s.ended || s.draining) continue;
        const stay = stays.get(s.workerId);
        if (stay && at < stay.until) continue;
        candidates.push(s);
      }
      // Fewest leases first: a moved stream's grants pause while it reconnects.
      candidates.sort((a, b) => a.held.size - b.held.size || Math.random() - 0.5);
      const chosen = candidates.slice(0, count);
      if (chosen.length === 0) return;
      const share = Math.ceil(spread.total / spread.servers);
      const message =
        `this server hosts ${spread.mine} of the ${spread.total} live worker sessions of ${spread.servers} ` +
        `server processes (a share is ${share}): reconnect, to another address if you have one; the session ` +
        "and its leases resume there";
      for (const s of chosen) {
        const earlier = stays.get(s.workerId);
        moves.set(s.workerId, { at, stayMs: earlier?.stayMs ?? FIRST_STAY_MS });
        s.link.close(
          new LeaseholdError(Code.Unavailable, message, {
            reason: "REBALANCING",
            metadata: {
              hosted: String(spread.mine),
              live_sessions: String(spread.total),
              servers: String(spread.servers),
            },
          }),
        );
      }
      deps.moved.inc(chosen.length);
      log.info(
        {
          moved: chosen.length,
          hosted: spread.mine,
          liveSessions: spread.total,
          servers: spread.servers,
          share,
        },
        "moved worker streams to spread them over the server processes",
      );
    },
    opened(workerId) {
      const move = moves.get(workerId);
      if (!move) return;
      moves.delete(workerId);
      const at = now();
      const stayMs = Math.min(move.stayMs, LONGEST_STAY_MS);
      stays.set(workerId, { until: at + stayMs, stayMs: Math.min(stayMs * 2, LONGEST_STAY_MS) });
    },
  };
}
