import { quote } from "../errors.js";
import { type Access, matchesGlob, permissionDenied, type Right } from "./access.js";

/** An access whose passed checks are kept, to be made again under new credentials or a new policy. */
export interface RecordedAccess {
  /** What the handler uses: each check it passes is recorded, and asked of the current access. */
  readonly access: Access;
  /** The access the checks are asked of now. */
  readonly current: Access;
  /**
   * Makes every recorded check again against `next` (the same caller's
   * access under reloaded credentials or policy) and, when all pass, asks
   * later checks of it. Throws the PERMISSION_DENIED of the first check that
   * no longer passes, naming the right; `current` stays then.
   */
  renew(next: Access): void;
}

/**
 * Wraps `access` for a long-lived call (a stream): what the call touches is
 * what its handler checked, so the checks that passed (a `require…`, or a
 * `can…` that answered true) are what must still pass after a reload. Each
 * distinct check is kept once (by its arguments), so a handler that checks
 * per message does not grow the record. A check that hid a thing as NOT_FOUND
 * (`requireVisible`) is made again as `require`: the caller has seen the
 * thing, and is told which right it lost.
 */
export function recordChecks(access: Access): RecordedAccess {
  let current = access;
  const checks = new Map<string, (next: Access) => void>();
  const keep = (key: string, check: (next: Access) => void) => {
    if (!checks.has(key)) checks.set(key, check);
  };
  const inCluster = (right: Right, cluster: string) => (next: Access) => next.require(right, cluster);
  const recorded: Access = {
    get actor() {
      return current.actor;
    },
    get enforced() {
      return current.enforced;
    },
    get expiresAtMs() {
      return current.expiresAtMs;
    },
    can(right, cluster) {
      const yes = current.can(right, cluster);
      if (yes) keep(`can\0${right}\0${cluster}`, inCluster(right, cluster));
      return yes;
    },
    holdsAnywhere(right) {
      const yes = current.holdsAnywhere(right);
      if (yes)
        keep(`anywhere\0${right}`, (next) => {
          if (!next.holdsAnywhere(right)) throw permissionDenied(next.actor, right, "in any cluster");
        });
      return yes;
    },
    require(right, cluster) {
      current.require(right, cluster);
      keep(`can\0${right}\0${cluster}`, inCluster(right, cluster));
    },
    requireVisible(right, cluster, missing) {
      current.requireVisible(right, cluster, missing);
      keep(`can\0${right}\0${cluster}`, inCluster(right, cluster));
    },
    canOwned(right, cluster, owner) {
      const yes = current.canOwned(right, cluster, owner);
      if (yes)
        keep(`owned\0${right}\0${cluster}\0${owner}`, (next) => next.requireOwned(right, cluster, owner));
      return yes;
    },
    requireOwned(right, cluster, owner) {
      current.requireOwned(right, cluster, owner);
      keep(`owned\0${right}\0${cluster}\0${owner}`, (next) => next.requireOwned(right, cluster, owner));
    },
    requireListScope(right, cluster, field) {
      current.requireListScope(right, cluster, field);
      keep(`list\0${right}\0${cluster}`, (next) => next.requireListScope(right, cluster, field));
    },
    clustersWith(right) {
      const globs = current.clustersWith(right);
      // A listing of "every cluster the caller may read" (a watch naming none) was scoped to these:
      // each must still be held, or the stream would go on with what the caller lost.
      if (globs !== undefined)
        keep(`clusters\0${right}\0${globs.join("\0")}`, (next) => {
          const now = next.clustersWith(right);
          // A glob still held, or covered by a broader one (team-a by team-*), is not lost.
          const lost = now === undefined ? undefined : globs.find((g) => !now.some((n) => matchesGlob(n, g)));
          if (lost !== undefined)
            throw permissionDenied(next.actor, right, `in cluster ${quote(lost)}`, { cluster: lost });
        });
      else
        keep(`everywhere\0${right}`, (next) => {
          if (next.clustersWith(right) !== undefined)
            throw permissionDenied(next.actor, right, "in every cluster");
        });
      return globs;
    },
    requireEverywhere(right, why) {
      current.requireEverywhere(right, why);
      keep(`everywhere\0${right}`, (next) => next.requireEverywhere(right, why));
    },
    mayRunWorker(cluster, workerId) {
      const yes = current.mayRunWorker(cluster, workerId);
      if (yes)
        keep(`worker\0${cluster}\0${workerId}`, (next) => {
          if (!next.mayRunWorker(cluster, workerId))
            throw permissionDenied(
              next.actor,
              "worker.connect",
              `for worker ${quote(workerId)} in cluster ${quote(cluster)}`,
              { cluster, worker_id: workerId },
            );
        });
      return yes;
    },
  };
  return {
    access: recorded,
    get current() {
      return current;
    },
    renew(next) {
      for (const check of checks.values()) check(next);
      current = next;
    },
  };
}
