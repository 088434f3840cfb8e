import { spawn } from "node:child_process";
import { connect } from "node:net";
import { resolve } from "node:path";
import type { JsonObject, MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs, durationMs } from "@bufbuild/protobuf/wkt";
import {
  CloseReason,
  type Lease,
  type LeaseService,
  LeaseState,
  type SkippedOutput,
  type WaitLeaseResponse,
} from "../gen/leasehold/v1/lease_pb.js";
import {
  type ContainerState,
  type Deployment,
  DeploymentPhase,
  type DeploymentSpecSchema,
  type ResourceService,
} from "../gen/leasehold/v1/resource_pb.js";
import type { Client } from "../rpc/client.js";
import { errorReasonOf } from "../rpc/status.js";
import type { Check, CommandSpec, DeploymentPlan, Manifest } from "./manifest.js";
import {
  CliError,
  cliErrorFrom,
  EXIT,
  enumName,
  readOnly,
  serverGoneAway,
  time,
  unreachableWhy,
  uploadRefused,
} from "./output.js";
import { exitOnSignal } from "./signals.js";

/*
 * `leasehold lease run --test`: the whole life of a live test in one command,
 * each step one NDJSON event. The lease is the safety net: whatever the run
 * created lives in it, so one rollback (or, after a hard crash, the TTL)
 * removes it all.
 */

/** The clients a live test needs. */
export interface LiveTestClients {
  readonly leases: Client<(typeof LeaseService)["method"]>;
  readonly resources: Client<(typeof ResourceService)["method"]>;
}

/** Every event a live test emits, in the order they can happen. */
export type LiveTestEventName =
  /** The manifest is unusable; `problems` lists every one. Exit 2. */
  | "manifest_invalid"
  /** `lease_id`, `runtime`, `label`, `expire_time`. */
  | "lease_created"
  /** `name`, `file_id`, `mount`, `size_bytes`. */
  | "fixture_uploaded"
  /** `deployment_id`. */
  | "deployment_created"
  /** One WaitLease message: `deployment_id`, `phase`, `containers`, `message`. */
  | "deployment_phase"
  /** `deployment_id`. */
  | "deployment_ready"
  /** `deployment_id`, `phase`, `message`, `timed_out`. */
  | "deployment_failed"
  /** `name`, `kind`, `message`, `duration_ms`. */
  | "check_passed"
  /** `name`, `kind`, `message`, `duration_ms`, and `skipped: true` when the deployment never got ready. */
  | "check_failed"
  /**
   * `files`: [{`file_id`, `name`}]; `skipped`: [{`name`, `size_bytes`, `reason`}], what the
   * deployment's outputs_dir held that its agent did not save (too large, a symbolic link, …).
   */
  | "outputs_collected"
  /** `message`: CollectOutputs failed; the run goes on. */
  | "outputs_collect_failed"
  /**
   * `deployment_id`, `checked_epoch`, `epoch`, `phase`, `message`: the run the checks ran
   * against was lost after it got ready, and the deployment was started again (or waits to be):
   * the checks did not check the run whose outputs were collected. The run fails (exit 1).
   */
  | "deployment_restarted"
  /** `name`, `file_id`: the output survives the rollback. */
  | "output_promoted"
  /** `name`, `message`: an output the manifest names was not saved (and why, if known); the run fails. */
  | "output_missing"
  /**
   * `passed`: the result recorded on the lease with SetResult; after an error (or the TTL passing),
   * the result that says so (`passed: false`, `error`), when it could be recorded.
   */
  | "result_recorded"
  /** `signal`: SIGINT or SIGTERM; the lease is rolled back. */
  | "interrupted"
  /**
   * `step`, `message`: the server went away (a restart, a failover) during a step; its calls are
   * tried again until it is back or the step's time is up. Once per outage and step.
   */
  | "server_unavailable"
  /**
   * `lease_id`, `expire_time`, `step`, `message`: the lease's TTL passed during the run, so the
   * server rolled it back and destroyed its deployment; the run fails (exit 1).
   */
  | "lease_expired"
  /** `message`, `step`: a call failed; the lease is rolled back (or kept with --keep-lease). */
  | "error"
  /**
   * `lease_id`, `destroyed_resources`; with `already: true` and `close_reason` (EXPIRED,
   * ROLLED_BACK) when the lease was rolled back before (its TTL, or an earlier try of this
   * rollback whose answer was lost): nothing is left behind either way.
   */
  | "lease_rolled_back"
  /** `message`: the rollback failed; the lease's TTL will roll it back (unless it was committed). */
  | "rollback_failed"
  /** `lease_id`, `expire_time`: --keep-lease left it open for debugging. */
  | "lease_kept"
  /**
   * Always last: `passed`, `exit_code`, `lease_id` when one was created; also when a second
   * interrupt exits without waiting for the rollback.
   */
  | "done";

/** One NDJSON line of a live test. */
export type LiveTestEvent = { readonly event: LiveTestEventName; readonly time: string } & Readonly<
  Record<string, unknown>
>;

/** Options of {@link runLiveTest}. */
export interface LiveTestOptions {
  readonly manifest: Manifest;
  /** Leave the lease open at the end (its TTL still applies) instead of rolling it back. */
  readonly keepLease: boolean;
  /** Receives every event. */
  readonly emit: (event: LiveTestEvent) => void;
  /** Aborted with the signal's name ("SIGINT", "SIGTERM") to interrupt: the lease is rolled back. */
  readonly signal: AbortSignal;
  /** The server address, for messages. */
  readonly server: string;
  /** Clock for event times. Default `new Date()`. */
  readonly now?: () => Date;
}

/** How a live test ended. */
export interface LiveTestOutcome {
  /** Every check passed, the deployment got ready, and every named output was promoted. */
  readonly passed: boolean;
  /**
   * 0 passed; 1 failed (or the lease's TTL passed); 2 bad manifest or request (a fixture over the
   * server's file limit included); 3 server unreachable; 130/143 interrupted.
   */
  readonly exitCode: number;
  /** Set when a call failed: what to tell the user. */
  readonly error?: string;
}

/** How long the final rollback may take, through server restarts; beyond it the TTL does the job. */
const ROLLBACK_TIMEOUT_MS = 30_000;
/** How long a call after the checks (promote, set-result) keeps trying through a server restart. */
const RESTART_WINDOW_MS = 30_000;
/** Slack added to gRPC deadlines of calls that wait server-side for their own timeout. */
const CALL_SLACK_MS = 30_000;

/** One check's outcome, as recorded in the lease's result. */
export interface CheckOutcome {
  readonly name: string;
  readonly kind: Check["kind"];
  readonly passed: boolean;
  readonly message: string;
  readonly durationMs: number;
  readonly skipped?: boolean;
}

/**
 * Runs a live test: create the lease, upload fixtures, create the deployment,
 * wait until ready, run the checks, collect outputs, promote the named ones,
 * record the result, then roll back (or keep the lease). A thrown error or an
 * interrupt after the lease exists rolls it back before returning.
 */
export async function runLiveTest(
  clients: LiveTestClients,
  options: LiveTestOptions,
): Promise<LiveTestOutcome> {
  const { manifest: m, signal } = options;
  const now = options.now ?? (() => new Date());
  // The step server_unavailable was said for, while nothing happened since: said once per outage
  // and step (a wait given up on, then the result and the rollback tried through the same outage).
  let away: string | undefined;
  const emit = (event: LiveTestEventName, fields: Record<string, unknown> = {}) => {
    away = event === "server_unavailable" ? (fields.step as string) : undefined;
    options.emit({ event, time: now().toISOString(), ...fields });
  };
  const step = { name: "upload_fixtures" };
  const unavailable = (error: Error) => {
    if (away === step.name) return;
    emit("server_unavailable", {
      step: step.name,
      message: `the server at ${options.server} is unavailable (${unreachableWhy(error)}); trying again`,
    });
  };
  const finish = (outcome: LiveTestOutcome, leaseId?: string): LiveTestOutcome => {
    emit("done", {
      passed: outcome.passed,
      exit_code: outcome.exitCode,
      ...(leaseId ? { lease_id: leaseId } : {}),
    });
    return outcome;
  };
  const interrupted = (): LiveTestOutcome => {
    const name = String(signal.reason);
    emit("interrupted", { signal: name });
    const interrupt = name === "SIGINT" || name === "SIGTERM";
    return { passed: false, exitCode: interrupt ? exitOnSignal(name) : EXIT.failed };
  };

  if (signal.aborted) return finish(interrupted());
  let leaseId: string;
  try {
    // Deliberately not cancellable: a lease answered after we gave up would be left to its TTL;
    // one we receive is rolled back below when an interrupt arrived meanwhile.
    const { lease } = await clients.leases.createLease({
      runtime: m.runtime,
      label: m.label,
      ttl: durationFromMs(m.ttlMs),
    });
    if (!lease) throw new Error("the server answered CreateLease without a lease");
    leaseId = lease.id;
    emit("lease_created", {
      lease_id: lease.id,
      runtime: lease.runtime,
      label: lease.label,
      expire_time: time(lease.expireTime),
    });
  } catch (error) {
    const e = cliErrorFrom(error, options.server);
    emit("error", { step: "create_lease", message: e.message });
    return finish({ passed: false, exitCode: e.exitCode, error: e.message });
  }

  let outcome: LiveTestOutcome;
  let rollBack = !options.keepLease;
  try {
    const passed = await runInLease(
      clients,
      leaseId,
      m,
      { signal, server: options.server, unavailable },
      emit,
      step,
    );
    outcome = { passed, exitCode: passed ? EXIT.ok : EXIT.failed };
  } catch (error) {
    if (signal.aborted) {
      // Ctrl-C means "stop and clean up", even with --keep-lease.
      outcome = interrupted();
      rollBack = true;
    } else {
      // A call refused because the lease closed: if its TTL passed, that is what to say.
      const expired =
        error instanceof LeaseExpired
          ? error
          : leaseClosed(error)
            ? await expiredLease(clients, leaseId).then(
                (lease) => lease && new LeaseExpired(lease),
                () => undefined,
              )
            : undefined;
      const e = expired ?? cliErrorFrom(error, options.server);
      if (expired) {
        emit("lease_expired", {
          lease_id: leaseId,
          expire_time: time(expired.lease.expireTime),
          step: step.name,
          message: expired.message,
        });
        // Nothing is left to keep: the rollback below is refused as done already, and says so.
        rollBack = true;
      } else emit("error", { step: step.name, message: e.message });
      outcome = { passed: false, exitCode: e.exitCode, error: e.message };
      // Best effort, so that the lease's record says why it closed; the rollback matters more.
      const result = { passed: false, error: `${step.name}: ${e.message}` };
      // A server away now is waited for by this call: its server_unavailable names it, not the step that failed.
      step.name = "record_result";
      await throughRestarts((deadline) => clients.leases.setResult({ leaseId, result }, { deadline }), {
        withinMs: 10_000,
        onRetry: unavailable,
      }).then(
        () => emit("result_recorded", { passed: false }),
        () => {},
      );
    }
  }

  if (!rollBack) {
    const lease = await clients.leases.getLease({ leaseId }).then(
      (r) => r.lease,
      () => undefined,
    );
    emit("lease_kept", { lease_id: leaseId, expire_time: time(lease?.expireTime) });
    return finish(outcome, leaseId);
  }
  step.name = "rollback";
  try {
    // Not tied to `signal`: an interrupt is exactly when the rollback must still happen. Tried
    // again through a server restart: a lease left open keeps its deployment running for its TTL.
    const r = await throughRestarts((deadline) => clients.leases.rollbackLease({ leaseId }, { deadline }), {
      withinMs: ROLLBACK_TIMEOUT_MS,
      onRetry: unavailable,
    });
    emit("lease_rolled_back", { lease_id: leaseId, destroyed_resources: r.destroyedResources });
  } catch (error) {
    // Refused because it is rolled back already (its TTL passed, or a try whose answer was lost
    // did it): the cleanup is done.
    const lease = leaseClosed(error)
      ? await clients.leases.getLease({ leaseId }).then(
          (r) => r.lease,
          () => undefined,
        )
      : undefined;
    if (lease?.state === LeaseState.ROLLED_BACK) {
      emit("lease_rolled_back", {
        lease_id: leaseId,
        destroyed_resources: 0,
        already: true,
        close_reason: enumName(CloseReason, lease.closeReason),
      });
      return finish(outcome, leaseId);
    }
    const e = cliErrorFrom(error, options.server);
    emit("rollback_failed", {
      lease_id: leaseId,
      message: leaseClosed(error)
        ? e.message
        : `${e.message}; the lease rolls back by itself when its TTL passes`,
    });
    // Something may be left behind until the TTL: never report that as a clean success.
    if (outcome.exitCode === EXIT.ok) outcome = { ...outcome, exitCode: e.exitCode, error: e.message };
  }
  return finish(outcome, leaseId);
}

/** The steps inside the lease; returns whether the test passed. `step.name` tracks where an error came from. */
async function runInLease(
  clients: LiveTestClients,
  leaseId: string,
  m: Manifest,
  {
    signal,
    server,
    unavailable,
  }: { signal: AbortSignal; server: string; unavailable: (error: Error) => void },
  emit: (event: LiveTestEventName, fields?: Record<string, unknown>) => void,
  step: { name: string },
): Promise<boolean> {
  /** A call that keeps trying through a server restart for `withinMs`, each try given the deadline. */
  const retried = <T>(call: (deadline: Date) => Promise<T>, withinMs = RESTART_WINDOW_MS) =>
    throughRestarts(call, { withinMs, signal, onRetry: unavailable });
  // Request ids make the creates safe to try again through a restart: a retry whose first try
  // was done gets what that try made, not a second fixture or a second running deployment.
  const inputs: { fileId: string; path: string }[] = [];
  for (const [index, fixture] of m.fixtures.entries()) {
    signal.throwIfAborted();
    const requestId = `lease-run/${leaseId}/fixture/${index}`;
    const { resource } = await retried((deadline) =>
      clients.resources.createFile(
        { leaseId, name: fixture.name, content: fixture.content, requestId },
        { signal, deadline },
      ),
    ).catch((error: unknown) => {
      // A bad manifest for this server (exit 2, as README says), though the lease exists by now:
      // the server's --max-file-size is its own setting, which no call tells before an upload.
      throw uploadRefused(
        error,
        `fixture ${JSON.stringify(fixture.name)}`,
        fixture.content.byteLength,
        EXIT.usage,
      );
    });
    const fileId = resource?.id ?? "";
    inputs.push({ fileId, path: fixture.mount });
    emit("fixture_uploaded", {
      name: fixture.name,
      file_id: fileId,
      mount: fixture.mount,
      size_bytes: fixture.content.byteLength,
    });
  }

  step.name = "create_deployment";
  signal.throwIfAborted();
  const { resource } = await retried((deadline) =>
    clients.resources.createDeployment(
      { leaseId, spec: deploymentSpec(m.deployment, inputs), requestId: `lease-run/${leaseId}/deployment` },
      { signal, deadline },
    ),
  );
  const deploymentId = resource?.id ?? "";
  emit("deployment_created", { deployment_id: deploymentId });

  step.name = "wait_ready";
  const waited = await waitForLease(
    clients.leases,
    leaseId,
    m.deployment.readyTimeoutMs,
    (message) => {
      const d = message.deployment;
      emit("deployment_phase", {
        deployment_id: d?.id ?? deploymentId,
        phase: phaseName(d?.phase),
        containers: (d?.containers ?? []).map(containerJson),
        message: d?.message ?? "",
      });
    },
    // The run created the lease and the deployment on this server: one away now is restarting.
    { signal, onReconnect: unavailable, reached: true },
  );
  const last = waited.last?.deployment;
  if (waited.ready) emit("deployment_ready", { deployment_id: last?.id ?? deploymentId });
  else
    emit("deployment_failed", {
      deployment_id: last?.id ?? deploymentId,
      phase: phaseName(last?.phase),
      message: waited.reason,
      timed_out: waited.timedOut,
    });

  step.name = "checks";
  const checks: CheckOutcome[] = [];
  for (const check of m.checks) {
    signal.throwIfAborted();
    const outcome: CheckOutcome = waited.ready
      ? await runCheck(check, m.dir, signal)
      : {
          name: check.name,
          kind: check.kind,
          passed: false,
          message: "skipped: the deployment did not become ready",
          durationMs: 0,
          skipped: true,
        };
    signal.throwIfAborted();
    checks.push(outcome);
    emit(outcome.passed ? "check_passed" : "check_failed", {
      name: outcome.name,
      kind: outcome.kind,
      message: outcome.message,
      duration_ms: outcome.durationMs,
      ...(outcome.skipped ? { skipped: true } : {}),
    });
  }

  // Outputs are collected and promoted whatever the verdict: after a failure they are what one looks at.
  step.name = "collect_outputs";
  signal.throwIfAborted();
  // Unless the TTL passed while the checks ran (or the wait): the server then rolled the lease back
  // and destroyed the deployment they ran against, and its outputs with it.
  const expired = await readOnly(retried((deadline) => expiredLease(clients, leaseId, deadline)));
  if (expired) throw new LeaseExpired(expired);
  const files = new Map<string, string>(); // name → file id
  const skipped = new Map<string, SkippedOutput>(); // name → why it was not saved
  let collectFailed: string | undefined; // why the collect failed: then no output is known
  try {
    // Asked again after a server restart with the time left: the request to save is stored, so the
    // server picks up where it was, and files saved meanwhile are in the answer.
    const collectUntil = Date.now() + m.collectTimeoutMs;
    const collected = await retried(
      (deadline) =>
        clients.leases.collectOutputs(
          { leaseId, timeout: durationFromMs(Math.max(1000, collectUntil - Date.now())) },
          { signal, deadline },
        ),
      m.collectTimeoutMs + CALL_SLACK_MS,
    );
    for (const s of collected.skipped) skipped.set(s.path, s);
    for (const id of collected.fileIds) {
      const { resource: r } = await readOnly(
        retried((deadline) => clients.resources.getResource({ resourceId: id }, { signal, deadline })),
      );
      files.set(r?.body.case === "file" ? r.body.value.name : id, id);
    }
    emit("outputs_collected", {
      files: [...files].map(([name, fileId]) => ({ file_id: fileId, name })),
      skipped: [...skipped.values()].map((s) => ({
        name: s.path,
        size_bytes: Number(s.sizeBytes),
        reason: s.reason,
      })),
    });
  } catch (error) {
    // A closed lease (its TTL passed meanwhile) ends the run: there is nothing left to go on with.
    if (signal.aborted || leaseClosed(error)) throw error;
    collectFailed = cliErrorFrom(error, server).message;
    emit("outputs_collect_failed", { message: collectFailed });
  }

  step.name = "promote_outputs";
  const promoted: { name: string; file_id: string }[] = [];
  const missing: string[] = [];
  for (const name of m.promote) {
    signal.throwIfAborted();
    const fileId = files.get(name);
    if (fileId === undefined) {
      missing.push(name);
      const why = skipped.get(name);
      emit("output_missing", {
        name,
        // After a failed collect nothing is known of what the deployment saved: "saved no file"
        // would blame it for what the collect lost.
        message: why
          ? `the deployment did not save ${JSON.stringify(name)} in ${m.deployment.outputsDir}: ${why.reason}`
          : collectFailed !== undefined
            ? `the outputs were not collected, so ${JSON.stringify(name)} is not among them: ${collectFailed}`
            : `the deployment saved no file ${JSON.stringify(name)} in ${m.deployment.outputsDir}`,
      });
      continue;
    }
    // A promote repeated after a lost answer is answered the same.
    await retried((deadline) =>
      clients.leases.promoteResource({ leaseId, kind: "file", resourceId: fileId }, { signal, deadline }),
    );
    promoted.push({ name, file_id: fileId });
    emit("output_promoted", { name, file_id: fileId });
  }

  // The deployment as it is now, not as it was when it became ready: one whose container exited
  // with an error since (right after starting, or while the checks ran) failed, and so did the test.
  // So did one whose run was lost since (its agent died or gave it back) and that was started
  // again, or waits to be: the checks ran against a run that is gone, and the outputs (if any)
  // came from another one.
  step.name = "deployment_phase";
  let crashed: Deployment | undefined;
  let restarted: string | undefined;
  if (waited.ready) {
    const { resource: r } = await readOnly(
      retried((deadline) =>
        clients.resources.getResource({ resourceId: last?.id ?? deploymentId }, { signal, deadline }),
      ),
    );
    const now = r?.body.case === "deployment" ? r.body.value : undefined;
    const checkedEpoch = last?.epoch ?? 0n;
    if (now && (now.epoch !== checkedEpoch || now.phase === DeploymentPhase.PENDING)) {
      restarted =
        `the run the checks ran against (${last?.message || `epoch ${checkedEpoch}`}) was lost after it got ready, ` +
        (now.epoch !== checkedEpoch
          ? `and the deployment was started again (epoch ${now.epoch}, ${phaseName(now.phase)}${now.message ? `: ${now.message}` : ""})`
          : `and the deployment waits to be started again (${now.message})`) +
        "; the checks did not check the run whose outputs were collected";
      emit("deployment_restarted", {
        deployment_id: now.id,
        checked_epoch: Number(checkedEpoch),
        epoch: Number(now.epoch),
        phase: phaseName(now.phase),
        message: restarted,
      });
    } else if (now?.phase === DeploymentPhase.FAILED) {
      crashed = now;
      emit("deployment_failed", {
        deployment_id: crashed.id,
        phase: phaseName(crashed.phase),
        message: crashed.message,
        timed_out: false,
      });
    }
  }

  // Recorded last, so that the result also reflects missing outputs and names the promoted files.
  step.name = "record_result";
  const passed =
    waited.ready && !crashed && !restarted && checks.every((c) => c.passed) && missing.length === 0;
  const result: JsonObject = {
    passed,
    checks: checks.map((c) => ({
      name: c.name,
      passed: c.passed,
      message: c.message,
      duration_ms: c.durationMs,
    })),
    deployment: {
      id: last?.id ?? deploymentId,
      ready: waited.ready,
      phase: phaseName((crashed ?? last)?.phase),
      message:
        restarted ?? (crashed ? crashed.message : waited.ready ? (last?.message ?? "") : waited.reason),
      ...(restarted ? { restarted: true } : {}),
    },
    outputs: promoted,
    ...(missing.length > 0 ? { missing_outputs: missing } : {}),
  };
  signal.throwIfAborted();
  await retried((deadline) => clients.leases.setResult({ leaseId, result }, { signal, deadline }));
  emit("result_recorded", { passed });
  return passed;
}

/** Whether a call was refused because the lease is closed (FAILED_PRECONDITION, LEASE_CLOSED). */
function leaseClosed(error: unknown): boolean {
  return (error as { code?: number }).code === 9 && errorReasonOf(error) === "LEASE_CLOSED";
}

/** The lease, if its TTL passed and the server rolled it back; undefined otherwise. */
async function expiredLease(
  clients: LiveTestClients,
  leaseId: string,
  deadline?: Date,
): Promise<Lease | undefined> {
  const { lease } = await clients.leases.getLease({ leaseId }, deadline ? { deadline } : {});
  return lease?.state === LeaseState.ROLLED_BACK && lease.closeReason === CloseReason.EXPIRED
    ? lease
    : undefined;
}

/** The run cannot go on: the lease's TTL passed (exit 1). */
class LeaseExpired extends CliError {
  constructor(readonly lease: Lease) {
    super(
      `the lease's TTL (${lease.ttl ? durationMs(lease.ttl) / 1000 : "?"}s) passed during the run, at ` +
        `${time(lease.expireTime)}: the server rolled the lease back and destroyed its deployment, so ` +
        "checks run after that tested nothing; give the manifest a longer ttl",
      EXIT.failed,
    );
  }
}

/** The DeploymentSpec for a manifest's deployment, with the uploaded fixtures as inputs. */
export function deploymentSpec(
  plan: DeploymentPlan,
  inputs: readonly { fileId: string; path: string }[],
): MessageInitShape<typeof DeploymentSpecSchema> {
  const r = plan.readiness;
  return {
    containers: plan.containers.map((c) => ({
      name: c.name,
      command: { argv: [...c.argv], env: { ...c.env }, cwd: c.cwd },
    })),
    ...(r
      ? {
          readinessProbe: {
            check:
              r.kind === "http"
                ? { case: "httpGet", value: r.url }
                : r.kind === "tcp"
                  ? { case: "tcpPort", value: r.port }
                  : {
                      case: "exec",
                      value: { argv: [...r.command.argv], env: { ...r.command.env }, cwd: r.command.cwd },
                    },
            ...(r.periodMs === undefined ? {} : { period: durationFromMs(r.periodMs) }),
            ...(r.timeoutMs === undefined ? {} : { timeout: durationFromMs(r.timeoutMs) }),
          },
        }
      : {}),
    outputsDir: plan.outputsDir,
    inputs: inputs.map((i) => ({ fileId: i.fileId, path: i.path })),
  };
}

/** How a WaitLease ended. */
export interface WaitOutcome {
  /** Every deployment of the lease is READY. */
  readonly ready: boolean;
  /** The timeout passed first. */
  readonly timedOut: boolean;
  /** The last message received. */
  readonly last: WaitLeaseResponse | undefined;
  /** Why it is not ready, for people ("" when ready). */
  readonly reason: string;
}

/**
 * Follows LeaseService.WaitLease until its last message (done), calling
 * `onChange` for every message. A server restart is ridden through (see
 * {@link throughRestarts}): the wait is asked again with the time left, which
 * is always safe (a wait changes nothing). Once the stream has answered, or
 * from the start with `reached` (the caller has talked to this server
 * already, as `lease run` has when it waits): a server unreachable from the
 * start is more likely a wrong address than a restart, and is thrown at once.
 * Any other error is thrown, marked as a read-only call's ({@link readOnly}).
 */
export async function waitForLease(
  leases: LiveTestClients["leases"],
  leaseId: string,
  timeoutMs: number,
  onChange: (message: WaitLeaseResponse) => void,
  options: {
    signal?: AbortSignal;
    onReconnect?: (error: Error) => void;
    now?: () => number;
    /** The caller has talked to this server already: a wait that breaks before its first message is tried again too. */
    reached?: boolean;
  } = {},
): Promise<WaitOutcome> {
  const now = options.now ?? Date.now;
  const until = now() + timeoutMs;
  let last: WaitLeaseResponse | undefined;
  let answered = options.reached ?? false;
  let asked = false;
  return readOnly(
    throughRestarts(
      async () => {
        // The first try always asks, however little time is left (a timeout of 0 asks once, as
        // `kubectl wait --timeout=0` does): the server answers with the deployments as they are
        // (ready, failed, or not yet), waiting at least a millisecond.
        const left = Math.max(1, until - now());
        if (asked && until - now() <= 0)
          return { ready: false, timedOut: true, last, reason: timeoutReason(timeoutMs) };
        asked = true;
        for await (const message of leases.waitLease(
          { leaseId, timeout: durationFromMs(left) },
          {
            ...(options.signal ? { signal: options.signal } : {}),
            deadline: new Date(now() + left + CALL_SLACK_MS),
          },
        )) {
          answered = true;
          last = message;
          onChange(message);
          if (message.done) return verdict(message, timeoutMs);
        }
        return {
          ready: false,
          timedOut: false,
          last,
          reason: "the server ended the wait without a verdict",
        };
      },
      {
        // A try after the timeout answers "timed out" without calling: a server away then is no error.
        withinMs: timeoutMs + CALL_SLACK_MS,
        retryIf: () => answered,
        ...(options.signal ? { signal: options.signal } : {}),
        ...(options.onReconnect ? { onRetry: options.onReconnect } : {}),
        now,
      },
    ),
  );
}

/** The first wait before a call is tried again through a server restart; it doubles from there. */
const RETRY_FIRST_DELAY_MS = 250;
/** The longest wait between tries through a server restart. */
const RETRY_MAX_DELAY_MS = 2000;

/** Options of {@link throughRestarts}. */
export interface RestartOptions {
  /** How long, from the first try, a server that went away is tried again. */
  readonly withinMs: number;
  /** Ends the waiting: the abort's reason is thrown. */
  readonly signal?: AbortSignal;
  /** Whether a server going away may be ridden through now (default: always). */
  readonly retryIf?: (error: unknown) => boolean;
  /** Called before each wait for the server to come back. */
  readonly onRetry?: (error: Error) => void;
  /** Clock in milliseconds. Default `Date.now`. */
  readonly now?: () => number;
}

/**
 * Calls `call` until it settles with anything but the server going away (see
 * {@link serverGoneAway}: a restart, a failover), trying again after 250 ms,
 * doubling to at most 2 s, as long as `withinMs` since the first try has not
 * passed. Each try gets that end as its deadline. The last error is thrown
 * when time is up, and any other error at once.
 */
export async function throughRestarts<T>(
  call: (deadline: Date) => Promise<T>,
  options: RestartOptions,
): Promise<T> {
  const now = options.now ?? Date.now;
  const until = now() + options.withinMs;
  for (let retries = 0; ; retries++) {
    try {
      return await call(new Date(until));
    } catch (error) {
      const left = until - now();
      const retry = serverGoneAway(error) && (options.retryIf?.(error) ?? true);
      if (!retry || left <= 0 || options.signal?.aborted) throw error;
      options.onRetry?.(error as Error);
      const backoff = Math.min(RETRY_MAX_DELAY_MS, RETRY_FIRST_DELAY_MS * 2 ** Math.min(retries, 10));
      await sleep(Math.min(left, backoff), options.signal);
    }
  }
}

function verdict(message: WaitLeaseResponse, timeoutMs: number): WaitOutcome {
  const d = message.deployment;
  const ready = !message.timedOut && d?.phase === DeploymentPhase.READY;
  const reason = ready
    ? ""
    : message.timedOut
      ? timeoutReason(timeoutMs)
      : `the deployment is ${phaseName(d?.phase)}${d?.message ? `: ${d.message}` : ""}`;
  return { ready, timedOut: message.timedOut, last: message, reason };
}

const timeoutReason = (ms: number) => `not ready within ${ms / 1000}s`;

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** READY for DEPLOYMENT_PHASE_READY; "UNKNOWN" when absent. */
export function phaseName(phase: DeploymentPhase | undefined): string {
  return phase === undefined ? "UNKNOWN" : enumName(DeploymentPhase, phase);
}

/** A container state as event JSON. */
function containerJson(c: ContainerState) {
  return { name: c.name, state: c.state, exit_code: c.exitCode, message: c.message };
}

/** One line for people: `web=running api=exited(143, stopped by SIGTERM)`. */
export function describeDeployment(d: Deployment | undefined): string {
  if (!d) return "(no deployment)";
  const containers = d.containers
    .map(
      (c) =>
        `${c.name}=${c.state || "?"}${c.state === "exited" ? `(${c.exitCode}${c.message ? `, ${c.message}` : ""})` : ""}`,
    )
    .join(" ");
  return [d.id, phaseName(d.phase), containers, d.message ? `- ${d.message}` : ""]
    .filter((part) => part !== "")
    .join(" ");
}

/** Bytes of a command's output kept for stdout_contains and messages. */
const MAX_OUTPUT_BYTES = 1024 * 1024;

/**
 * Runs one check from this machine with its timeout. Never throws: a failure
 * (or an interrupt, which the caller notices on `signal`) is a failed outcome.
 */
export async function runCheck(check: Check, dir: string, signal: AbortSignal): Promise<CheckOutcome> {
  const started = performance.now();
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort("timeout"), check.timeoutMs);
  const forward = () => controller.abort(signal.reason);
  signal.addEventListener("abort", forward, { once: true });
  if (signal.aborted) forward();
  let result: { passed: boolean; message: string };
  try {
    result = await checkOnce(check, dir, controller.signal);
  } catch (error) {
    result = {
      passed: false,
      message:
        controller.signal.reason === "timeout"
          ? `timed out after ${check.timeoutMs / 1000}s`
          : signal.aborted
            ? "interrupted"
            : errorMessage(error),
    };
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", forward);
  }
  return {
    name: check.name,
    kind: check.kind,
    ...result,
    durationMs: Math.round(performance.now() - started),
  };
}

async function checkOnce(
  check: Check,
  dir: string,
  signal: AbortSignal,
): Promise<{ passed: boolean; message: string }> {
  switch (check.kind) {
    case "http": {
      let response: Response;
      let body: string;
      try {
        response = await fetch(check.url, { signal });
        body = await response.text();
      } catch (error) {
        if (signal.aborted) throw error;
        throw new Error(`GET ${check.url} failed: ${errorMessage(error)}`);
      }
      const answered = `GET ${check.url} answered ${response.status}`;
      if (response.status !== check.status)
        return { passed: false, message: `${answered}, expected ${check.status}` };
      if (check.bodyContains !== undefined && !body.includes(check.bodyContains)) {
        return {
          passed: false,
          message: `${answered} but the body does not contain ${JSON.stringify(check.bodyContains)} (body: ${excerpt(body)})`,
        };
      }
      return {
        passed: true,
        message:
          check.bodyContains === undefined
            ? answered
            : `${answered} with ${JSON.stringify(check.bodyContains)} in the body`,
      };
    }
    case "tcp": {
      await new Promise<void>((done, fail) => {
        const socket = connect({ host: check.host, port: check.port });
        const onAbort = () => socket.destroy(new Error(String(signal.reason)));
        signal.addEventListener("abort", onAbort, { once: true });
        socket.once("connect", () => {
          signal.removeEventListener("abort", onAbort);
          // Connected to itself (TCP simultaneous open while nothing listened): not a listener.
          const self = socket.localPort === socket.remotePort && socket.localAddress === socket.remoteAddress;
          socket.destroy();
          if (self) fail(new Error(`nothing listens on ${check.host}:${check.port}`));
          else done();
        });
        socket.once("error", (error) => {
          signal.removeEventListener("abort", onAbort);
          fail(new Error(`cannot connect to ${check.host}:${check.port}: ${error.message}`));
        });
      });
      return { passed: true, message: `connected to ${check.host}:${check.port}` };
    }
    case "exec": {
      const { code, stdout, stderr } = await execute(check.command, dir, signal);
      const exited = code === null ? "was killed" : `exited ${code}`;
      if (code !== check.exitCode) {
        return {
          passed: false,
          message: `${exited}, expected ${check.exitCode}${stderr ? ` (stderr: ${excerpt(stderr, true)})` : ""}`,
        };
      }
      if (check.stdoutContains !== undefined && !stdout.includes(check.stdoutContains)) {
        return {
          passed: false,
          message: `${exited} but stdout does not contain ${JSON.stringify(check.stdoutContains)} (stdout: ${excerpt(stdout, true)})`,
        };
      }
      return { passed: true, message: exited };
    }
  }
}

/**
 * Runs a command in its own process group (cwd relative to the manifest's
 * directory, the environment of this process plus `env`); the whole group is
 * killed when `signal` aborts.
 */
function execute(
  command: CommandSpec,
  dir: string,
  signal: AbortSignal,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((done, fail) => {
    const [program = "", ...args] = command.argv;
    const child = spawn(program, args, {
      cwd: resolve(dir, command.cwd || "."),
      // A check runs like a command typed next to the manifest: with this process's environment.
      env: { ...process.env, ...command.env },
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let kept = 0;
    const keep = (into: Buffer[]) => (chunk: Buffer) => {
      if (kept >= MAX_OUTPUT_BYTES) return;
      into.push(chunk);
      kept += chunk.length;
    };
    child.stdout.on("data", keep(out));
    child.stderr.on("data", keep(err));
    const kill = () => {
      if (child.pid !== undefined) {
        try {
          process.kill(-child.pid, "SIGKILL");
        } catch {
          // Already gone.
        }
      }
    };
    signal.addEventListener("abort", kill, { once: true });
    // A backgrounded grandchild would hold the pipes open: it goes with the leader.
    child.once("exit", kill);
    child.once("error", (error) => {
      signal.removeEventListener("abort", kill);
      fail(new Error(`cannot run ${JSON.stringify(program)}: ${error.message}`));
    });
    child.once("close", (code) => {
      signal.removeEventListener("abort", kill);
      if (signal.aborted) fail(new Error(String(signal.reason)));
      else done({ code, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
  });
}

/** At most 200 characters of `text`, from its start (or its end with `tail`), quoted. */
function excerpt(text: string, tail = false): string {
  const trimmed = text.trim();
  if (trimmed.length <= 200) return JSON.stringify(trimmed);
  return JSON.stringify(tail ? `…${trimmed.slice(-200)}` : `${trimmed.slice(0, 200)}…`);
}

/** An error's message; for fetch, the cause it hides behind "fetch failed" (e.g. ECONNREFUSED). */
function errorMessage(error: unknown): string {
  if (!(error instanceof Error)) return String(error);
  const cause = error.cause as { message?: string } | undefined;
  return cause?.message ?? error.message;
}
