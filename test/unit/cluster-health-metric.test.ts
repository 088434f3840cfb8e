import { describe, expect, it } from "vitest";
import { createMetrics } from "../../src/metrics.js";

describe("the cluster health gauge", () => {
  it("says each cluster's health, 1 for the one it is in and 0 for the others", async () => {
    let clusters = [
      { cluster: "east", health: "DEGRADED" as const },
      { cluster: "west", health: "HEALTHY" as const },
    ];
    const metrics = createMetrics({
      hosted: () =>
        ({ connectedWorkers: 0, leasesHeld: 0, streamsHeldBack: 0, dispatchWaitingMs: 0 }) as never,
      databaseUp: () => true,
      inGrace: async () => 0,
      pausedClusters: async () => 0,
      actions: async () => [],
      clusterHealth: async () => clusters,
    });
    const series = async () =>
      (await metrics.registry.getSingleMetricAsString("leasehold_cluster_health"))
        .split("\n")
        .filter((line) => line.startsWith("leasehold_cluster_health{") && line.endsWith(" 1"));
    expect(await series()).toEqual([
      'leasehold_cluster_health{cluster="east",health="DEGRADED"} 1',
      'leasehold_cluster_health{cluster="west",health="HEALTHY"} 1',
    ]);
    clusters = [{ cluster: "east", health: "HEALTHY" as const }] as typeof clusters;
    expect(await series()).toEqual(['leasehold_cluster_health{cluster="east",health="HEALTHY"} 1']);
  });
});
