import type { ClusterBus } from "../../src/work/cluster-bus.js";

/**
 * A bus on which nothing is ever heard: the other processes' wake-ups are all
 * lost (their NOTIFYs failed, or they were killed between commit and NOTIFY).
 */
export function silentBus(): ClusterBus {
  return {
    send() {},
    subscribe: () => () => {},
    onReconnect() {},
    peersListening: async () => true,
    hasPeers: () => true,
    close: async () => {},
  };
}
