import { Command } from "commander";
import { type Event, EventKind, EventSchema, EventService } from "../gen/leasehold/v1/event_pb.js";
import {
  enumFilterOption,
  enumName,
  followThroughRestarts,
  limitOption,
  listUpTo,
  messageJson,
  printJson,
  printLine,
  time,
  withServer,
} from "./output.js";

/**
 * The KIND column is as wide as the longest kind's name, so that every
 * message starts in one column, with --follow too (where the events to come
 * cannot be measured first).
 */
const KIND_WIDTH = Math.max(
  ...Object.keys(EventKind)
    .filter((name) => Number.isNaN(Number(name)))
    .map((name) => name.length),
);

/** One event as `leasehold events` prints it: TIME SEQUENCE KIND ACTOR MESSAGE. */
export function eventLine(e: Event): string {
  const kind = enumName(EventKind, e.kind).toLowerCase();
  // The principal whose call caused the event, "-" for the server's own decisions (expiries, TTL rollbacks).
  const actor = e.actor || "-";
  return `${time(e.time)} ${String(e.sequence).padStart(6)} ${kind.padEnd(KIND_WIDTH)} ${actor.padEnd(16)} ${e.message}`;
}

/** `leasehold events [--follow]`. */
export function eventCommand(): Command {
  return new Command("events")
    .description("List events oldest first; with --follow, keep streaming new ones (NDJSON with --json).")
    .option("--action <id>", "only about this action")
    .option("--worker <id>", "only about this worker")
    .option("--cluster <name>", "only about this cluster")
    .option(
      "--lease <id>",
      "only about this scope lease and its resources (its deployments' actions: --action with the action id)",
    )
    .addOption(enumFilterOption("--kind <kind>", "only of this kind", EventKind))
    .addOption(limitOption("without --follow: "))
    .option("--newest", "without --follow: the newest events (still printed oldest first)")
    .option("-f, --follow", "after the stored events, stream new ones until interrupted")
    .action(async (o: Record<string, unknown>, command: Command) =>
      withServer(
        command,
        (connect) => ({ api: connect(EventService) }),
        async ({ api }, g) => {
          const filter = {
            actionId: (o.action as string | undefined) ?? "",
            workerId: (o.worker as string | undefined) ?? "",
            cluster: (o.cluster as string | undefined) ?? "",
            kind: (o.kind as EventKind | undefined) ?? EventKind.UNSPECIFIED,
            leaseId: (o.lease as string | undefined) ?? "",
          };
          const print = (e: Event) => {
            if (g.json) printJson(messageJson(EventSchema, e));
            else printLine(eventLine(e));
          };
          if (o.follow) {
            // Replays stored events, then follows with no gap; after a server
            // restart it continues after the last sequence it printed.
            let after = 0n;
            await followThroughRestarts(async (connected) => {
              // A call that answers says the server is back, before any new event comes.
              await api.listEvents({ ...filter, pageSize: 1 });
              connected();
              for await (const m of api.watchEvents({ ...filter, afterSequence: after })) {
                if (!m.event) continue;
                after = m.event.sequence;
                print(m.event);
              }
              return "again";
            });
          } else {
            const listed = await listUpTo(
              o.limit as number | undefined,
              (page) => api.listEvents({ ...filter, ...page, newestFirst: o.newest === true }),
              (r) => r.events,
              o.newest
                ? { order: "newest", noun: "event" }
                : { order: "oldest", noun: "event", hint: "--newest shows the latest, or raise --limit" },
            );
            const events = o.newest ? listed.reverse() : listed;
            if (g.json) printJson({ events: events.map((e) => messageJson(EventSchema, e)) });
            else for (const e of events) print(e);
          }
        },
      ),
    );
}
