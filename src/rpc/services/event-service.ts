import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { LeaseholdError } from "../../errors.js";
import { EventKind, type EventSchema, EventService } from "../../gen/leasehold/v1/event_pb.js";
import type { EventKind as DomainKind, EventFilter, EventRecord } from "../../work/event.js";
import type { EventService as Events } from "../../work/event-service.js";
import { pageSize } from "../../work/page-token.js";
import { bind, type ServiceBinding } from "../server.js";
import { checkFilterName } from "../validate.js";

/**
 * The EventService handlers over the domain's event service. A caller that
 * may read events only in some clusters must filter by one of them; events
 * of a scope lease carry its runtime as their cluster, so they are found by it.
 */
export function eventServiceBinding(events: Events): ServiceBinding {
  return bind(EventService, {
    async listEvents(request, ctx) {
      ctx.access.requireListScope("event.read", request.cluster);
      checkFilterName("cluster", request.cluster);
      const page = await events.list(
        toFilter(request),
        pageSize(request.pageSize),
        request.pageToken,
        request.newestFirst,
      );
      return { events: page.items.map(toProtoEvent), nextPageToken: page.nextPageToken };
    },
    async *watchEvents(request, ctx) {
      ctx.access.requireListScope("event.read", request.cluster);
      checkFilterName("cluster", request.cluster);
      const after = request.afterSequence === undefined ? undefined : Number(request.afterSequence);
      for await (const event of events.watch(toFilter(request), after, ctx.signal)) {
        yield { event: toProtoEvent(event) };
      }
    },
  });
}

function toFilter(request: {
  actionId: string;
  workerId: string;
  cluster: string;
  kind: EventKind;
}): EventFilter {
  let kind: DomainKind | undefined;
  if (request.kind !== EventKind.UNSPECIFIED) {
    const name = EventKind[request.kind];
    if (name === undefined)
      throw LeaseholdError.invalidArgument("kind", `is not a known EventKind (${request.kind})`);
    kind = name.toLowerCase() as DomainKind;
  }
  return {
    actionId: request.actionId || undefined,
    workerId: request.workerId || undefined,
    cluster: request.cluster || undefined,
    kind,
  };
}

export function toProtoEvent(e: EventRecord): MessageInitShape<typeof EventSchema> {
  return {
    sequence: BigInt(e.sequence),
    kind: EventKind[e.kind.toUpperCase() as keyof typeof EventKind] ?? EventKind.UNSPECIFIED,
    time: timestampFromDate(e.at),
    actionId: e.actionId ?? "",
    workerId: e.workerId ?? "",
    cluster: e.cluster ?? "",
    sessionId: e.sessionId ?? "",
    epoch: BigInt(e.epoch ?? 0),
    leaseId: e.leaseId ?? "",
    message: e.message,
    details: (e.details ?? undefined) as never,
    actor: e.actor,
  };
}
