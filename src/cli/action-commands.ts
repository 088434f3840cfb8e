import type { MessageShape } from "@bufbuild/protobuf";
import { Command, Option } from "commander";
import {
  ActionSchema,
  ActionService,
  ActionState,
  AttemptOutcome,
  GetActionResponseSchema,
  SubmitActionResponseSchema,
} from "../gen/leasehold/v1/action_pb.js";
import type { createClient } from "../rpc/client.js";
import {
  CliError,
  collect,
  EXIT,
  enumName,
  followThroughRestarts,
  intFlag,
  messageJson,
  parseLabels,
  positiveIntFlag,
  printTable,
  time,
  toJson,
  withServer,
} from "./output.js";

type Action = MessageShape<typeof ActionSchema>;

const STATES = ["queued", "leased", "succeeded", "failed", "cancelled"] as const;

function actionRow(a: Action): string[] {
  return [
    a.id,
    enumName(ActionState, a.state),
    a.cluster,
    a.lease?.workerId ?? "-",
    String(a.epoch),
    String(a.attemptCount),
    a.phase || "-",
    time(a.createTime),
  ];
}
const ACTION_HEADERS = ["ID", "STATE", "CLUSTER", "WORKER", "EPOCH", "ATTEMPTS", "PHASE", "CREATED"];

/** `leasehold action …`: submit, get, list, cancel, watch. */
export function actionCommands(): Command {
  const action = new Command("action").description("Submit and follow actions.");
  const run = (
    command: Command,
    fn: (
      api: ReturnType<typeof createClient<(typeof ActionService)["method"]>>,
      json: boolean,
    ) => Promise<number | undefined>,
  ) =>
    withServer(
      command,
      (connect) => ({ api: connect(ActionService) }),
      ({ api }, g) => fn(api, g.json),
    );

  action
    .command("submit")
    .description(
      "Queue an action. The command after -- becomes the payload {argv}, run by `leasehold agent`.",
    )
    .requiredOption("--cluster <name>", "cluster whose workers run it")
    .option("--payload <json>", "payload as a JSON object (instead of a command after --)")
    .option("--timeout <seconds>", "kill the command after this many seconds (reference agent)", intFlag)
    .option("--label <key=value>", "label a worker must carry (repeatable)", collect)
    .option("--priority <n>", "higher runs first (-1000..1000)", intFlag)
    .option("--run-id <id>", "groups actions of one run")
    .option("--request-id <id>", "idempotency key: a retry with the same key returns the same action")
    .option("--max-attempts <n>", "attempts for retryable failures (default 3)", intFlag)
    .argument("[command...]", "the command to run, after --")
    .action(async (argv: string[], o: Record<string, unknown>, command: Command) => {
      let payload: Record<string, unknown>;
      if (o.payload !== undefined) {
        if (argv.length > 0)
          throw new CliError("give either --payload or a command after --, not both", EXIT.usage);
        try {
          payload = JSON.parse(o.payload as string);
        } catch (error) {
          throw new CliError(`--payload: not valid JSON (${(error as Error).message})`, EXIT.usage);
        }
        if (typeof payload !== "object" || payload === null || Array.isArray(payload)) {
          throw new CliError("--payload: must be a JSON object", EXIT.usage);
        }
      } else if (argv.length > 0) {
        payload = { argv, ...(o.timeout !== undefined ? { timeout: o.timeout } : {}) };
      } else {
        throw new CliError(
          "nothing to run: give a command after -- (e.g. -- make test) or --payload",
          EXIT.usage,
        );
      }
      await run(command, async (api, json) => {
        const response = await api.submitAction({
          cluster: o.cluster as string,
          payload: payload as never,
          labelSelector: parseLabels(o.label as string[] | undefined, "--label"),
          priority: (o.priority as number | undefined) ?? 0,
          runId: (o.runId as string | undefined) ?? "",
          requestId: (o.requestId as string | undefined) ?? "",
          ...(o.maxAttempts !== undefined ? { retryPolicy: { maxAttempts: o.maxAttempts as number } } : {}),
        });
        const { action: a, created } = response;
        if (json) process.stdout.write(`${toJson(messageJson(SubmitActionResponseSchema, response))}\n`);
        else
          process.stdout.write(
            `${created ? "submitted" : "already submitted"} ${a?.id} (${enumName(ActionState, a?.state ?? 0)})\n`,
          );
        return undefined;
      });
    });

  action
    .command("get")
    .description("Show one action and its attempts.")
    .argument("<action-id>")
    .action(async (id: string, _o: unknown, command: Command) =>
      run(command, async (api, json) => {
        const response = await api.getAction({ actionId: id });
        const { action: a, attempts } = response;
        if (json) {
          process.stdout.write(`${toJson(messageJson(GetActionResponseSchema, response))}\n`);
          return undefined;
        }
        if (a) printTable(ACTION_HEADERS, [actionRow(a)]);
        if (a?.createdBy) process.stdout.write(`created by: ${a.createdBy}\n`);
        if (a?.failureReason) process.stdout.write(`reason: ${a.failureReason}\n`);
        if (attempts.length > 0) {
          process.stdout.write("\n");
          printTable(
            ["EPOCH", "WORKER", "OUTCOME", "STARTED", "ENDED"],
            attempts.map((t) => [
              String(t.epoch),
              t.workerId,
              enumName(AttemptOutcome, t.outcome),
              time(t.startTime),
              time(t.endTime),
            ]),
          );
        }
        return undefined;
      }),
    );

  action
    .command("list")
    .description("List actions, oldest first.")
    .addOption(new Option("--state <state>", "only in this state").choices(STATES))
    .option("--cluster <name>", "only of this cluster")
    .option("--run-id <id>", "only of this run")
    .option("--limit <n>", "at most this many (default 100)", positiveIntFlag)
    .action(async (o: Record<string, unknown>, command: Command) =>
      run(command, async (api, json) => {
        const limit = (o.limit as number | undefined) ?? 100;
        const state = o.state
          ? ActionState[(o.state as string).toUpperCase() as keyof typeof ActionState]
          : ActionState.UNSPECIFIED;
        const actions: Action[] = [];
        let pageToken = "";
        do {
          const page = await api.listActions({
            state,
            cluster: (o.cluster as string | undefined) ?? "",
            runId: (o.runId as string | undefined) ?? "",
            pageSize: Math.min(1000, limit - actions.length),
            pageToken,
          });
          actions.push(...page.actions);
          pageToken = page.nextPageToken;
        } while (pageToken && actions.length < limit);
        if (json)
          process.stdout.write(`${toJson({ actions: actions.map((a) => messageJson(ActionSchema, a)) })}\n`);
        else printTable(ACTION_HEADERS, actions.map(actionRow));
        return undefined;
      }),
    );

  action
    .command("cancel")
    .description("Cancel an action (a leased one is revoked from its worker).")
    .argument("<action-id>")
    .option("--reason <text>", "why, recorded on the action")
    .action(async (id: string, o: Record<string, unknown>, command: Command) =>
      run(command, async (api, json) => {
        const { action: a } = await api.cancelAction({
          actionId: id,
          reason: (o.reason as string | undefined) ?? "",
        });
        if (json) process.stdout.write(`${toJson({ action: a && messageJson(ActionSchema, a) })}\n`);
        else
          process.stdout.write(
            `${a?.id} ${a?.cancelRequested && a.state === ActionState.LEASED ? "cancel requested (revoking from its worker)" : enumName(ActionState, a?.state ?? 0)}\n`,
          );
        return undefined;
      }),
    );

  action
    .command("watch")
    .description(
      "Follow an action until it finishes. Exit 0 if it succeeded, 1 if it failed or was cancelled.",
    )
    .argument("<action-id>")
    .action(async (id: string, _o: unknown, command: Command) =>
      run(command, async (api, json) => {
        let last: Action | undefined;
        const terminal = (a: Action | undefined) =>
          a !== undefined && a.state !== ActionState.QUEUED && a.state !== ActionState.LEASED;
        // Rides through server restarts: the watch starts again with the current state.
        await followThroughRestarts(async () => {
          for await (const m of api.watchAction({ actionId: id })) {
            const a = m.action;
            if (!a) continue;
            last = a;
            if (json) process.stdout.write(`${toJson(messageJson(ActionSchema, a))}\n`);
            else {
              const where = a.lease ? ` on ${a.lease.workerId} (epoch ${a.lease.epoch})` : "";
              const why = a.failureReason && a.state !== ActionState.LEASED ? `: ${a.failureReason}` : "";
              process.stdout.write(
                `${time(a.updateTime)} ${enumName(ActionState, a.state)}${where}${a.phase ? ` [${a.phase}]` : ""}${why}\n`,
              );
            }
          }
          return terminal(last) ? "done" : "again";
        });
        return last?.state === ActionState.SUCCEEDED ? EXIT.ok : EXIT.failed;
      }),
    );
  return action;
}
