import type { MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Access } from "../../auth/access.js";
import { Code, LeaseholdError } from "../../errors.js";
import { EventKind, EventSchema, EventService } from "../../gen/leasehold/v1/event_pb.js";
import type { EventKind as DomainKind, EventFilter, EventRecord } from "../../work/event.js";
import type { EventService as Events } from "../../work/event-service.js";
import { PAGE_BYTES } from "../../work/page.js";
import { pageSize } from "../../work/page-token.js";
import { encodedSize } from "../encoded-size.js";
import { bind, type ServiceBinding } from "../server.js";
import { checkFilterName } from "../validate.js";

/**
 * The EventService handlers over the domain's event service. A caller that
 * may read events only in some clusters is answered the events of those
 * clusters when it names none; events of a scope lease carry its runtime as
 * their cluster, so they are found by it.
 */
export function eventServiceBinding(events: Events): ServiceBinding {
  return bind(EventService, {
    async listEvents(request, ctx) {
      const filter = readableFilter(request, ctx.access);
      const sizeOf = (e: EventRecord) => encodedSize(EventSchema, toProtoEvent(e));
      const page = await events.list(
        filter,
        pageSize(request.pageSize),
        request.pageToken,
        request.newestFirst,
        sizeOf,
      );
      // Only a page of one event can be over (toPage): refused here, not sent for the client to refuse.
      const [only] = page.items;
      if (page.items.length === 1 && only) {
        const bytes = sizeOf(only);
        if (bytes > PAGE_BYTES) {
          const goOn = page.nextPageToken
            ? "ListEvents with the page token in this error's ErrorInfo metadata (next_page_token) lists the events past it"
            : "no event of the listing is past it";
          throw eventTooLarge(only.sequence, bytes, goOn, { next_page_token: page.nextPageToken });
        }
      }
      return { events: page.items.map(toProtoEvent), nextPageToken: page.nextPageToken };
    },
    async *watchEvents(request, ctx) {
      const filter = readableFilter(request, ctx.access);
      const after = request.afterSequence === undefined ? undefined : Number(request.afterSequence);
      for await (const event of events.watch(filter, after, ctx.signal)) {
        const message = toProtoEvent(event);
        if (mayBeOver(event)) {
          const bytes = encodedSize(EventSchema, message);
          if (bytes > PAGE_BYTES)
            throw eventTooLarge(
              event.sequence,
              bytes,
              `WatchEvents with after_sequence ${event.sequence} goes on past it`,
            );
        }
        yield { event: message };
      }
    },
  });
}

/**
 * An event that alone takes more than {@link PAGE_BYTES} as sent: refused
 * with what to do, not sent for a default client to refuse (4 MiB) with a
 * transport error that names nothing, and that a watch would meet again at
 * every retry. No writer makes one today (details are the server's own,
 * messages at most 64 Ki characters), but the log is read back as stored.
 */
function eventTooLarge(
  sequence: number,
  bytes: number,
  goOn: string,
  metadata: Record<string, string> = {},
): LeaseholdError {
  const mib = (bytes / (1024 * 1024)).toFixed(1);
  return new LeaseholdError(
    Code.ResourceExhausted,
    `event ${sequence} takes ${mib} MiB as sent, more than one answer can carry (3 MiB); ${goOn}`,
    { reason: "ANSWER_TOO_LARGE", metadata: { sequence: String(sequence), ...metadata } },
  );
}

/**
 * Whether `event` may take more than {@link PAGE_BYTES} as sent, told without
 * encoding it: a watch sends every event of the log, and most have no details
 * and a short message. Its ids and names are at most 128 characters each (4
 * KiB in all, with the numbers and framing); a character of its message and
 * actor takes at most 3 bytes of UTF-8 (a surrogate pair, 4 for 2).
 */
const mayBeOver = (event: EventRecord): boolean =>
  event.details !== null || 3 * (event.message.length + event.actor.length) > PAGE_BYTES - 4096;

type FilterRequest = Parameters<typeof toFilter>[0];

/**
 * The request's filter, limited to what the caller may read: a cluster it
 * names needs event.read there (PERMISSION_DENIED otherwise); without one, a
 * caller that holds event.read only in some clusters gets the events of
 * those clusters, as ListClusters shows it only those. An action, worker or
 * lease of another cluster then finds no events, as an id that never was:
 * ids are no oracle. Events without a cluster (resources made outside any
 * lease) are read only with event.read in every cluster.
 */
function readableFilter(request: FilterRequest, access: Access): EventFilter {
  const filter = toFilter(request);
  if (request.cluster !== "") {
    access.require("event.read", request.cluster);
    checkFilterName("cluster", request.cluster);
    return filter;
  }
  const clusterGlobs = access.clustersWith("event.read");
  return clusterGlobs === undefined ? filter : { ...filter, clusterGlobs };
}

function toFilter(request: {
  actionId: string;
  workerId: string;
  cluster: string;
  kind: EventKind;
  leaseId: string;
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
    leaseId: request.leaseId || undefined,
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
