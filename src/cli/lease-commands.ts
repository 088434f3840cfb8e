import { readFileSync, writeFileSync } from "node:fs";
import { basename } from "node:path";
import type { MessageShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Command } from "commander";
import {
  CloseReason,
  DebugLeaseResponseSchema,
  type Lease,
  LeaseSchema,
  LeaseService,
  LeaseState,
  SkippedOutputSchema,
  WaitLeaseResponseSchema,
} from "../gen/leasehold/v1/lease_pb.js";
import {
  Ownership,
  type Resource,
  ResourceSchema,
  ResourceService,
} from "../gen/leasehold/v1/resource_pb.js";
import type { createClient } from "../rpc/client.js";
import { errorInfoOf } from "../rpc/status.js";
import { jsonObjectOption } from "./json-option.js";
import {
  deploymentSpec,
  describeDeployment,
  type LiveTestEvent,
  runLiveTest,
  waitForLease,
} from "./lease-run.js";
import { loadDeploymentSpec, loadManifest, ManifestError } from "./manifest.js";
import {
  CliError,
  count,
  durationMsFlag,
  durationText,
  EXIT,
  enumFilterOption,
  enumName,
  globals,
  limitOption,
  listUpTo,
  messageJson,
  printError,
  printJson,
  printLine,
  printTable,
  time,
  unreachableWhy,
  uploadRefused,
  withServer,
} from "./output.js";
import { exitOnSignal, interruptCounter, SAME_SIGNAL_MS } from "./signals.js";

type Clients = {
  leases: ReturnType<typeof createClient<(typeof LeaseService)["method"]>>;
  resources: ReturnType<typeof createClient<(typeof ResourceService)["method"]>>;
};

/** Runs `fn` with lease and resource clients; a number it returns is the exit code. */
const withClients = (command: Command, fn: (c: Clients, json: boolean) => Promise<unknown>) =>
  withServer(
    command,
    (connect) => ({
      leases: connect(LeaseService),
      resources: connect(ResourceService),
    }),
    (c, g) => fn(c, g.json),
  );

/** The server's longest WaitLease and CollectOutputs timeouts (LeaseService in lease.proto). */
const WAIT_TIMEOUT_MAX_MS = 24 * 3_600_000;
const COLLECT_TIMEOUT_MAX_MS = 3_600_000;

const LEASE_HEADERS = ["LEASE", "STATE", "RUNTIME", "LABEL", "OWNED", "EXPIRES"];
const leaseRow = (l: Lease) => [
  l.id,
  enumName(LeaseState, l.state),
  l.runtime,
  l.label || "-",
  String(l.ownedResources),
  time(l.expireTime),
];
/**
 * One lease: with --json its proto3 JSON; for people its row with when it
 * closed and why, then its result if one is recorded.
 */
const printLease = (l: Lease | undefined, json: boolean) => {
  if (!l) return;
  if (json) return printJson(messageJson(LeaseSchema, l));
  printTable(
    [...LEASE_HEADERS, "CLOSED", "REASON"],
    [
      [
        ...leaseRow(l),
        time(l.closeTime),
        l.closeReason ? enumName(CloseReason, l.closeReason).toLowerCase() : "-",
      ],
    ],
  );
  if (l.result) printLine(`result: ${JSON.stringify(l.result)}`);
};
const resourceRow = (r: Resource) => [
  r.id,
  r.kind,
  enumName(Ownership, r.ownership),
  r.leaseId || "-",
  r.body.case === "file" ? `${r.body.value.name} (${r.body.value.sizeBytes} B)` : "-",
];
const RESOURCE_HEADERS = ["RESOURCE", "KIND", "OWNER", "LEASE", "FILE"];
/**
 * One resource: with --json its proto3 JSON; for people its row, then what it
 * holds that the row cannot: a deployment's phase and each container's state
 * (as `lease debug` shows them), an object's body.
 */
const printResource = (r: Resource | undefined, json: boolean) => {
  if (!r) return;
  if (json) return printJson(messageJson(ResourceSchema, r));
  printTable(RESOURCE_HEADERS, [resourceRow(r)]);
  if (r.body.case === "deployment") printLine(describeDeployment(r.body.value));
  if (r.body.case === "object") printLine(`body: ${JSON.stringify(r.body.value)}`);
};

/** The request's ttl from --ttl; kept in whole milliseconds by the server: a finer one is refused here, not rounded. */
const ttlOption = (ttl: string | undefined) =>
  ttl === undefined ? {} : { ttl: durationFromMs(durationMsFlag("--ttl", ttl, { wholeMs: true })) };

/**
 * A lease's state in words: until when it stays open, or when it closed and
 * how (`rolled back at …`, with why when its TTL did it).
 */
function leaseStateText(l: Lease): string {
  if (l.state === LeaseState.OPEN) return `open until ${time(l.expireTime)}`;
  if (l.state === LeaseState.COMMITTED) return `committed at ${time(l.closeTime)}`;
  if (l.state === LeaseState.ROLLED_BACK)
    return `rolled back at ${time(l.closeTime)}${l.closeReason === CloseReason.EXPIRED ? ": its TTL passed" : ""}`;
  return enumName(LeaseState, l.state).toLowerCase();
}

/**
 * A lease a create or renew answered with: its id and its state, as the
 * server returned it (a create retried with its request id returns the
 * lease as it is now, closed or not).
 */
function printAnsweredLease(l: Lease | undefined, json: boolean): void {
  if (!l) return;
  if (json) printLease(l, true);
  else printLine(`${l.id} (${leaseStateText(l)})`);
}

/**
 * The error of a CreateLease or RenewLease refused for its TTL, said with the flag: the
 * server names the request's field (`ttl: …`), and over its maximum says
 * the maximum (ErrorInfo TTL_OVER_MAXIMUM, metadata max_ttl "86400s"); the
 * CLI names --ttl, the maximum as the server's --lease-max-ttl takes it
 * (24h), and how to raise it. Any other error is returned as it is.
 */
export function ttlRefused(error: unknown, ttl: string | undefined): unknown {
  const e = error as { code?: number; details?: string };
  if (e.code !== 3 || ttl === undefined || !e.details?.startsWith("ttl: ")) return error;
  const info = errorInfoOf(error);
  const max =
    info?.reason === "TTL_OVER_MAXIMUM" ? /^(\d+)s$/.exec(info.metadata.max_ttl ?? "")?.[1] : undefined;
  if (max === undefined) return new CliError(`--ttl: ${e.details.slice("ttl: ".length)}`, EXIT.usage);
  return new CliError(
    `--ttl: ${ttl} is longer than the server's maximum, ${durationText(Number(max) * 1000)}; ask for less, ` +
      "or raise the maximum with the server's --lease-max-ttl (leasehold serve --lease-max-ttl <duration>)",
    EXIT.usage,
  );
}

export { durationText } from "./output.js";

/** `leasehold lease …`: scope leases. */
export function leaseCommands(): Command {
  const lease = new Command("lease").description(
    "Scope leases: a transaction boundary around the resources a run creates.",
  );
  lease
    .command("create")
    .description("Open a lease; create resources into it with --lease <id>.")
    .requiredOption("--runtime <cluster>", "the runtime (cluster) its deployments run on")
    .option(
      "--ttl <duration>",
      "roll back automatically after this long: at least 1s, in whole milliseconds (default: the server's, 1h)",
    )
    .option("--label <label>", "free-form label")
    .option(
      "--request-id <id>",
      "idempotency key: the same command again returns the lease it opened; if that lease has closed since, it is printed and the exit code is 1",
    )
    .action(async (o: Record<string, string | undefined>, command: Command) =>
      withClients(command, async (c, json) => {
        const { lease: l } = await c.leases
          .createLease({
            runtime: o.runtime ?? "",
            label: o.label ?? "",
            requestId: o.requestId ?? "",
            ...ttlOption(o.ttl),
          })
          .catch((error: unknown) => {
            throw ttlRefused(error, o.ttl);
          });
        printAnsweredLease(l, json);
        // A retry returns the lease its request id opened, which may have closed since: the
        // caller asked for an open lease and has none, so this fails (1) rather than let a
        // script go on creating into a closed lease; the line above still names it.
        if (l && l.state !== LeaseState.OPEN) {
          printError(
            `--request-id ${o.requestId}: the lease this request id opened, ${l.id}, is already closed ` +
              `(${leaseStateText(l)}); a retry returns that lease as it is. ` +
              "To open a new lease, use a new request id.",
          );
          return EXIT.failed;
        }
        return EXIT.ok;
      }),
    );
  lease
    .command("renew")
    .argument("<lease-id>")
    .description(
      "Push an open lease's TTL rollback later: it rolls back this long from now unless closed or renewed again.",
    )
    .option(
      "--ttl <duration>",
      "from now until the rollback: at least 1s, at most the server's maximum (default: the TTL the lease was created with)",
    )
    .action(async (id: string, o: { ttl?: string }, command: Command) =>
      withClients(command, async (c, json) => {
        const { lease: l } = await c.leases
          .renewLease({
            leaseId: id,
            ...ttlOption(o.ttl),
          })
          .catch((error: unknown) => {
            throw ttlRefused(error, o.ttl);
          });
        printAnsweredLease(l, json);
      }),
    );
  lease
    .command("get")
    .argument("<lease-id>")
    .description("Show one lease, who created it and the result recorded on it.")
    .action(async (id: string, _o: unknown, command: Command) =>
      withClients(command, async (c, json) => {
        const { lease: l } = await c.leases.getLease({ leaseId: id });
        printLease(l, json);
        if (!json && l?.createdBy) printLine(`created by: ${l.createdBy}`);
      }),
    );
  lease
    .command("list")
    .description("List leases, oldest first.")
    .addOption(enumFilterOption("--state <state>", "only in this state", LeaseState))
    .option("--label <label>", "only with this label")
    .option("--runtime <cluster>", "only on this runtime")
    .addOption(limitOption())
    .action(
      async (o: { state?: LeaseState; label?: string; runtime?: string; limit?: number }, command: Command) =>
        withClients(command, async (c, json) => {
          const state = o.state ?? LeaseState.UNSPECIFIED;
          const leases = await listUpTo(
            o.limit,
            (page) => c.leases.listLeases({ state, label: o.label ?? "", runtime: o.runtime ?? "", ...page }),
            (r) => r.leases,
            { order: "oldest", noun: "lease" },
          );
          if (json) return printJson({ leases: leases.map((l) => messageJson(LeaseSchema, l)) });
          printTable(LEASE_HEADERS, leases.map(leaseRow));
        }),
    );
  lease
    .command("promote")
    .argument("<lease-id>")
    .requiredOption("--kind <kind>", "the resource's kind (file, deployment, or an object kind)")
    .requiredOption("--id <resource-id>", "the resource to keep")
    .description("Make one resource of the lease workspace-owned now; it survives a rollback.")
    .action(async (id: string, o: Record<string, string>, command: Command) =>
      withClients(command, async (c, json) =>
        printResource(
          (await c.leases.promoteResource({ leaseId: id, kind: o.kind ?? "", resourceId: o.id ?? "" }))
            .resource,
          json,
        ),
      ),
    );
  for (const [name, verb] of [
    ["commit", "Close the lease keeping everything it owns."],
    ["rollback", "Close the lease destroying everything it still owns."],
  ] as const) {
    lease
      .command(name)
      .argument("<lease-id>")
      .description(verb)
      .action(async (id: string, _o: unknown, command: Command) =>
        withClients(command, async (c, json) => {
          if (name === "commit") {
            const r = await c.leases.commitLease({ leaseId: id });
            if (json)
              printJson({
                lease: r.lease && messageJson(LeaseSchema, r.lease),
                keptResources: r.keptResources,
              });
            else printLine(`${id} committed: ${count(r.keptResources, "resource")} kept`);
          } else {
            const r = await c.leases.rollbackLease({ leaseId: id });
            if (json)
              printJson({
                lease: r.lease && messageJson(LeaseSchema, r.lease),
                destroyedResources: r.destroyedResources,
              });
            else printLine(`${id} rolled back: ${count(r.destroyedResources, "resource")} destroyed`);
          }
        }),
      );
  }
  lease
    .command("delete")
    .argument("[lease-id]")
    .option("--label <label>", "instead of one id: every closed lease with this label")
    .option(
      "--runtime <cluster>",
      "instead of one id: every closed lease on this runtime (with --label: both must match)",
    )
    .description(
      "Forget closed leases (housekeeping): an open lease id is refused, and so is a committed one " +
        "whose kept deployments have not ended; with --label/--runtime, those are left and counted.",
    )
    .action(async (id: string | undefined, o: Record<string, string | undefined>, command: Command) =>
      withClients(command, async (c, json) => {
        if (id && (o.label || o.runtime))
          throw new CliError("give either a lease id or --label/--runtime, not both", EXIT.usage);
        if (id) {
          await c.leases.deleteLease({ leaseId: id });
          return json
            ? printJson({ deleted: 1, skippedOpen: 0, skippedRunning: 0 })
            : printLine(`${id} deleted`);
        }
        if (!o.label && !o.runtime)
          throw new CliError("give a lease id, or --label and/or --runtime to delete many", EXIT.usage);
        const { deleted, skippedOpen, skippedRunning } = await c.leases.deleteLeases({
          label: o.label ?? "",
          runtime: o.runtime ?? "",
        });
        if (json) return printJson({ deleted, skippedOpen, skippedRunning });
        // The ones the filter matched but left are said, so that "deleted" is never read as "all gone".
        const one = skippedOpen === 1;
        const open =
          skippedOpen === 0
            ? ""
            : `; ${skippedOpen} still open ${one ? "was" : "were"} left (roll ${one ? "it" : "them"} back or commit ${one ? "it" : "them"} first)`;
        const running =
          skippedRunning === 0
            ? ""
            : `; ${count(skippedRunning, "committed lease")} whose kept deployments have not ended ` +
              `${skippedRunning === 1 ? "was" : "were"} left (their outputs still go into the lease; delete again once they end)`;
        printLine(`${count(deleted, "closed lease")} deleted${open}${running}`);
      }),
    );
  lease
    .command("set-result")
    .argument("<lease-id>")
    .requiredOption(
      "--result <json>",
      "a JSON object kept on the lease after it closes, or @file to read it from a file (@- for stdin)",
    )
    .description("Record a structured result on the lease.")
    .action(async (id: string, o: Record<string, string>, command: Command) =>
      withClients(command, async (c, json) =>
        printLease(
          (
            await c.leases.setResult({
              leaseId: id,
              result: (await jsonObjectOption("--result", o.result ?? "")) as never,
            })
          ).lease,
          json,
        ),
      ),
    );
  lease
    .command("debug")
    .argument("<lease-id>")
    .description(
      "One snapshot of the lease: its resources, its deployments' phases and containers, and recent events.",
    )
    .action(async (id: string, _o: unknown, command: Command) =>
      withClients(command, async (c, json) => {
        const debug = await c.leases.debugLease({ leaseId: id });
        if (json) return printJson(messageJson(DebugLeaseResponseSchema, debug));
        printLease(debug.lease, false);
        printLine();
        printTable(RESOURCE_HEADERS, debug.resources.map(resourceRow));
        if (debug.omittedResources > 0)
          printLine(`… and ${debug.omittedResources} more (leasehold resource list --lease ${id})`);
        printLine();
        if (debug.deployments.length > 0) {
          for (const d of debug.deployments) printLine(describeDeployment(d));
          printLine();
        }
        for (const e of debug.events) printLine(`${time(e.time)} ${e.message}`);
        const left = [
          debug.omittedEvents > 0 ? `${debug.omittedEvents} older events` : "",
          debug.omittedDeployments > 0 ? `${debug.omittedDeployments} deployments` : "",
          debug.omittedResourceBodies > 0 ? `${debug.omittedResourceBodies} resource bodies` : "",
        ].filter(Boolean);
        if (left.length > 0) printLine(`(left out to keep the answer under 3 MiB: ${left.join(", ")})`);
      }),
    );
  lease
    .command("wait")
    .argument("<lease-id>")
    .option(
      "--timeout <duration>",
      "give up after this long, at most 24h; 0 asks once and answers at once",
      "5m",
    )
    .description(
      "Follow the lease's deployments until they are ready, one line per change. " +
        "Exit 0 when ready, 1 when failed or timed out.",
    )
    .action(async (id: string, o: Record<string, string>, command: Command) =>
      withClients(command, async (c, json) => {
        const timeoutMs = durationMsFlag("--timeout", o.timeout ?? "5m", {
          maxMs: WAIT_TIMEOUT_MAX_MS,
          why: "the longest wait the server takes",
        });
        // Said once per outage, not on every try.
        let away = false;
        const waited = await waitForLease(
          c.leases,
          id,
          timeoutMs,
          (m) => {
            away = false;
            if (json) printJson(messageJson(WaitLeaseResponseSchema, m));
            else printLine(`${new Date().toISOString()} ${describeDeployment(m.deployment)}`);
          },
          {
            onReconnect: (error) => {
              if (!away)
                printError(`server unavailable (${unreachableWhy(error)}); reconnecting until it is back`);
              away = true;
            },
          },
        );
        if (!json && !waited.ready) printLine(`not ready: ${waited.reason}`);
        return waited.ready ? EXIT.ok : EXIT.failed;
      }),
    );
  lease
    .command("collect-outputs")
    .argument("<lease-id>")
    .option(
      "--timeout <duration>",
      "how long the deployment may take to save its files, more than 0 and at most 1h",
      "60s",
    )
    .description(
      "Stop the lease's deployment, saving the files of its outputs_dir as file resources in the lease; " +
        "print their ids, and what was not saved (too large, a symbolic link, …) and why.",
    )
    .action(async (id: string, o: Record<string, string>, command: Command) =>
      withClients(command, async (c, json) => {
        const timeoutMs = durationMsFlag("--timeout", o.timeout ?? "60s", {
          maxMs: COLLECT_TIMEOUT_MAX_MS,
          why: "the longest the server waits for outputs",
        });
        // The server reads 0 as "unset", its default of 60s: said, rather than waited silently.
        if (timeoutMs === 0)
          throw new CliError(
            "--timeout: must be more than 0 (0 would mean the server's default, 60s); give how long to wait, e.g. 60s",
            EXIT.usage,
          );
        const { fileIds, skipped } = await c.leases.collectOutputs(
          { leaseId: id, timeout: durationFromMs(timeoutMs) },
          // The server waits up to the timeout; the deadline only guards against a silent one.
          { deadline: new Date(Date.now() + timeoutMs + 30_000) },
        );
        // Proto3 JSON would drop an empty list; a script should always find the keys.
        if (json)
          return printJson({ fileIds, skipped: skipped.map((s) => messageJson(SkippedOutputSchema, s)) });
        const files = await Promise.all(
          fileIds.map(async (fileId) => (await c.resources.getResource({ resourceId: fileId })).resource),
        );
        // A table of headers alone reads as output gone missing.
        if (files.length === 0) printLine("no output files were saved");
        else
          printTable(
            ["FILE", "NAME", "SIZE"],
            files.map((r, i) => [
              r?.id ?? fileIds[i] ?? "",
              r?.body.case === "file" ? r.body.value.name : "-",
              r?.body.case === "file" ? `${r.body.value.sizeBytes} B` : "-",
            ]),
          );
        if (skipped.length === 0) return;
        printLine();
        printTable(
          ["NOT SAVED", "SIZE", "WHY"],
          skipped.map((s) => [s.path, `${s.sizeBytes} B`, s.reason]),
        );
      }),
    );
  lease
    .command("run")
    .requiredOption("--test <manifest>", "the live-test manifest (YAML; see the README)")
    .option("--keep-lease", "leave the lease open at the end for debugging (its TTL still applies)")
    .description(
      "Run a live test: lease, fixtures, deployment, wait until ready, checks, result, outputs, rollback. " +
        "Every step is one NDJSON event on stdout. Exit 0 when it passed, 1 when it failed, 2 for a bad " +
        "manifest, 3 when the server is unreachable, 130/143 when interrupted (the lease is rolled back; a " +
        "second interrupt, a second or more later, exits at once and names the lease left to its TTL).",
    )
    .action(async (o: { test: string; keepLease?: boolean }, command: Command) =>
      withClients(command, async (c) => {
        // What a second interrupt, which exits at once, must say: the lease it may leave open.
        let open: { id: string; expireTime: string } | undefined;
        let done = false;
        const emit = (event: LiveTestEvent) => {
          if (event.event === "lease_created")
            open = { id: String(event.lease_id), expireTime: String(event.expire_time) };
          if (event.event === "lease_rolled_back") open = undefined;
          if (event.event === "done") done = true;
          printJson(event);
        };
        let manifest: ReturnType<typeof loadManifest>;
        try {
          manifest = loadManifest(o.test);
        } catch (error) {
          if (!(error instanceof ManifestError)) throw error;
          const at = new Date().toISOString();
          emit({ event: "manifest_invalid", time: at, file: error.file, problems: [...error.problems] });
          emit({ event: "done", time: at, passed: false, exit_code: EXIT.usage });
          throw new CliError(error.message, EXIT.usage);
        }
        // An interrupt rolls the lease back before exiting; a second one gives up at once
        // (the lease's TTL still rolls it back). One within SAME_SIGNAL_MS of the first is that
        // one delivered twice (npm forwards the terminal's Ctrl-C), not a second.
        const controller = new AbortController();
        const interrupts = interruptCounter();
        const giveUp = (name: NodeJS.Signals) => {
          const exitCode = exitOnSignal(name);
          // The promised last event, and who is left behind: said before exiting, not never.
          if (!done)
            emit({
              event: "done",
              time: new Date().toISOString(),
              passed: false,
              exit_code: exitCode,
              ...(open ? { lease_id: open.id } : {}),
            });
          printError(
            open
              ? `interrupted again: exiting without waiting for the rollback; lease ${open.id} may be left ` +
                  `open until its TTL rolls it back (at ${open.expireTime}); roll it back now with: ` +
                  `leasehold lease rollback ${open.id}`
              : "interrupted again: exiting at once",
          );
          process.exit(exitCode);
        };
        const handlers = (["SIGINT", "SIGTERM"] as const).map((name) => {
          const handler = () => {
            const count = interrupts();
            if (count === undefined) return;
            if (count > 1) giveUp(name);
            controller.abort(name);
            printError(
              `${name}: rolling the lease back before exiting; a second one (at least ` +
                `${SAME_SIGNAL_MS / 1000}s later) exits at once, leaving the lease to its TTL`,
            );
          };
          process.on(name, handler);
          return () => process.off(name, handler);
        });
        try {
          const outcome = await runLiveTest(c, {
            manifest,
            keepLease: Boolean(o.keepLease),
            emit,
            signal: controller.signal,
            server: globals(command).server,
          });
          if (outcome.error) printError(outcome.error);
          return outcome.exitCode;
        } finally {
          for (const off of handlers) off();
        }
      }),
    );
  return lease;
}

/** `leasehold file …`, `leasehold resource …` and `leasehold deployment …`. */
export function resourceCommands(): Command[] {
  const file = new Command("file").description("Files stored by the server.");
  file
    .command("create")
    .argument("<path>", "local file to upload")
    .option("--lease <id>", "create it inside this open lease")
    .option("--name <name>", "name to store (default: the file's base name)")
    .option("--content-type <type>", "media type")
    .option(
      "--request-id <id>",
      "idempotency key: the same command again (after a lost answer) returns the file it created, not a second one",
    )
    .description("Upload a file as a resource.")
    .action(async (path: string, o: Record<string, string | undefined>, command: Command) =>
      withClients(command, async (c, json) => {
        let content: Buffer;
        try {
          content = readFileSync(path);
        } catch (error) {
          throw new CliError(`cannot read ${path}: ${(error as Error).message}`, EXIT.usage);
        }
        const { resource } = await c.resources
          .createFile({
            leaseId: o.lease ?? "",
            name: o.name ?? basename(path),
            content,
            contentType: o.contentType ?? "",
            requestId: o.requestId ?? "",
          })
          .catch((error: unknown) => {
            throw uploadRefused(error, path, content.byteLength);
          });
        printResource(resource, json);
      }),
    );
  file
    .command("download")
    .argument("<resource-id>")
    .option("-o, --output <path>", "write here instead of stdout")
    .description("Download a file's content.")
    .action(async (id: string, o: Record<string, string | undefined>, command: Command) =>
      withClients(command, async (c) => {
        const chunks: Uint8Array[] = [];
        for await (const m of c.resources.downloadFile({ resourceId: id })) chunks.push(m.chunk);
        if (o.output) writeFileSync(o.output, Buffer.concat(chunks));
        else process.stdout.write(Buffer.concat(chunks));
      }),
    );

  const resource = new Command("resource").description("Resources of any kind.");
  resource
    .command("create")
    .requiredOption("--kind <kind>", "object kind (not file or deployment)")
    .option("--lease <id>", "create it inside this open lease")
    .option("--body <json>", "the object's JSON body, or @file to read it from a file (@- for stdin)", "{}")
    .option(
      "--request-id <id>",
      "idempotency key: the same command again (after a lost answer) returns the object it created, not a second one",
    )
    .description("Create a generic object resource.")
    .action(async (o: Record<string, string>, command: Command) =>
      withClients(command, async (c, json) =>
        printResource(
          (
            await c.resources.createObject({
              kind: o.kind ?? "",
              leaseId: o.lease ?? "",
              body: (await jsonObjectOption("--body", o.body ?? "{}")) as never,
              requestId: o.requestId ?? "",
            })
          ).resource,
          json,
        ),
      ),
    );
  resource
    .command("get")
    .argument("<resource-id>")
    .description("Show one resource: a deployment's phase and containers, an object's body.")
    .action(async (id: string, _o: unknown, command: Command) =>
      withClients(command, async (c, json) =>
        printResource((await c.resources.getResource({ resourceId: id })).resource, json),
      ),
    );
  resource
    .command("list")
    .option("--lease <id>", "only created in this lease")
    .option("--kind <kind>", "only of this kind")
    .addOption(limitOption())
    .description("List resources, oldest first.")
    .action(async (o: { lease?: string; kind?: string; limit?: number }, command: Command) =>
      withClients(command, async (c, json) => {
        const resources = await listUpTo(
          o.limit,
          (page) => c.resources.listResources({ leaseId: o.lease ?? "", kind: o.kind ?? "", ...page }),
          (r) => r.resources,
          { order: "oldest", noun: "resource" },
        );
        if (json)
          printJson({
            resources: resources.map((r: MessageShape<typeof ResourceSchema>) =>
              messageJson(ResourceSchema, r),
            ),
          });
        else printTable(RESOURCE_HEADERS, resources.map(resourceRow));
      }),
    );
  resource
    .command("delete")
    .argument("<resource-id>")
    .description("Delete a workspace-owned resource (lease-owned ones go with their lease).")
    .action(async (id: string, _o: unknown, command: Command) =>
      withClients(command, async (c, json) => {
        await c.resources.deleteResource({ resourceId: id });
        json ? printJson({ deleted: id }) : printLine(`${id} deleted`);
      }),
    );
  const deployment = new Command("deployment").description(
    "Deployments: long-running commands run by an agent of the lease's runtime.",
  );
  deployment
    .command("create")
    .requiredOption(
      "--spec <path>",
      "the DeploymentSpec as a .json or .yaml file: its proto3 JSON form (containers[].command.argv, readinessProbe, outputsDir), or a manifest's deployment: (containers[].argv, readiness, outputs_dir; ready_timeout is lease run's only)",
    )
    .option("--lease <id>", "create it inside this open lease (it runs on the lease's runtime)")
    .option("--runtime <cluster>", "where it runs when created without --lease")
    .option(
      "--request-id <id>",
      "idempotency key: the same command again (after a lost answer) returns the deployment it created, not a second one",
    )
    .description(
      "Create a deployment. In a lease, follow it with `lease wait <lease-id>`; one created without a lease " +
        "(--runtime), or promoted out of its lease, has no lease to wait on: follow it with `resource get <id>`.",
    )
    .action(async (o: Record<string, string | undefined>, command: Command) =>
      withClients(command, async (c, json) => {
        // Said with the flags before any call; the server would name its fields (runtime, lease_id).
        if (o.lease === undefined && o.runtime === undefined)
          throw new CliError(
            "give --lease <id> (it runs on the lease's runtime) or --runtime <cluster> (without a lease)",
            EXIT.usage,
          );
        if (o.lease !== undefined && o.runtime !== undefined)
          throw new CliError(
            "give either --lease or --runtime, not both: in a lease it runs on the lease's runtime",
            EXIT.usage,
          );
        let spec: ReturnType<typeof loadDeploymentSpec>;
        try {
          spec = loadDeploymentSpec(o.spec ?? "", (plan) => deploymentSpec(plan, []));
        } catch (error) {
          throw error instanceof ManifestError ? new CliError(error.message, EXIT.usage) : error;
        }
        const { resource: r } = await c.resources.createDeployment({
          leaseId: o.lease ?? "",
          runtime: o.runtime ?? "",
          spec,
          requestId: o.requestId ?? "",
        });
        printResource(r, json);
      }),
    );
  return [file, resource, deployment];
}
