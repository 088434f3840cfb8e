/**
 * The Leasehold client library: promise-based clients of the v1 services,
 * built from the same generated descriptors as the server.
 *
 * ```js
 * import { ActionService, connectClient } from "leasehold/client";
 * const actions = await connectClient(ActionService, "127.0.0.1:50051", { tokenFile: "token" });
 * const { action } = await actions.submitAction({ cluster: "east", requestId: "r1" });
 * actions.close();
 * ```
 *
 * Every message, enum and service of `proto/leasehold/v1` is exported here
 * too (`ActionService`, `SubmitActionRequestSchema`, `ActionState`, ...);
 * build messages with `create` from `@bufbuild/protobuf`.
 */

import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { type Client, createClient } from "./rpc/client.js";
import { type ClientSecurity, clientChannel } from "./rpc/client-security.js";
import { withFailover } from "./rpc/failover.js";
import { expandAddresses, grpcTarget, splitAddresses } from "./rpc/targets.js";

export { Code, LeaseholdError } from "./errors.js";
export * from "./gen/leasehold/v1/action_pb.js";
export * from "./gen/leasehold/v1/cluster_pb.js";
export * from "./gen/leasehold/v1/event_pb.js";
export * from "./gen/leasehold/v1/lease_pb.js";
export * from "./gen/leasehold/v1/resource_pb.js";
export * from "./gen/leasehold/v1/worker_pb.js";
export type { CallOptions, Client, ClientMethod } from "./rpc/client.js";
export { createClient } from "./rpc/client.js";
export type { ClientSecurity } from "./rpc/client-security.js";
/** A JSON object, as payloads, outputs and details are (protobuf Struct). */
export type { JsonObject } from "./work/action.js";

/**
 * A client of `service` at `servers` (`host:port`, or several separated by
 * commas, tried in order like the CLI's `--server`; a unary call a server
 * refuses unserved, its database unreachable, goes to the next), with TLS and the bearer
 * token as `security` says. Throws LeaseholdError (INVALID_ARGUMENT) on a bad
 * combination of options or an unreadable file. Call `close()` when done.
 */
export async function connectClient<S extends GenServiceMethods>(
  service: GenService<S>,
  servers: string,
  security: ClientSecurity = {},
): Promise<Client<S>> {
  const channel = clientChannel(security, splitAddresses(servers));
  const target = await grpcTarget(servers);
  return withFailover(
    service,
    createClient(service, target, channel.credentials, channel.options, channel.interceptors),
    await expandAddresses(splitAddresses(servers)),
    (address) => createClient(service, address, channel.credentials, channel.options, channel.interceptors),
  );
}
