import type { Logger } from "pino";
import type { Clock } from "../../store/clock.js";
import type { Db } from "../../store/database.js";
import { type EpochRegression, settleEpochRegressions } from "../../store/queries/epoch-regressions.js";
import type { LeaseToken } from "../worker-messages.js";
import type { Hosted } from "./hosted.js";

/**
 * Stray leases a stream gets looked at, at most: a worker listing made-up
 * leases heartbeat after heartbeat costs one look each, then none.
 */
const MAX_CHECKED_PER_STREAM = 1024;

/**
 * Looks at the leases a worker lists that are not its session's (in its hello
 * or a heartbeat) for proof that the database went back in time (see
 * settleEpochRegressions): each is logged as an error, counted and recorded;
 * a lease the database holds in its place is named, and left to its holder.
 */
export interface RegressionCheck {
  /**
   * Looks at `stray` (each (action, epoch) once per stream). Resolves with
   * what proved a regression (none when the look failed: it is logged, and
   * a later heartbeat listing them looks again); never rejects.
   */
  check(s: Hosted, stray: readonly LeaseToken[]): Promise<EpochRegression[]>;
  /** Resolves once the looks already begun are done. */
  idle(): Promise<void>;
}

export function createRegressionCheck(deps: {
  db: Db;
  clock: Clock;
  log: Logger;
  /** Counts each listed lease that proved a regression (leasehold_epoch_regressions_total). */
  regressions?: { inc(n?: number): void };
  /** Wakes the watchers of these actions (and of the event feed). */
  publishActions: (ids: Iterable<string>) => void;
}): RegressionCheck {
  const { db, clock, log } = deps;
  const checked = new WeakMap<Hosted, Set<string>>();
  const running = new Set<Promise<unknown>>();

  async function look(s: Hosted, leases: LeaseToken[]): Promise<EpochRegression[]> {
    const found = await settleEpochRegressions(db, clock, {
      workerId: s.workerId,
      sessionId: s.sessionId,
      cluster: s.cluster,
      actor: s.principal,
      leases,
    });
    if (found.length === 0) return found;
    deps.regressions?.inc(found.length);
    for (const r of found) {
      const c = r.collided;
      log.error(
        {
          actionId: r.actionId,
          workerId: s.workerId,
          cluster: s.cluster,
          sessionId: s.sessionId,
          listedEpoch: r.listedEpoch,
          storedEpoch: r.storedEpoch,
          ...(c
            ? { collidedWorkerId: c.workerId, collidedSessionId: c.sessionId, collidedEpoch: c.epoch }
            : {}),
        },
        `worker ${s.workerId} listed action ${r.actionId} at epoch ${r.listedEpoch}, ` +
          (r.listedEpoch > r.storedEpoch
            ? `above its stored epoch ${r.storedEpoch}`
            : "an epoch this database granted to another worker or never granted") +
          ": the database went back in time (restored from an older backup, or a standby promoted after losing commits) " +
          "and grants it made are lost, so the same (action, epoch) could be granted twice. " +
          (c
            ? `The lease of worker ${c.workerId} at epoch ${c.epoch} may run the same action under the same fencing token; it is left to its holder. `
            : "") +
          "Run `leasehold db restored --database-url …` on this database now (README, Backups and restores)",
      );
    }
    deps.publishActions(found.map((r) => r.actionId));
    return found;
  }

  return {
    check(s, stray) {
      let seen = checked.get(s);
      if (!seen) {
        seen = new Set();
        checked.set(s, seen);
      }
      const fresh: LeaseToken[] = [];
      for (const l of stray) {
        if (seen.size >= MAX_CHECKED_PER_STREAM) break;
        const key = `${l.actionId}\n${l.epoch}`;
        if (seen.has(key)) continue;
        seen.add(key);
        fresh.push({ actionId: l.actionId, epoch: l.epoch });
      }
      if (fresh.length === 0) return Promise.resolve([]);
      const p = look(s, fresh).catch((error: unknown) => {
        // Looked at again if a later heartbeat lists them still.
        for (const l of fresh) seen.delete(`${l.actionId}\n${l.epoch}`);
        log.warn(
          { err: error, workerId: s.workerId, leases: fresh.length },
          "could not check the leases a worker listed for a database that went back in time",
        );
        return [];
      });
      running.add(p);
      void p.finally(() => running.delete(p));
      return p;
    },
    idle: async () => {
      while (running.size > 0) await Promise.all(running);
    },
  };
}
