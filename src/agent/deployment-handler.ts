import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { connect } from "node:net";
import { constants } from "node:os";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fromJson } from "@bufbuild/protobuf";
import { durationMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { quote } from "../errors.js";
import {
  type Command,
  type DeploymentSpec,
  DeploymentSpecSchema,
  type ReadinessProbe,
  ResourceService,
} from "../gen/leasehold/v1/resource_pb.js";
import { createClient } from "../rpc/client.js";
import { type ClientSecurity, channelOf } from "../rpc/client-security.js";
import { errorReasonOf, receiveLimitOf } from "../rpc/status.js";
import type { DeploymentPayload } from "../scope/deployment.js";
import { probeUrlRefusal } from "../scope/probe-url.js";
import type { JsonObject } from "../work/action.js";
import { type ActionContext, ActionFailure } from "./agent.js";
import { type commandHandler, killGroup, tail } from "./command-handler.js";
import {
  type AllowedCommand,
  type CommandAllowList,
  type CommandPolicy,
  commandPolicy,
  requireAllowedCommand,
} from "./command-policy.js";
import type { keptBy } from "./fence-keeper.js";
import type { createProcessRegistry, ProcessRegistry } from "./process-registry.js";

/** Options of {@link createDeploymentHandler}. */
export interface DeploymentHandlerOptions {
  /** Server address(es) for file downloads (inputs) and uploads (outputs). */
  readonly address: string | readonly string[];
  /** Each deployment runs in its own directory under this one (removed when it ends). */
  readonly workDir: string;
  /** Channel credentials. Default insecure (loopback). Exclusive with `security`. */
  readonly credentials?: grpc.ChannelCredentials;
  /**
   * TLS, mTLS and a bearer token for the file calls, as in `createAgent`
   * (see {@link ClientSecurity}); files are read once, here. Throws
   * INVALID_ARGUMENT naming the flag on a bad combination. Exclusive with
   * `credentials`.
   */
  readonly security?: ClientSecurity;
  /**
   * Which container commands (and `exec` readiness probes) may run, and which
   * environment variables they may set (see {@link CommandPolicy}; a bare
   * {@link CommandAllowList} allows no variables). Under a list, a bare
   * argv[0] runs as the agent's own PATH resolves it. Containers always run
   * in the deployment's work directory (their `cwd` is relative to it), so
   * the policy's `cwd` globs do not apply. A deployment with anything outside
   * it fails before anything starts, not retryable. Default `"any"`.
   */
  readonly allow?: CommandPolicy | CommandAllowList;
  /** How long containers get between SIGTERM and SIGKILL when stopped. Default 10 s. */
  readonly stopGraceMs?: number;
  /**
   * Records the containers' process groups and each attempt's work directory, for a later agent
   * to stop and remove if this one is killed ({@link createProcessRegistry}); wrapped by
   * {@link keptBy}, it also tells a fence keeper, which kills the containers at once if this
   * agent is killed (see {@link commandHandler}).
   */
  readonly registry?: ProcessRegistry;
}

/** One running container. */
interface Container {
  readonly name: string;
  readonly child: ChildProcess | undefined;
  state: "waiting" | "running" | "exited";
  exitCode: number;
  message: string;
  readonly stderr: ReturnType<typeof tail>;
  /** Resolves once the container's leader exited (or could not start). */
  exited: Promise<void>;
}

/** Whether an action's payload is a deployment (rather than a command). */
export const isDeploymentPayload = (payload: JsonObject): boolean =>
  typeof payload.deployment === "object" && payload.deployment !== null;

/**
 * The reference agent's deployment runner. For a deployment action it
 * places the input files in a fresh work directory, starts every container in
 * its own process group, reports `starting`, runs the readiness probe, reports
 * `ready` (with per-container states each time), and then keeps it running:
 *
 * - lease revoked or given back (rollback, cancel, expiry, self-fence, the
 *   agent closing at once), even while it stops to save: every process group
 *   is killed at once; nothing (more) is saved;
 * - stop requested (CollectOutputs): `stopping`, SIGTERM then SIGKILL after
 *   the grace, the files of `outputs_dir` uploaded as file resources into the
 *   lease, and their ids returned (`outputFileIds`), with what was not saved
 *   and why (`skipped`: `{name, sizeBytes, reason}`: a file the server
 *   refused, a symbolic link, anything else that is not a regular file);
 * - containers ending on their own: outputs are saved the same way; all
 *   exiting 0 succeeds (stopped), any other exit fails the deployment.
 */
/**
 * How long an upload or download waits out a server that refuses it as too
 * busy, and a download servers that are unavailable (restarting).
 */
const BUSY_RETRY_MS = 30_000;

export function createDeploymentHandler(options: DeploymentHandlerOptions) {
  const addresses = typeof options.address === "string" ? [options.address] : [...options.address];
  const channel = channelOf(options, addresses);
  const policy = commandPolicy(options.allow);
  const stopGraceMs = options.stopGraceMs ?? 10_000;

  /** Calls the ResourceService on each address in turn until one answers. */
  type Resources = ReturnType<typeof createClient<(typeof ResourceService)["method"]>>;
  /** One client (channel) per address, opened on first use and kept: uploads come in bursts. */
  const clients = new Map<string, Resources>();
  /**
   * `fn` on the first address that answers, again (jittered backoff, within
   * {@link BUSY_RETRY_MS}) while every server is too busy or, for a call that
   * only reads (`reads`), unavailable: a download can be repeated safely
   * through a server's restart, an upload (not idempotent) cannot.
   */
  async function withResources<T>(
    fn: (client: Resources) => Promise<T>,
    { reads = false, signal }: { reads?: boolean; signal?: AbortSignal } = {},
  ): Promise<T> {
    // A server serving as many unary calls as it takes did nothing with this one (action.proto,
    // Limits): its outputs and inputs are worth waiting for, within a bound.
    const started = Date.now();
    for (let attempt = 0; ; attempt++) {
      try {
        return await onEachAddress(fn);
      } catch (error) {
        const busy = errorReasonOf(error) === "UNARY_CALLS_OVER_LIMIT";
        const unavailable = reads && (error as { code?: number }).code === grpc.status.UNAVAILABLE;
        if ((!busy && !unavailable) || Date.now() - started > BUSY_RETRY_MS || signal?.aborted) throw error;
        await delay(Math.random() * Math.min(2000, 100 * 2 ** attempt));
      }
    }
  }
  async function onEachAddress<T>(fn: (client: Resources) => Promise<T>): Promise<T> {
    let lastError: unknown;
    for (const address of addresses) {
      let client = clients.get(address);
      if (!client) {
        client = createClient(
          ResourceService,
          address,
          channel.credentials,
          channel.options,
          channel.interceptors,
        );
        clients.set(address, client);
      }
      try {
        return await fn(client);
      } catch (error) {
        lastError = error;
        if ((error as { code?: number }).code !== grpc.status.UNAVAILABLE) throw error;
      }
    }
    throw lastError;
  }

  return async function deploymentHandler(ctx: ActionContext): Promise<JsonObject> {
    const { id, leaseId, spec } = parsePayload(ctx.payload);
    // Before anything is fetched or started: a refused deployment leaves nothing behind.
    // The container's cwd is not the policy's: it is kept inside the work directory (see `inside`).
    const programs = spec.containers.map((c) =>
      requireAllowedCommand({ argv: c.command?.argv ?? [], env: c.command?.env ?? {} }, policy),
    );
    const probe = spec.readinessProbe?.check;
    const probeProgram =
      probe?.case === "exec"
        ? requireAllowedCommand({ argv: probe.value.argv, env: probe.value.env }, policy)
        : undefined;
    // Checked by the server too, but not by an older one: a probe is this agent's own request.
    if (probe?.case === "httpGet") {
      const refusal = probeUrlRefusal(probe.value);
      if (refusal !== undefined) {
        throw new ActionFailure(`readiness_probe.http_get ${quote(probe.value)} refused: ${refusal}`, {
          retryable: false,
        });
      }
    }
    // One directory per attempt: a superseded attempt's cleanup never touches a newer one's.
    const dir = resolve(options.workDir, `${id}.${ctx.epoch}`);
    const containers: Container[] = [];
    const states = () =>
      containers.map((c) => ({ name: c.name, state: c.state, exitCode: c.exitCode, message: c.message }));
    const report = (phase: string) => ctx.progress(phase, { containers: states() });
    let stopping = false;

    try {
      await rm(dir, { recursive: true, force: true });
      // Recorded before it exists: an agent killed from here on has it removed by its next run.
      options.registry?.addDirectory(dir);
      await mkdir(dir, { recursive: true });
      ctx.progress("starting", {
        containers: spec.containers.map((c) => ({
          name: c.name,
          state: "waiting",
          exitCode: 0,
          message: "",
        })),
      });
      for (const input of spec.inputs) {
        const content = await withResources(
          async (client) => {
            const chunks: Uint8Array[] = [];
            for await (const part of client.downloadFile({ resourceId: input.fileId }))
              chunks.push(part.chunk);
            return Buffer.concat(chunks);
          },
          { reads: true, signal: ctx.signal },
        ).catch((error: Error) => {
          throw new ActionFailure(
            `could not fetch input ${input.path} (file ${input.fileId}): ${error.message}`,
            {
              retryable: false,
            },
          );
        });
        const target = inside(dir, input.path);
        await mkdir(dirname(target), { recursive: true });
        await writeFile(target, content);
      }
      if (ctx.signal.aborted) throw ctx.signal.reason;

      const outputsDir = spec.outputsDir ? inside(dir, spec.outputsDir) : undefined;
      if (outputsDir) await mkdir(outputsDir, { recursive: true });
      for (const [i, c] of spec.containers.entries()) {
        containers.push(
          start(c.name, c.command as Command, programs[i] as AllowedCommand, dir, options.registry, {
            LEASEHOLD_DEPLOYMENT_ID: id,
            LEASEHOLD_LEASE_ID: leaseId,
            LEASEHOLD_WORK_DIR: dir,
            ...(outputsDir ? { LEASEHOLD_OUTPUTS_DIR: outputsDir } : {}),
          }),
        );
      }
      report("starting");

      // Something a container does, the server asks, or the lease loses ends the wait.
      const anyExit = () => Promise.race(containers.map((c) => c.exited.then(() => c)));
      const stopAsked = abortPromise(ctx.stopRequested);
      const lost = abortPromise(ctx.signal);
      const exitsAfter = (c: Container) => c.state === "exited";

      if (spec.readinessProbe) {
        const probe = spec.readinessProbe;
        const periodMs = probe.period ? durationMs(probe.period) : 1000;
        const timeoutMs = probe.timeout ? durationMs(probe.timeout) : 5000;
        for (;;) {
          if (containers.some(exitsAfter)) break;
          if (await check(probe, probeProgram, dir, timeoutMs)) break;
          const woke = await Promise.race([delay(periodMs), anyExit(), stopAsked, lost]);
          if (woke === "aborted") break;
        }
      }
      if (ctx.signal.aborted) throw ctx.signal.reason;
      if (!containers.some(exitsAfter) && !ctx.stopRequested.aborted) report("ready");

      // Running: until every container exited, a stop request, or the lease is lost.
      while (!containers.every(exitsAfter) && !ctx.stopRequested.aborted && !ctx.signal.aborted) {
        const failed = containers.find((c) => c.state === "exited" && c.exitCode !== 0);
        if (failed) break;
        const running = containers.filter((c) => !exitsAfter(c));
        await Promise.race([...running.map((c) => c.exited), stopAsked, lost]);
        // A container that exited with an error fails the deployment (below): never "ready" again.
        if (ctx.signal.aborted || containers.some((c) => c.state === "exited" && c.exitCode !== 0)) continue;
        report(ctx.stopRequested.aborted ? "stopping" : "ready");
      }
      if (ctx.signal.aborted) throw ctx.signal.reason;

      // Stopping, on request or because a container ended: the others are stopped, the outputs saved.
      stopping = true;
      const failed = ctx.stopRequested.aborted
        ? undefined
        : containers.find((c) => c.state === "exited" && c.exitCode !== 0);
      if (ctx.stopRequested.aborted) report("stopping");
      await stopAll(containers, stopGraceMs, ctx.signal);
      // The lease lost meanwhile (given back by a closing agent, revoked): nothing is saved. A
      // file uploaded now would sit in the lease in no answer, while the collect says that what
      // this run wrote went with it.
      if (ctx.signal.aborted) throw ctx.signal.reason;
      const saved = outputsDir
        ? await saveOutputs(outputsDir, leaseId, { deploymentId: id, epoch: BigInt(ctx.epoch) }, ctx.signal)
        : { outputFileIds: [], skipped: [] };
      const result: JsonObject = { containers: states(), ...saved };
      if (failed) {
        throw new ActionFailure(`container ${failed.name} ${failed.message}`, {
          retryable: false,
          details: result,
        });
      }
      return result;
    } finally {
      if (!stopping)
        for (const c of containers) if (c.child?.pid !== undefined) killGroup(c.child.pid, "SIGKILL");
      await Promise.all(containers.map((c) => c.exited));
      // Left recorded if it could not be removed: the agent's next run tries again.
      await rm(dir, { recursive: true, force: true }).then(
        () => options.registry?.removeDirectory(dir),
        () => {},
      );
    }
  };

  /**
   * Uploads every regular file under `outputsDir` into the lease, named by its
   * relative path; what it does not save is in `skipped`, with its size and why.
   * Stops, throwing its reason, once `lost` aborts (the lease is gone): an
   * upload under way is cancelled, and no other starts. Each file names the
   * run it is an output of (`run`): the server refuses it once that run is
   * lost, and deletes what it saved if the run is lost before it ends.
   */
  async function saveOutputs(
    outputsDir: string,
    leaseId: string,
    run: { readonly deploymentId: string; readonly epoch: bigint },
    lost: AbortSignal,
  ): Promise<{ outputFileIds: string[]; skipped: JsonObject[] }> {
    const outputFileIds: string[] = [];
    const skipped: JsonObject[] = [];
    for (const entry of await walk(outputsDir)) {
      if (lost.aborted) throw lost.reason;
      const name = relative(outputsDir, entry.path).split(sep).join("/");
      if (entry.not !== undefined) {
        skipped.push({ name, sizeBytes: 0, reason: `${entry.not}: only regular files are saved` });
        continue;
      }
      let sizeBytes = 0;
      try {
        sizeBytes = (await stat(entry.path)).size;
        const content = await readFile(entry.path);
        const response = await withResources((client) =>
          client.createFile({ leaseId, name, content, contentType: "", outputOf: run }, { signal: lost }),
        );
        if (response.resource) outputFileIds.push(response.resource.id);
      } catch (error) {
        if (lost.aborted) throw lost.reason;
        skipped.push({ name, sizeBytes, reason: notSaved(error, name, sizeBytes) });
      }
    }
    return { outputFileIds, skipped };
  }
}

function parsePayload(payload: JsonObject): { id: string; leaseId: string; spec: DeploymentSpec } {
  const d = (payload as unknown as DeploymentPayload).deployment;
  if (typeof d?.id !== "string" || typeof d.spec !== "object") {
    throw new ActionFailure("payload.deployment: must have an id and a spec", { retryable: false });
  }
  try {
    const spec = fromJson(DeploymentSpecSchema, d.spec as never, { ignoreUnknownFields: true });
    return { id: d.id, leaseId: typeof d.leaseId === "string" ? d.leaseId : "", spec };
  } catch (error) {
    throw new ActionFailure(`payload.deployment.spec: ${(error as Error).message}`, { retryable: false });
  }
}

/** `path` resolved inside `dir`; the server refuses paths that leave it, this makes sure. */
function inside(dir: string, path: string): string {
  const target = resolve(dir, path);
  if (target !== dir && !target.startsWith(dir + sep)) {
    throw new ActionFailure(`path ${JSON.stringify(path)} leaves the work directory`, { retryable: false });
  }
  return target;
}

function start(
  name: string,
  command: Command,
  { program, args, argv0 }: AllowedCommand,
  dir: string,
  registry: ProcessRegistry | undefined,
  env: Record<string, string>,
): Container {
  const stderr = tail();
  let child: ChildProcess | undefined;
  let startError: Error | undefined;
  try {
    child = spawn(program, args, {
      argv0,
      cwd: command.cwd ? inside(dir, command.cwd) : dir,
      env: { ...process.env, ...command.env, ...env },
      stdio: ["ignore", "ignore", "pipe"],
      detached: true, // its own process group: the whole tree is stopped with it
    });
  } catch (error) {
    startError = error as Error;
  }
  if (child?.pid !== undefined) registry?.add(child.pid, `container ${name} in ${dir}`);
  const container: Container = {
    name,
    child,
    state: "running",
    exitCode: 0,
    message: "",
    stderr,
    exited: Promise.resolve(),
  };
  const exited = new Promise<void>((done) => {
    const finish = (code: number, message: string) => {
      container.state = "exited";
      container.exitCode = code;
      container.message = message;
      done();
    };
    if (!child) return finish(127, `could not start ${argv0}: ${startError?.message}`);
    child.stderr?.on("data", (chunk: Buffer) => stderr.push(chunk));
    child.once("error", (error) => finish(127, `could not start ${argv0}: ${error.message}`));
    child.once("exit", (code, signal) => {
      const last = stderr.text().trimEnd().split("\n").at(-1) ?? "";
      // As shells report it: 128 + the signal's number (143 for SIGTERM, 137 for SIGKILL).
      if (signal) finish(128 + (constants.signals[signal] ?? 0), `stopped by ${signal}`);
      else
        finish(code ?? 1, code === 0 ? "exited 0" : `exited ${code}${last ? `: ${last.slice(0, 300)}` : ""}`);
      // A backgrounded grandchild may still hold the group: it goes with the leader.
      if (child?.pid !== undefined) {
        killGroup(child.pid, "SIGKILL");
        registry?.remove(child.pid);
      }
    });
  });
  container.exited = exited;
  return container;
}

/**
 * SIGTERM to every container's group, SIGKILL to what is left after
 * `graceMs`, or at once if the lease is lost meanwhile (`lost` aborts).
 */
async function stopAll(containers: readonly Container[], graceMs: number, lost: AbortSignal): Promise<void> {
  const alive = containers.filter((c) => c.state !== "exited" && c.child?.pid !== undefined);
  for (const c of alive) killGroup(c.child?.pid as number, "SIGTERM");
  const kill = () => {
    for (const c of alive) if (c.state !== "exited") killGroup(c.child?.pid as number, "SIGKILL");
  };
  const timer = setTimeout(kill, graceMs);
  lost.addEventListener("abort", kill);
  if (lost.aborted) kill();
  await Promise.all(alive.map((c) => c.exited));
  clearTimeout(timer);
  lost.removeEventListener("abort", kill);
}

/** Most redirects an `http_get` probe follows (fetch's own limit is 20). */
const MAX_PROBE_REDIRECTS = 5;

/**
 * One readiness check: true when it passes within `timeoutMs`. An `exec`
 * probe runs `program` (what the policy allowed and resolved).
 */
async function check(
  probe: ReadinessProbe,
  program: AllowedCommand | undefined,
  dir: string,
  timeoutMs: number,
): Promise<boolean> {
  const c = probe.check;
  switch (c.case) {
    case "tcpPort":
      return new Promise((done) => {
        const socket = connect({ host: "127.0.0.1", port: c.value });
        const finish = (ok: boolean) => {
          socket.destroy();
          done(ok);
        };
        socket.setTimeout(timeoutMs, () => finish(false));
        // A connection to itself (TCP simultaneous open: the kernel picked the probed port as
        // the source port while nothing listened) is not a listener.
        socket.once("connect", () =>
          finish(socket.localPort !== socket.remotePort || socket.localAddress !== socket.remoteAddress),
        );
        socket.once("error", () => finish(false));
      });
    case "httpGet":
      try {
        // Redirects followed here, and only to URLs a probe may GET: fetch would follow one to
        // any host.
        const signal = AbortSignal.timeout(timeoutMs);
        let url = c.value;
        for (let redirects = 0; ; redirects++) {
          const response = await fetch(url, { signal, redirect: "manual" });
          await response.body?.cancel();
          const location = response.headers.get("location");
          if (response.status < 300 || response.status > 399 || location === null) return response.ok;
          url = new URL(location, url).href;
          if (redirects === MAX_PROBE_REDIRECTS || probeUrlRefusal(url) !== undefined) return false;
        }
      } catch {
        return false;
      }
    case "exec": {
      const [name = "", ...rest] = c.value.argv;
      const { program: file, args, argv0 } = program ?? { program: name, args: rest, argv0: name };
      return new Promise((done) => {
        const child = spawn(file, args, {
          argv0,
          cwd: c.value.cwd ? inside(dir, c.value.cwd) : dir,
          env: { ...process.env, ...c.value.env },
          stdio: "ignore",
          detached: true,
        });
        const timer = setTimeout(() => child.pid !== undefined && killGroup(child.pid, "SIGKILL"), timeoutMs);
        child.once("error", () => {
          clearTimeout(timer);
          done(false);
        });
        child.once("exit", (code) => {
          clearTimeout(timer);
          done(code === 0);
        });
      });
    }
    default:
      return true;
  }
}

/** An entry of an outputs directory: a regular file, or what `not` says it is instead. */
interface OutputEntry {
  readonly path: string;
  readonly not?: string;
}

/** What `dir` holds but directories, depth first in name order; symbolic links are not followed. */
async function walk(dir: string): Promise<OutputEntry[]> {
  const found: OutputEntry[] = [];
  const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
  for (const entry of entries.sort((a, b) => a.name.localeCompare(b.name))) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) for (const inner of await walk(path)) found.push(inner);
    else if (entry.isFile()) found.push({ path });
    else found.push({ path, not: entry.isSymbolicLink() ? "a symbolic link" : "a socket, pipe or device" });
  }
  return found;
}

/**
 * Why output file `name` was not saved, for people: the server's refusal in
 * words, or the error. Either names the file and, for one too large, the limit.
 */
function notSaved(error: unknown, name: string, sizeBytes: number): string {
  const limit = receiveLimitOf(error);
  if (limit !== undefined)
    return `file ${quote(name)} (${sizeBytes} bytes) is over the server's receive limit of ${limit} bytes (its --max-file-size plus 1 MiB)`;
  const e = error as { details?: string; message?: string };
  // The server's own words (e.g. `content: file "out.bin" (… bytes) is over the server's file limit of … bytes`).
  return e.details ?? e.message ?? String(error);
}

const delay = (ms: number) => new Promise<"slept">((done) => setTimeout(() => done("slept"), ms));

/** Resolves "aborted" when `signal` aborts (never otherwise). */
const abortPromise = (signal: AbortSignal) =>
  new Promise<"aborted">((done) => {
    if (signal.aborted) done("aborted");
    else signal.addEventListener("abort", () => done("aborted"), { once: true });
  });
