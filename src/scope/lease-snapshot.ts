import { fittingPrefix, PAGE_BYTES, smallestFitting } from "../work/page.js";

/** Sizes, as sent, of the parts of a lease's snapshot (DebugLease). */
export interface SnapshotSizes {
  /** What is always sent: the lease, and every resource without its body. */
  readonly fixed: number;
  /** What each resource's body adds to it, in the order of the resources. */
  readonly bodies: readonly number[];
  /** Each deployment. */
  readonly deployments: readonly number[];
  /** Each event, oldest first. */
  readonly events: readonly number[];
}

/** What of a lease's snapshot is sent. */
export interface SnapshotFit {
  /** Indexes of the deployments sent. */
  readonly deployments: ReadonlySet<number>;
  /** How many of the events are sent: the newest ones. */
  readonly events: number;
  /** Indexes of the resources sent with their body. */
  readonly bodies: ReadonlySet<number>;
}

/**
 * What of a lease's snapshot is sent so that it stays under
 * {@link PAGE_BYTES}: the lease and every resource's id, kind and ownership
 * always; then, while they fit and in this order, its deployments (the
 * largest left out: they are what a snapshot is read for), its events (the
 * oldest left out, so that those sent are the most recent, without a gap),
 * and its resources' bodies (the largest left out: GetResource returns each,
 * and a deployment's body is its entry among the deployments again).
 */
export function fitSnapshot(sizes: SnapshotSizes): SnapshotFit {
  let budget = PAGE_BYTES - sizes.fixed;
  const deployments = smallestFitting(sizes.deployments, budget);
  budget -= deployments.bytes;
  const events = fittingPrefix([...sizes.events].reverse(), budget);
  budget -= events.bytes;
  return {
    deployments: deployments.kept,
    events: events.count,
    bodies: smallestFitting(sizes.bodies, budget).kept,
  };
}
