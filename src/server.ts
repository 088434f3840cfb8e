import { randomUUID } from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import type { ServerConfig } from "./config.js";
import { ClusterService } from "./gen/leasehold/v1/cluster_pb.js";
import { LeaseService } from "./gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "./gen/leasehold/v1/resource_pb.js";
import { WorkerService } from "./gen/leasehold/v1/worker_pb.js";
import { bind, createRpcServer } from "./rpc/server.js";
import { actionServiceBinding } from "./rpc/services/action-service.js";
import { eventServiceBinding } from "./rpc/services/event-service.js";
import { openDatabase } from "./store/database.js";
import { createActionService } from "./work/action-service.js";
import { createChangeFeed } from "./work/change-feed.js";
import { createEventService } from "./work/event-service.js";

/** A running Leasehold server process. */
export interface LeaseholdServer extends AsyncDisposable {
  /** The port the gRPC server listens on. */
  readonly port: number;
  /** This process's id, shown on the sessions it hosts. */
  readonly serverId: string;
  /**
   * Health NOT_SERVING, stop accepting calls, end open streams, flush
   * pending writes, close the database. Idempotent.
   */
  close(): Promise<void>;
}

/**
 * The composition root: opens the database (migrating it), builds the
 * services and starts the gRPC server. Health turns SERVING once all of it is
 * up.
 */
export async function startServer(config: ServerConfig, log: Logger): Promise<LeaseholdServer> {
  const serverId = randomUUID();
  const database = await openDatabase({ url: config.databaseUrl, dataDir: config.dataDir });
  log.info(
    { driver: database.driver, dataDir: config.databaseUrl ? undefined : config.dataDir },
    "database ready",
  );
  const feed = createChangeFeed();
  const actions = createActionService({ db: database.db, feed });
  const events = createEventService({ db: database.db, feed });
  let rpc: Awaited<ReturnType<typeof createRpcServer>>;
  try {
    rpc = await createRpcServer(config.listen, grpc.ServerCredentials.createInsecure(), {
      log,
      services: [
        actionServiceBinding(actions),
        eventServiceBinding(events),
        // Work leases and scope leases are answered UNIMPLEMENTED until their
        // behaviour lands; the contract is whole so clients can be generated.
        bind(WorkerService, {}),
        bind(ClusterService, {}),
        bind(LeaseService, {}),
        bind(ResourceService, {}),
      ],
    });
  } catch (error) {
    await database.close();
    throw error;
  }
  rpc.markServing();
  log.info({ port: rpc.port, listen: config.listen, serverId }, "leasehold serving");

  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      // Reverse order of start: stop the front door first, the database last.
      await rpc.close();
      await actions.close();
      await database.close();
      log.info("leasehold stopped");
    })();
    return closing;
  };
  return { port: rpc.port, serverId, close, [Symbol.asyncDispose]: close };
}
