import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import type { Clock } from "../store/clock.js";
import type { Db } from "../store/database.js";
import {
  removeClosedScopeLeases,
  removeFinishedActions,
  removeIdleClusters,
  removeOldEvents,
} from "../store/queries/remove-history.js";
import { createLoops } from "./lease/every.js";

/** Actions (with their attempts and events) one statement removes. */
export const ACTION_BATCH = 500;
/** Scope lease records one statement removes. */
export const LEASE_BATCH = 500;
/** Events one statement looks at. */
export const EVENT_SCAN = 5000;
/** Clusters one statement removes. */
export const CLUSTER_BATCH = 500;

/** What one pass removed. */
export interface HistoryRemoved {
  readonly actions: number;
  readonly leases: number;
  readonly events: number;
  /** Clusters nothing was left of (`removeIdleClusters`). */
  readonly clusters: number;
}

/** Removal of what ended before --history-retention (`remove-history.ts`). */
export interface HistoryKeeper {
  /** Removes everything due, a batch at a time; what it removed. Tests call it with a fake clock. */
  removeDue(): Promise<HistoryRemoved>;
  /**
   * Runs {@link removeDue} 90 s after the start, then hourly, or four times
   * per retention if that is shorter.
   */
  start(): void;
  /** Stops the loop; a pass under way stops after its current batch. */
  close(): void;
}

/**
 * Keeps the tables to what --history-retention asks. Each batch is one
 * statement; after each the keeper waits as long as the statement took, so a
 * backlog (the first pass on a database that grew for months) takes at most
 * half of one connection's time from the hot path, and PGlite, which runs
 * statements on the server's own thread, answers heartbeats between batches.
 */
export function createHistoryKeeper({
  db,
  clock,
  log,
  retentionMs,
  removed,
}: {
  db: Db;
  clock: Clock;
  log: Logger;
  /** 0 keeps everything: the keeper does nothing. */
  retentionMs: number;
  /** Counts what was removed (`leasehold_history_removed_total`). */
  removed?: { inc(labels: { record: "action" | "scope_lease" | "event" | "cluster" }, n: number): void };
}): HistoryKeeper {
  const loops = createLoops(log);
  let closed = false;

  /** Runs `batch` until it says it is done or the keeper closes, pausing as long as each took. */
  const repeat = async (batch: () => Promise<boolean>): Promise<void> => {
    while (!closed) {
      const started = performance.now();
      const more = await batch();
      if (!more) return;
      await sleep(Math.min(1000, performance.now() - started));
    }
  };

  async function removeDue(): Promise<HistoryRemoved> {
    const total = { actions: 0, leases: 0, events: 0, clusters: 0 };
    if (retentionMs === 0) return total;
    await repeat(async () => {
      const r = await removeFinishedActions(db, clock, retentionMs, ACTION_BATCH);
      total.actions += r.actions;
      total.events += r.events;
      return r.actions === ACTION_BATCH;
    });
    await repeat(async () => {
      const r = await removeClosedScopeLeases(db, clock, retentionMs, LEASE_BATCH);
      total.leases += r.leases;
      total.events += r.events;
      return r.leases === LEASE_BATCH;
    });
    let after = 0;
    await repeat(async () => {
      const r = await removeOldEvents(db, clock, retentionMs, after, EVENT_SCAN);
      total.events += r.events;
      after = r.last;
      return r.scanned === EVENT_SCAN && !r.reachedCutoff;
    });
    // Last: the actions and events removed above may have been what kept a cluster.
    await repeat(async () => {
      const n = await removeIdleClusters(db, clock, retentionMs, CLUSTER_BATCH);
      total.clusters += n;
      return n === CLUSTER_BATCH;
    });
    if (removed) {
      removed.inc({ record: "action" }, total.actions);
      removed.inc({ record: "scope_lease" }, total.leases);
      removed.inc({ record: "event" }, total.events);
      removed.inc({ record: "cluster" }, total.clusters);
    }
    if (total.actions + total.leases + total.events + total.clusters > 0)
      log.info({ ...total, retentionMs }, "removed history past --history-retention");
    return total;
  }

  return {
    removeDue,
    start() {
      if (retentionMs === 0) return;
      const everyMs = Math.min(3_600_000, Math.max(retentionMs / 4, 15_000));
      loops.every(
        everyMs,
        "removing history past --history-retention",
        async () => {
          await removeDue();
        },
        { phaseMs: Math.round(everyMs / 3), soonMs: Math.min(everyMs, 90_000) },
      );
    },
    close() {
      closed = true;
      loops.stop();
    },
  };
}
