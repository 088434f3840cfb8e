import { readFileSync } from "node:fs";
import { equals, type MessageShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { Command, InvalidArgumentError, Option } from "commander";
import { isCommandTimeout, MAX_COMMAND_TIMEOUT_SECONDS } from "../agent/command-handler.js";
import {
  ActionSchema,
  ActionService,
  ActionState,
  ActionView,
  AttemptOutcome,
  ExplainActionResponseSchema,
  GetActionResponseSchema,
  SubmitActionResponseSchema,
} from "../gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../gen/leasehold/v1/event_pb.js";
import type { createClient } from "../rpc/client.js";
import { refusedUnserved } from "../rpc/failover.js";
import { retryDelayMsOf } from "../rpc/status.js";
import { type ActionLine, chunkActionLines, parseActionLines } from "./action-lines.js";
import { jsonObjectOption, readStdin } from "./json-option.js";
import {
  CliError,
  cliErrorFrom,
  collect,
  count,
  EXIT,
  enumFilterOption,
  enumName,
  followThroughRestarts,
  intFlag,
  limitOption,
  listUpTo,
  messageJson,
  neverSent,
  parseLabels,
  printJson,
  printLine,
  printTable,
  time,
  withServer,
} from "./output.js";

type Action = MessageShape<typeof ActionSchema>;

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
/** Characters of the end of a failed command's stdout or stderr that `action get` shows. */
const TAIL_CHARS = 1000;

const ACTION_HEADERS = ["ID", "STATE", "CLUSTER", "WORKER", "EPOCH", "ATTEMPTS", "PHASE", "CREATED"];

/** JSON on one line, cut to `max` characters. */
function compact(value: unknown, max: number): string {
  const text = JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max)}… (${text.length} characters; --json shows it all)` : text;
}

/** "phase: its latest line": the phase and, when its details carry one, the line (the reference agent's). */
function phaseText(a: Action): string {
  const line = a.phaseDetails?.line;
  return typeof line === "string" && line !== "" ? `${a.phase}: ${line.slice(0, 200)}` : a.phase;
}

/** Tries of one CancelActions call that a busy server refused, before `action cancel` gives up. */
const CANCEL_TRIES = 5;

/**
 * `action cancel` without an id: CancelActions until no matching action is
 * left, printing what each call did. Exit 0 whatever matched (none is no error).
 */
export async function cancelMatching(
  api: ReturnType<typeof createClient<(typeof ActionService)["method"]>>,
  json: boolean,
  o: Record<string, unknown>,
): Promise<undefined> {
  const cluster = o.cluster as string | undefined;
  if (cluster === undefined)
    throw new CliError("give an action id, or --cluster with --run-id or --all to cancel many", EXIT.usage);
  if (o.runId === undefined && o.all === undefined)
    throw new CliError(
      `--cluster ${cluster}: add --run-id to cancel one run's actions, or --all for every action of the cluster`,
      EXIT.usage,
    );
  const request = {
    cluster,
    runId: (o.runId as string | undefined) ?? "",
    state:
      o.state === "queued"
        ? ActionState.QUEUED
        : o.state === "leased"
          ? ActionState.LEASED
          : ActionState.UNSPECIFIED,
    all: o.all === true,
    reason: (o.reason as string | undefined) ?? "",
  };
  const cancelled: string[] = [];
  const requested: string[] = [];
  // A busy server refuses a call before doing anything (RESOURCE_EXHAUSTED, UNAVAILABLE): wait as
  // its RetryInfo says, or back off, and call again; a call that may have been applied is safe to
  // repeat too (what it cancelled is not matched again). Give up after a few tries, saying how far.
  const call = async () => {
    for (let tries = 1; ; tries++) {
      try {
        return await api.cancelActions(request);
      } catch (error) {
        const code = (error as { code?: number }).code;
        const busy = code === grpc.status.UNAVAILABLE || code === grpc.status.RESOURCE_EXHAUSTED;
        if (!busy || tries >= CANCEL_TRIES) {
          if (cancelled.length + requested.length === 0) throw error;
          const why = (error as { details?: string }).details ?? String(error);
          throw new CliError(
            `${why}\nso far ${cancelled.length} cancelled and ${requested.length} cancel requested; run the same command again to go on`,
            code === grpc.status.UNAVAILABLE ? EXIT.unreachable : EXIT.failed,
          );
        }
        const delayMs = retryDelayMsOf(error) ?? Math.min(5000, 200 * 2 ** (tries - 1));
        await new Promise((resolve) => setTimeout(resolve, delayMs));
      }
    }
  };
  for (let more = true; more; ) {
    const answer = await call();
    cancelled.push(...answer.cancelledIds);
    requested.push(...answer.cancelRequestedIds);
    more = answer.more;
    if (!json && (answer.cancelledIds.length > 0 || answer.cancelRequestedIds.length > 0))
      printLine(
        `cancelled ${count(answer.cancelledIds.length, "queued action")}, cancel requested for ${count(answer.cancelRequestedIds.length, "leased action")} (revoking from their workers)${more ? "; more to go" : ""}`,
      );
  }
  if (json) printJson({ cancelledIds: cancelled, cancelRequestedIds: requested });
  else if (cancelled.length + requested.length === 0) printLine("no queued or leased action matched");
  else if (cancelled.length + requested.length > 1000)
    printLine(`in all: ${cancelled.length} cancelled, ${requested.length} cancel requested`);
  return undefined;
}

/**
 * `leasehold action submit --from FILE`: the file's lines (see
 * parseActionLines), read and checked before anything is sent, then sent in
 * SubmitActions calls of up to 1,000. Each call is all or nothing; a refused
 * call ends the command, naming the line, and the calls before it stay
 * submitted (the message says which lines): with request ids on every line,
 * running the same file again resubmits nothing twice.
 */
async function submitFrom(o: Record<string, unknown>, argv: string[], command: Command): Promise<void> {
  for (const [flag, given] of [
    ["the command after --", argv.length > 0],
    ["--payload", o.payload !== undefined],
    ["--request-id", o.requestId !== undefined],
  ] as const) {
    if (given) throw new CliError(`--from takes every action from its lines; drop ${flag}`, EXIT.usage);
  }
  const source = o.from as string;
  let text: string;
  try {
    text = source === "-" ? await readStdin() : readFileSync(source, "utf8");
  } catch (error) {
    throw new CliError(`--from ${source}: cannot read it (${(error as Error).message})`, EXIT.usage);
  }
  const lines = parseActionLines(text, {
    cluster: o.cluster as string | undefined,
    labels: parseLabels(o.labels as string[] | undefined, "--label"),
    priority: o.priority as number | undefined,
    runId: o.runId as string | undefined,
    maxAttempts: o.maxAttempts as number | undefined,
    timeout: o.timeout as number | undefined,
  });
  await withServer(
    command,
    (connect) => ({ api: connect(ActionService) }),
    async ({ api }, g) => {
      const lineWidth = String(lines.at(-1)?.line ?? 0).length;
      // A loop, not Math.max(...lines): a spread of 125,000 arguments overflows the stack.
      const clusterWidth = lines.reduce((width, l) => Math.max(width, l.request.cluster.length), 7);
      const row = (cells: readonly string[], widths: readonly number[]) =>
        cells
          .map((c, i) => c.padEnd(widths[i] ?? 0))
          .join("  ")
          .trimEnd();
      const widths = [Math.max(4, lineWidth), 36, 9, clusterWidth];
      let created = 0;
      let existing = 0;
      let sent = 0;
      for (const chunk of chunkActionLines(lines)) {
        let results: MessageShape<typeof SubmitActionResponseSchema>[];
        try {
          // The table shows only what names each action; --json prints every field.
          const view = g.json ? ActionView.FULL : ActionView.BASIC;
          ({ results } = await api.submitActions({ actions: chunk.map((c) => c.request), view }));
        } catch (error) {
          throw refusedChunk(error, chunk, sent, lines, g.server);
        }
        if (!g.json && sent === 0) printLine(row(["LINE", "ID", "STATE", "CLUSTER", "RESULT"], widths));
        chunk.forEach((item, i) => {
          const r = results[i];
          const a = r?.action;
          if (r?.created) created++;
          else existing++;
          if (g.json && r) {
            printJson({ line: item.line, ...(messageJson(SubmitActionResponseSchema, r) as object) });
          } else if (!g.json) {
            printLine(
              row(
                [
                  String(item.line),
                  a?.id ?? "-",
                  enumName(ActionState, a?.state ?? 0),
                  a?.cluster ?? "-",
                  r?.created ? "submitted" : "already submitted",
                ],
                widths,
              ),
            );
          }
        });
        sent += chunk.length;
      }
      process.stderr.write(
        `submitted ${created}, already submitted ${existing} (of ${count(lines.length, "line")})\n`,
      );
      return undefined;
    },
  );
}

/**
 * The error of a refused SubmitActions call, with `actions[i]` turned into
 * the line it came from, and what the calls before it already submitted.
 */
export function refusedChunk(
  error: unknown,
  chunk: readonly ActionLine[],
  sent: number,
  lines: readonly ActionLine[],
  server: string,
): CliError {
  const e = error as { code?: number; details?: string };
  if (typeof e.details !== "string" || typeof e.code !== "number") return cliErrorFrom(error, server);
  const details = e.details.replace(/actions\[(\d+)\]\.?/g, (whole, index: string) => {
    const line = chunk[Number(index)]?.line;
    if (line === undefined) return whole;
    return whole.endsWith(".") ? `line ${line}: ` : `line ${line}`;
  });
  const mapped = cliErrorFrom({ ...e, details }, server);
  const done =
    sent > 0
      ? `the ${sent} actions of lines ${lines[0]?.line}–${lines[sent - 1]?.line} were submitted`
      : undefined;
  const range =
    chunk.length === 1
      ? `line ${chunk[0]?.line}`
      : `lines ${chunk[0]?.line}–${chunk[chunk.length - 1]?.line}`;
  // A refusal is an answer: the call was not applied; nor was one that never reached a server.
  // A call lost in flight (the connection dropped, a deadline) may or may not have been committed.
  const unsent = neverSent(error);
  // So is one a server refused unserved (its database unreachable, or starting), whichever the
  // code; not one it was serving when it lost its database (OUTCOME_UNKNOWN).
  const then =
    REFUSALS.has(e.code) || refusedUnserved(error)
      ? `the call for ${range} was refused, so nothing from it on was submitted`
      : unsent
        ? `the call for ${range} never reached the server, so nothing from it on was submitted`
        : `the call for ${range} was in flight, and may or may not have been submitted; nothing after it ` +
          "was sent. Run the same file again: lines with a requestId are not submitted twice (lines " +
          "without one would be)";
  return new CliError(`${mapped.message}\n${done ? `${done}; ` : ""}${then}`, mapped.exitCode);
}

/** Status codes that answer a call without applying it. */
const REFUSALS: ReadonlySet<number> = new Set([
  grpc.status.INVALID_ARGUMENT,
  grpc.status.NOT_FOUND,
  grpc.status.ALREADY_EXISTS,
  grpc.status.PERMISSION_DENIED,
  // Not RESOURCE_EXHAUSTED: grpc-js says it too of an answer too large to receive, after the commit.
  grpc.status.FAILED_PRECONDITION,
  grpc.status.OUT_OF_RANGE,
  grpc.status.UNIMPLEMENTED,
  grpc.status.UNAUTHENTICATED,
]);

/**
 * For `leasehold action submit --cluster east ls -la`, where commander took
 * `-la` for an unknown option of submit: "(the command to run goes after --:
 * leasehold action submit --cluster east -- ls -la)", the same line with `--`
 * before the command. Undefined for any other error, and for an unknown
 * option before any word of a command (more likely a mistyped option).
 */
export function afterDashesHint(submit: Command, message: string): string | undefined {
  const flag = /unknown option '([^']+)'/.exec(message)?.[1];
  if (flag === undefined) return undefined;
  // What followed submit and was not one of its options: the command's words, then the unknown
  // option and everything after it, in the order given.
  const at = submit.args.indexOf(flag);
  if (at <= 0) return undefined;
  const options: string[] = [];
  for (const option of submit.options) {
    const key = option.attributeName();
    // The first of two long spellings ("--label, --labels") is commander's short flag.
    const flag = option.short?.startsWith("--") ? option.short : option.long;
    if (submit.getOptionValueSource(key) !== "cli" || flag === undefined) continue;
    const value = submit.getOptionValue(key) as unknown;
    for (const one of Array.isArray(value) ? value : [value]) {
      options.push(flag);
      if (option.required || option.optional) options.push(String(one));
    }
  }
  const line = [
    "leasehold",
    "action",
    "submit",
    ...options.map(shellWord),
    "--",
    ...submit.args.map(shellWord),
  ];
  return `(the command to run goes after --: ${line.join(" ")})`;
}

/** A word as a POSIX shell reads it back: as it is when it has nothing special, else single-quoted. */
function shellWord(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

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

  const submit = action.command("submit");
  submit
    // `submit --cluster east ls -la` reads -la as an option of submit: say where the command goes.
    .configureOutput({
      outputError: (text, write) => {
        write(text);
        const hint = afterDashesHint(submit, text);
        if (hint !== undefined) write(`${hint}\n`);
      },
    })
    .description(
      "Queue an action. The command after -- becomes the payload {argv}, run by `leasehold agent`. " +
        "With --from, queue one action per line of an NDJSON file instead.",
    )
    .option("--cluster <name>", "cluster whose workers run it (required, unless every --from line names one)")
    .option(
      "--payload <json>",
      "payload as a JSON object (instead of a command after --), or @file to read it from a file (@- for stdin)",
    )
    .option(
      "--timeout <seconds>",
      `kill the command after this many seconds (reference agent; 1 to ${MAX_COMMAND_TIMEOUT_SECONDS})`,
      (value: string) => {
        const seconds = intFlag(value);
        if (!isCommandTimeout(seconds))
          throw new InvalidArgumentError(`expected 1 to ${MAX_COMMAND_TIMEOUT_SECONDS} seconds`);
        return seconds;
      },
    )
    // --labels too: the spelling of `agent`, which labels the worker.
    .option("--label, --labels <key=value>", "label a worker must carry (repeatable)", collect)
    .option("--priority <n>", "higher runs first (-1000..1000)", intFlag)
    .option("--run-id <id>", "groups actions of one run")
    .option("--request-id <id>", "idempotency key: a retry with the same key returns the same action")
    .option("--max-attempts <n>", "attempts for retryable failures (default 3)", intFlag)
    .option(
      "--from <file>",
      'submit one action per line of this NDJSON file (- for stdin): SubmitActionRequest JSON, e.g. {"cluster":"east","requestId":"t-1","argv":["make","test"]} ("argv", "timeout" and "maxAttempts" as the flags; the flags fill what a line leaves out). Sent 1,000 per SubmitActions call; each call is all or nothing',
    )
    .argument("[command...]", "the command to run, after --")
    .action(async (argv: string[], o: Record<string, unknown>, command: Command) => {
      if (o.from !== undefined) {
        await submitFrom(o, argv, command);
        return;
      }
      if (o.cluster === undefined) {
        throw new CliError(
          "required option '--cluster <name>' not specified (or give --from <file>)",
          EXIT.usage,
        );
      }
      let payload: Record<string, unknown>;
      if (o.payload !== undefined) {
        if (argv.length > 0)
          throw new CliError("give either --payload or a command after --, not both", EXIT.usage);
        payload = await jsonObjectOption("--payload", o.payload as string);
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
          labelSelector: parseLabels(o.labels as string[] | undefined, "--label"),
          priority: (o.priority as number | undefined) ?? 0,
          runId: (o.runId as string | undefined) ?? "",
          requestId: (o.requestId as string | undefined) ?? "",
          ...(o.maxAttempts !== undefined ? { retryPolicy: { maxAttempts: o.maxAttempts as number } } : {}),
        });
        const { action: a, created } = response;
        if (json) printJson(messageJson(SubmitActionResponseSchema, response));
        else
          printLine(
            `${created ? "submitted" : "already submitted"} ${a?.id} (${enumName(ActionState, a?.state ?? 0)})`,
          );
        return undefined;
      });
    });

  action
    .command("get")
    .description("Show one action and its attempts.")
    .argument("<action-id>")
    .action(async (id: string, _o: unknown, command: Command) =>
      withServer(
        command,
        (connect) => ({ api: connect(ActionService), events: connect(EventService) }),
        async ({ api, events }, { json }) => {
          const response = await api.getAction({ actionId: id });
          const { action: a, attempts } = response;
          if (json) {
            printJson(messageJson(GetActionResponseSchema, response));
            return undefined;
          }
          if (a) {
            // A finished action has no lease: its worker is the last attempt's. A queued one (a
            // retry waiting) has none yet: the last attempt's worker would read as its holder.
            const row = actionRow(a);
            const finished = a.state !== ActionState.QUEUED && a.state !== ActionState.LEASED;
            if (!a.lease && finished && attempts.length > 0) row[3] = attempts.at(-1)?.workerId || "-";
            printTable(ACTION_HEADERS, [row]);
          }
          if (a?.createdBy) printLine(`created by: ${a.createdBy}`);
          // The labels a worker must carry to be granted it: `action explain` tells which workers lack them.
          const required = Object.entries(a?.labelSelector ?? {}).sort(([x], [y]) => (x < y ? -1 : 1));
          if (required.length > 0)
            printLine(`requires labels: ${required.map(([k, v]) => `${k}=${v}`).join(", ")}`);
          if (a?.failureReason) printLine(`reason: ${a.failureReason}`);
          if (a?.state === ActionState.CANCELLED) {
            const by = await cancelledBy(events, a.id);
            if (by) printLine(`cancelled by: ${by}`);
          }
          if (a?.phase) printLine(`phase: ${phaseText(a)}`);
          if (a?.output) printLine(`output: ${compact(a.output, 2000)}`);
          if (a?.lastError) {
            printLine(`last error: ${a.lastError.message}${a.lastError.retryable ? " (retryable)" : ""}`);
            // What a failed command wrote (the reference agent's details): most often the reason.
            // On one line like every value, its newlines shown as \n; --json gives it whole.
            for (const [key, name] of [
              ["stderrTail", "stderr"],
              ["stdoutTail", "stdout"],
            ] as const) {
              const tail = a.lastError.details?.[key];
              if (typeof tail !== "string" || tail.trim() === "") continue;
              const end = tail.replace(/\n$/, "");
              printLine(`${name}: ${end.length > TAIL_CHARS ? `…${end.slice(-TAIL_CHARS)}` : end}`);
            }
          }
          if (attempts.length > 0) {
            printLine();
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
          if (response.omitted.length > 0) {
            printLine();
            printLine(`(left out to keep the answer under 3 MiB: ${response.omitted.join(", ")})`);
          }
          return undefined;
        },
      ),
    );

  action
    .command("explain")
    .description(
      "Explain an action's lease history as one timeline: submission, grants (worker, epoch), heartbeats, " +
        "lost streams and grace deadlines, expiries and why, revokes, fenced reports, the accepted completion; " +
        "for a queued action, last, why no worker has it now.",
    )
    .argument("<action-id>")
    .action(async (id: string, _o: unknown, command: Command) =>
      run(command, async (api, json) => {
        const response = await api.explainAction({ actionId: id });
        if (json) {
          printJson(messageJson(ExplainActionResponseSchema, response));
          return undefined;
        }
        const { action: a, timeline, attempts } = response;
        if (a) {
          const state = enumName(ActionState, a.state).toLowerCase();
          const tries = `${attempts.length} attempt${attempts.length === 1 ? "" : "s"}`;
          printLine(`action ${a.id} in cluster ${a.cluster}: ${state}, epoch ${a.epoch}, ${tries}`);
          printLine();
        }
        printTable(
          ["TIME", "EPOCH", "WHAT HAPPENED"],
          timeline.map((step) => [time(step.time), step.epoch ? String(step.epoch) : "-", step.summary]),
        );
        if (response.truncated) {
          printLine();
          printLine(
            `(made of the action's first ${timeline.filter((s) => s.event).length} events; \`leasehold events --action ${id}\` lists them all)`,
          );
        }
        return undefined;
      }),
    );

  action
    .command("list")
    .description("List actions, oldest first.")
    .addOption(enumFilterOption("--state <state>", "only in this state", ActionState))
    .option("--cluster <name>", "only of this cluster")
    .option("--run-id <id>", "only of this run")
    .addOption(limitOption())
    .action(async (o: Record<string, unknown>, command: Command) =>
      run(command, async (api, json) => {
        const state = (o.state as ActionState | undefined) ?? ActionState.UNSPECIFIED;
        const actions = await listUpTo(
          o.limit as number | undefined,
          (page) =>
            api.listActions({
              state,
              cluster: (o.cluster as string | undefined) ?? "",
              runId: (o.runId as string | undefined) ?? "",
              ...page,
            }),
          (r) => r.actions,
          { order: "oldest", noun: "action" },
        );
        if (json) printJson({ actions: actions.map((a) => messageJson(ActionSchema, a)) });
        else printTable(ACTION_HEADERS, actions.map(actionRow));
        return undefined;
      }),
    );

  action
    .command("cancel")
    .description(
      "Cancel an action (a leased one is revoked from its worker); or, without an id, every queued and " +
        "leased action of --cluster that matches --run-id (or --all), a thousand per call until none is left.",
    )
    .argument("[action-id]")
    .option("--reason <text>", "why, recorded on the action")
    .option("--cluster <name>", "without an id: the cluster whose actions to cancel")
    .option("--run-id <id>", "without an id: only the actions of this run")
    .addOption(
      new Option("--state <state>", "without an id: only queued or only leased actions").choices([
        "queued",
        "leased",
      ]),
    )
    .option("--all", "without an id or --run-id: every action of the cluster")
    .action(async (id: string | undefined, o: Record<string, unknown>, command: Command) =>
      run(command, async (api, json) => {
        if (id === undefined) return cancelMatching(api, json, o);
        for (const flag of ["cluster", "runId", "state", "all"] as const) {
          if (o[flag] !== undefined)
            throw new CliError(
              `--${flag === "runId" ? "run-id" : flag} selects actions to cancel: give it or an action id, not both`,
              EXIT.usage,
            );
        }
        const { action: a } = await api.cancelAction({
          actionId: id,
          reason: (o.reason as string | undefined) ?? "",
        });
        if (json) printJson({ action: a && messageJson(ActionSchema, a) });
        else
          printLine(
            `${a?.id} ${a?.cancelRequested && a.state === ActionState.LEASED ? "cancel requested (revoking from its worker)" : enumName(ActionState, a?.state ?? 0)}`,
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
        // Rides through server restarts: the watch starts again with the current state, which is
        // printed only if it changed while the server was away.
        await followThroughRestarts(async (connected) => {
          for await (const m of api.watchAction({ actionId: id })) {
            const a = m.action;
            if (!a) continue;
            connected();
            const same = last !== undefined && equals(ActionSchema, last, a);
            last = a;
            if (same) continue;
            if (json) printJson(messageJson(ActionSchema, a));
            else {
              const where = a.lease ? ` on ${a.lease.workerId} (epoch ${a.lease.epoch})` : "";
              const cancel = a.cancelRequested && a.state === ActionState.LEASED ? ", cancel requested" : "";
              const why = a.failureReason && a.state !== ActionState.LEASED ? `: ${a.failureReason}` : "";
              printLine(
                `${time(a.updateTime)} ${enumName(ActionState, a.state)}${where}${cancel}${a.phase ? ` [${phaseText(a)}]` : ""}${why}`,
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

/**
 * Who asked for a cancelled action's cancel, from its events: the
 * cancel_requested event's actor (a leased action ends CANCELLED when its
 * worker lets go, and that event's actor is the worker's principal), else the
 * action_cancelled event's (a queued action is cancelled by the call itself).
 * Undefined for the server's own cancels (empty actor), or when the caller
 * may not read the action's events: the line is an extra, not worth failing
 * `action get` for.
 */
async function cancelledBy(
  events: ReturnType<typeof createClient<(typeof EventService)["method"]>>,
  actionId: string,
): Promise<string | undefined> {
  try {
    for (const kind of [EventKind.ACTION_CANCEL_REQUESTED, EventKind.ACTION_CANCELLED]) {
      const { events: [latest] = [] } = await events.listEvents({
        actionId,
        kind,
        newestFirst: true,
        pageSize: 1,
      });
      if (latest) return latest.actor || undefined;
    }
  } catch {
    // Refused (no right to read events) or gone: `action get` shows the rest.
  }
  return undefined;
}
