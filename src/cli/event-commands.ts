import { Command, Option } from "commander";
import { type Event, EventKind, EventSchema, EventService } from "../gen/leasehold/v1/event_pb.js";
import {
  CliError,
  EXIT,
  enumFilterOption,
  enumName,
  followThroughRestarts,
  limitOption,
  listUpTo,
  messageJson,
  nonNegativeIntFlag,
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

/**
 * The ACTION column's width: an action id (a UUID, which the commands take
 * whole: none accepts a short form), so that the columns after it line up.
 */
const ACTION_WIDTH = 36;

/**
 * One event as `leasehold events` prints it: TIME SEQUENCE KIND ACTION WORKER
 * ACTOR MESSAGE. ACTION and WORKER are the ids to join lines by (two grants
 * read alike but for them), "-" when the event has none.
 */
export function eventLine(e: Event): string {
  const kind = enumName(EventKind, e.kind).toLowerCase();
  const action = e.actionId || "-";
  const worker = e.workerId || "-";
  // The principal whose call caused the event, "-" for the server's own decisions (expiries, TTL rollbacks).
  const actor = e.actor || "-";
  return `${time(e.time)} ${String(e.sequence).padStart(6)} ${kind.padEnd(KIND_WIDTH)} ${action.padEnd(ACTION_WIDTH)} ${worker.padEnd(16)} ${actor.padEnd(16)} ${e.message}`;
}

/** How many of the latest events `events --follow` prints before the new ones, without --limit. */
export const FOLLOW_LIMIT = 20;

/** `leasehold events [--follow]`. */
export function eventCommand(): Command {
  return new Command("events")
    .description(
      `List events oldest first, one a line: TIME SEQUENCE KIND ACTION WORKER ACTOR MESSAGE ("-" for none); ` +
        `with --follow, print the latest ${FOLLOW_LIMIT} (or --limit) and then stream new ones, as tail -f does ` +
        "(NDJSON with --json).",
    )
    .option("--action <id>", "only about this action")
    .option("--worker <id>", "only about this worker")
    .option(
      "--cluster <name>",
      "only about this cluster (without it: every cluster, or with credentials bound to some clusters, theirs)",
    )
    .option(
      "--lease <id>",
      "only about this scope lease and its resources (its deployments' actions: --action with the action id)",
    )
    .addOption(enumFilterOption("--kind <kind>", "only of this kind", EventKind))
    .addOption(limitOption(`with --follow, the latest ${FOLLOW_LIMIT} unless given; `))
    .option(
      "--newest",
      "the newest events (still printed oldest first); --follow always starts with the newest",
    )
    .option(
      "-f, --follow",
      `print the latest events (${FOLLOW_LIMIT}, or --limit), then stream new ones until interrupted`,
    )
    .addOption(
      new Option(
        "--after <sequence>",
        "with --follow: print every stored event after this sequence, then stream new ones (0 replays " +
          "every event kept), instead of starting with the latest",
      )
        .argParser(nonNegativeIntFlag)
        .conflicts(["limit", "newest"]),
    )
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
          if (o.after !== undefined && !o.follow)
            throw new CliError(
              "--after: only with --follow (a listing starts at the oldest event kept)",
              EXIT.usage,
            );
          if (o.follow) {
            // Starts with the latest events (or those after --after), then
            // follows with no gap; after a server restart it continues after
            // the last sequence it printed.
            let after = o.after === undefined ? undefined : BigInt(o.after as number);
            await followThroughRestarts(async (connected) => {
              if (after === undefined) {
                const latest = await listUpTo(
                  (o.limit as number | undefined) ?? FOLLOW_LIMIT,
                  (page) => api.listEvents({ ...filter, ...page, newestFirst: true }),
                  (r) => r.events,
                  { order: "newest", noun: "event", quiet: true },
                );
                connected();
                // Followed from the newest one shown; from 0 when none matched yet, which
                // replays nothing stored but what was committed since (as ListEvents says).
                after = latest[0]?.sequence ?? 0n;
                for (const e of latest.reverse()) print(e);
              } else {
                // A call that answers says the server is back, before any new event comes.
                await api.listEvents({ ...filter, pageSize: 1 });
                connected();
              }
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
