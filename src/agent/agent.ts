import { randomUUID } from "node:crypto";
import { create, toBinary } from "@bufbuild/protobuf";
import { durationMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { context, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import {
  ConnectRequestSchema,
  type ConnectResponse,
  RevokeReason,
  WorkerService,
} from "../gen/leasehold/v1/worker_pb.js";
import { createClient } from "../rpc/client.js";
import { type ClientSecurity, channelOf } from "../rpc/client-security.js";
import { FIELD_LIMITS, MAX_BATCH_MESSAGES, MAX_CAPACITY } from "../rpc/limits.js";
import { errorReasonOf } from "../rpc/status.js";
import { anotherAddress, expandTargets, type Target } from "../rpc/targets.js";
import { checkWorkerNames, Violations } from "../rpc/validate.js";
import {
  batchRuns,
  decodeServerMessage,
  encodeGrantAck,
  encodeRequestBatch,
  encodeSuccess,
} from "../rpc/worker-wire.js";
import { parseTraceParent, traceParentOf } from "../telemetry.js";
import { versionText } from "../version.js";
import type { JsonObject } from "../work/action.js";
import { reconnectDelayMs, refusedDelayMs } from "./backoff.js";
import { answersOnConnection, servesWorkers } from "./health-probe.js";
import { closeWithPendingConnections, trackingConnections } from "./pending-connections.js";
import { cutToFit, reportViolation, scrubNul, toJson } from "./report-limits.js";

/**
 * Most bytes of reports in one ConnectRequest batch (a larger report goes
 * alone): far under what a server receives in one message.
 */
const MAX_REQUEST_BATCH_BYTES = 1024 * 1024;

/**
 * Heartbeat intervals the oldest unanswered heartbeat may wait before the
 * agent leaves the stream for the next address: a server that hangs never
 * ends its streams, and its agents' leases would expire while another server
 * could have resumed them.
 */
const UNANSWERED_HEARTBEATS = 1.5;
/** The heartbeat interval assumed before the first welcome tells the server's: its default. */
const DEFAULT_HEARTBEAT_MS = 2000;
/**
 * With one address, how long a connection may take to start HTTP/2 before
 * the agent leaves it for a new one: a peer that accepts TCP and never
 * answers (a middlebox whose backend hangs) holds grpc-js forever, but a
 * server busy with a storm of TLS handshakes is only slow.
 */
const SETUP_BOUND_MS = 10_000;
/** How often, meanwhile, the agent looks whether the connection is up. */
const SETUP_POLL_MS = 100;

/**
 * Heartbeat intervals between two rounds of asking the other addresses
 * whether they serve, while the acks of a stream say its server cannot reach
 * its database (worker.proto, Connect): when the database is down for every
 * server, the agents ask now and then, not on every ack; and a database that
 * flaps cannot bounce an agent from server to server.
 */
const ASK_AGAIN_HEARTBEATS = 4;

/**
 * Heartbeat intervals the acks of a stream must have said the database is
 * unreachable before the agent asks elsewhere: servers notice an outage up to
 * an interval apart, and one that has not yet would answer SERVING. Three
 * quarters: the second such ack, about an interval after the first, is
 * enough even when it comes a little early.
 */
const UNREACHABLE_HEARTBEATS = 0.75;

/** What the server sends for every action (grants, report results, acks) is decoded by hand. */
const AGENT_DECODERS = { connect: decodeServerMessage };

type RequestInit = Parameters<typeof create<typeof ConnectRequestSchema>>[1];

/**
 * A queued message's bytes: a grant ack or a success by hand (worker-wire.ts),
 * anything else through protobuf-es.
 */
function encodeRequest(message: RequestInit): Uint8Array {
  const m = message?.message;
  if (m?.case === "grantAck") {
    const bytes = encodeGrantAck(m.value.reportId ?? 0n, m.value.actionId ?? "", m.value.epoch ?? 0n);
    if (bytes) return bytes;
  }
  const outcome = m?.case === "completion" ? m.value.outcome : undefined;
  if (m?.case === "completion" && outcome?.case === "succeeded") {
    const v = m.value;
    const bytes = encodeSuccess({
      reportId: v.reportId ?? 0n,
      actionId: v.actionId ?? "",
      epoch: v.epoch ?? 0n,
      traceParent: v.traceParent ?? "",
      output: outcome.value.output,
    });
    if (bytes) return bytes;
  }
  return toBinary(ConnectRequestSchema, create(ConnectRequestSchema, message));
}

/** The server's limit on a failure message (characters). */
const MAX_FAILURE_MESSAGE = FIELD_LIMITS["leasehold.v1.ActionFailure.message"]?.maxLength ?? 65_536;

/** One lease (action and epoch) as a key. */
const leaseKey = (m: { readonly actionId?: string; readonly epoch?: bigint }) => `${m.epoch} ${m.actionId}`;

/** What a handler gets for one granted action (Temporal's activity context, for work leases). */
export interface ActionContext {
  readonly actionId: string;
  /** The fencing epoch of this grant. */
  readonly epoch: number;
  /** 1 for the first attempt, then increasing. */
  readonly attempt: number;
  /** What to run. */
  readonly payload: JsonObject;
  readonly runId: string;
  /** The last checkpoint an earlier attempt reported, if any. */
  readonly checkpoint: JsonObject | undefined;
  /**
   * Aborts when the lease is revoked (cancel, drain, superseded), when the
   * agent self-fences (no heartbeat ack before the local deadline) or when
   * the agent closes without waiting. `signal.reason` says which.
   */
  readonly signal: AbortSignal;
  /**
   * Aborts when the server asks the action to stop gracefully and keep what
   * it made (CollectOutputs on a deployment). The lease stays valid: save the
   * outputs, then return normally; the result is reported as usual.
   */
  readonly stopRequested: AbortSignal;
  /**
   * Reports a phase, optional details, and optionally a checkpoint for the next attempt.
   * NULs in strings become U+FFFD; throws a TypeError when details or checkpoint are not
   * JSON (circular, a Date, a bigint, …), and a RangeError when the report breaks a server
   * limit (see worker.proto: depth, size), rather than sending what would end the stream.
   *
   * Cheap to call often: reports are coalesced per action. At most one progress report
   * of an action is in flight (sent and not yet answered by the server, which applies
   * them one after another); calls made meanwhile replace each other, the latest phase
   * and details winning and the latest checkpoint kept even when a later call has none,
   * and the survivor goes out when the answer comes. While the agent is not connected the
   * latest is kept the same way and sent once it reconnects, before the lease's
   * completion or release (and before a goodbye), so a checkpoint reaches the next attempt
   * unless the server ended the lease meanwhile. Ignored once the handler's signal has
   * aborted or it has returned.
   */
  progress(phase: string, details?: JsonObject, checkpoint?: JsonObject): void;
  /**
   * W3C traceparent of this attempt's span when the server traces the action
   * (the grant carried one), for handing on by hand (e.g. as an HTTP
   * `traceparent` header); undefined otherwise. With an OpenTelemetry
   * tracer provider and context manager registered in the process, the
   * handler also runs inside that span, so its own spans nest under it.
   */
  readonly traceParent?: string | undefined;
}

/** Throw this from a handler to fail the action with control over retries. */
export class ActionFailure extends Error {
  readonly retryable: boolean;
  readonly details: JsonObject | undefined;
  constructor(message: string, options: { retryable?: boolean; details?: JsonObject } = {}) {
    super(message);
    this.name = "ActionFailure";
    this.retryable = options.retryable ?? true;
    this.details = options.details;
  }
}

/** Why a handler's signal aborted. */
export class LeaseLost extends Error {
  constructor(
    /** expired | cancelled | superseded | rolled_back | collect_outputs | drained | self_fenced | closing */
    readonly reason: string,
    message: string,
  ) {
    super(message);
    this.name = "LeaseLost";
  }
}

/**
 * An AbortController made only when a handler asks for its signal. Node's
 * take about 3 µs each to make, two per action, and most handlers finish
 * without looking: in a 16-slot run of no-op actions they were about 8 % of
 * the agent's CPU. Aborting before the signal exists records the reason;
 * the signal, once asked for, starts aborted with it. Exported for tests.
 */
export class LazyAbortController {
  #controller: AbortController | undefined;
  #aborted = false;
  #reason: unknown;

  get aborted(): boolean {
    return this.#aborted;
  }

  get reason(): unknown {
    return this.#reason;
  }

  get signal(): AbortSignal {
    if (!this.#controller) {
      this.#controller = new AbortController();
      if (this.#aborted) this.#controller.abort(this.#reason);
    }
    return this.#controller.signal;
  }

  abort(reason: unknown): void {
    if (this.#aborted) return;
    this.#aborted = true;
    this.#reason = reason;
    this.#controller?.abort(reason);
  }
}

/** Things an agent reports, for logs and tests. */
export type AgentEvent =
  | { type: "connected"; sessionId: string; resumed: string[]; revoked: string[]; address: string }
  | { type: "disconnected"; error: string; retryInMs: number }
  | { type: "grant"; actionId: string; epoch: number; attempt: number }
  | {
      type: "finished";
      actionId: string;
      epoch: number;
      outcome: "succeeded" | "failed" | "released";
      accepted: boolean;
      message: string;
    }
  | { type: "revoked"; actionId: string; epoch: number; reason: string }
  /**
   * The local deadline passed without a fresh heartbeat ack: the handlers of
   * `actionIds` were aborted. `silentMs`: time since the last ack arrived;
   * `databaseUnreachable`: that ack said its server could not reach its
   * database (acks came, but could not extend the lease).
   */
  | { type: "self_fenced"; actionIds: string[]; silentMs: number; databaseUnreachable: boolean }
  /**
   * Another process connected with this worker id and took the session over,
   * or holds it and the server refused this agent's hello (WORKER_ID_IN_USE;
   * worker ids must be unique): every handler was aborted (superseded) and
   * every lease dropped (none is reported on or listed again: they are the
   * other process's), and the agent connects again after `retryInMs`: at least a grace period after
   * a takeover, 1–2 s after a first refusal, doubling to 15–30 s.
   */
  | { type: "taken_over"; retryInMs: number }
  /**
   * An operator drains this worker (ClusterService.DrainWorker): the server
   * sends it no more grants while the drain lasts. The agent carries on as
   * before, connected, finishing what it holds; it takes grants again when
   * the server sends them, after an undrain (`leasehold workers undrain`),
   * which no event announces: the next `grant` is the sign.
   */
  | { type: "drain"; reason: string }
  /**
   * What the heartbeat acks of the server at `address` say about its database
   * changed: it cannot reach it (`reachable` false: its acks no longer extend
   * the guarantee, and an agent given other addresses asks them whether they
   * serve, to move), or, after that, an ack of a stream to that server says it
   * reaches it again. Once per change for each address, across reconnections:
   * an agent that left a server stays told it was unreachable until a stream
   * to it says otherwise.
   */
  | { type: "server_database"; address: string; reachable: boolean }
  /**
   * Something about the agent's setup that the application should fix (e.g.
   * a selfFenceMarginMs that leaves no guarantee to start work under). Also
   * emitted as a process warning (code LEASEHOLD_AGENT_SETUP), once per cause.
   */
  | { type: "warning"; message: string };

/** Options of {@link createAgent}. */
export interface AgentOptions {
  /**
   * Server address(es) as host:port. A name with several DNS records counts
   * as one address per record. The agent starts at a random one (spreading
   * agents over replicas) and moves to another, at random, whenever its
   * stream ends; before a welcome, it leaves a server that answers no health
   * check on the stream's connection within 1.5 heartbeat intervals.
   */
  readonly address: string | readonly string[];
  readonly cluster: string;
  readonly workerId: string;
  /** Slots: actions run at once, from 1 to 10,000. Default 1. */
  readonly capacity?: number;
  /**
   * Grants held beyond `capacity`, waiting for a slot. The hello asks for
   * `capacity + prefetch` leases; at most `capacity` handlers run at once, and
   * a waiting grant starts, in the order granted, as soon as a handler ends
   * and its report has gone out. With short handlers, the server's commit of
   * one round of reports then overlaps the handlers of the next instead of
   * taking turns with them. A waiting grant's lease is held like any other:
   * listed in heartbeats, resumed on reconnection, given back unrun on a
   * revoke or on close. So an action can wait here behind a long handler
   * while another worker is idle: keep the default, 0, for long actions.
   * A whole number; capacity + prefetch is at most 10,000.
   */
  readonly prefetch?: number;
  readonly labels?: Readonly<Record<string, string>>;
  /** Channel credentials. Default insecure (loopback). Exclusive with `security`. */
  readonly credentials?: grpc.ChannelCredentials;
  /**
   * TLS, mTLS and a bearer token, applied to every address (see
   * {@link ClientSecurity}): e.g. `{ tlsCa: "/etc/leasehold/ca.pem",
   * tokenFile: "/var/run/secrets/tokens/leasehold" }`. Certificate and key
   * files are read once, when the agent is created; a token file again
   * whenever it changes. A token without TLS goes only to loopback
   * addresses. `createAgent` throws INVALID_ARGUMENT naming the flag
   * (`--tls-ca`, `--token`, …) on a bad combination or an unreadable file.
   * Exclusive with `credentials`.
   */
  readonly security?: ClientSecurity;
  /**
   * Runs one action; resolves with its output, a JSON object (or nothing), or
   * throws (an {@link ActionFailure} to choose retries). An output that is not
   * a JSON object, or holds what JSON cannot (a circular reference, a Date, a
   * Map, a bigint, a function), fails the action, not retried, with a message
   * naming what and where (`output.at is a Date, …`), rather than being
   * stored as something else.
   */
  // biome-ignore lint/suspicious/noConfusingVoidType: a handler that returns nothing (`async (ctx) => { await work(); }`) is a Promise<void>, and one that returns on some paths a Promise<JsonObject | void>; undefined accepts neither.
  readonly handler: (ctx: ActionContext) => Promise<JsonObject | undefined | void>;
  /**
   * Subtracted from the server's guarantee when computing the local deadline,
   * so the work stops before the server may hand it to someone else. Default
   * 500 ms (clock drift and delivery delay). At least 0 (`createAgent` throws
   * otherwise), and less than the server's grace period by more than a
   * heartbeat interval: a grant starts only while the guarantee outlasts the
   * next heartbeat, so with a larger margin nothing would ever start. The agent
   * says so (a `warning` event and a process warning) when a welcome shows it.
   */
  readonly selfFenceMarginMs?: number;
  /**
   * Ceiling of the first reconnect delay; it doubles with every failed
   * attempt, and each delay is drawn uniformly below it (full jitter).
   * Default 200 ms.
   */
  readonly initialBackoffMs?: number;
  /**
   * Largest reconnect delay. Whatever is set here, the delay never exceeds an
   * eighth of the grace period of the last welcome (SPEC rule 11), or 1 s
   * before any welcome, so a server back within the grace finds the agent
   * again before its leases' guarantee runs out. Default: that bound.
   */
  readonly maxBackoffMs?: number;
  /** Free-form agent description sent in the hello. */
  readonly agentVersion?: string;
  /**
   * Observer of agent events. What it throws is caught and emitted as a
   * process warning (`process.on("warning")`, code
   * LEASEHOLD_AGENT_OBSERVER_THREW); the agent goes on as if it had returned.
   */
  readonly onEvent?: (event: AgentEvent) => void;
  /**
   * Called with how long the held leases are guaranteed from now (until the
   * self-fence; milliseconds) each time a heartbeat ack moves that: for a
   * watchdog process that stops the work of an agent that cannot stop it
   * itself (paused or killed), as the reference agent's fence keeper does.
   * What it throws is caught and emitted as a process warning, like onEvent's.
   */
  readonly onGuarantee?: (ms: number) => void;
}

/** What {@link Agent.close} did. */
export interface CloseResult {
  /**
   * The server ended the session on the agent's goodbye, giving back every
   * lease not reported. False when it did not within close's wait (the
   * server unreachable, or never welcomed the agent): those leases then
   * expire after the server's grace period.
   */
  readonly goodbye: boolean;
  /**
   * Actions whose handler ignored its abort signal and still ran when close
   * gave their leases back: their work may overlap another worker's attempt.
   * A lease the agent had dropped already (the server ended it, or another
   * process holds it) is listed too, but not given back: it is not this
   * agent's to release.
   */
  readonly stillRunning: readonly string[];
  /**
   * Leases whose handler still ran when close's wait (`timeoutMs`) ended:
   * their signal was aborted and their leases given back (released, so
   * another worker may run them again), unless the handler reported first.
   */
  readonly stopped: readonly { readonly actionId: string; readonly epoch: number }[];
}

/** A running agent. */
export interface Agent extends AsyncDisposable {
  /** The current session id, once connected. */
  readonly sessionId: string | undefined;
  /** Leases held now: handlers running, grants waiting to start, and reports not yet answered. */
  readonly running: number;
  /**
   * Drains, in three steps, each bounded:
   * 1. Starts no more work and waits up to `timeoutMs` (default 30 s) for the
   *    running handlers to return, reporting each result as it comes.
   * 2. Aborts the handlers still running (`LeaseLost` reason `closing`) and
   *    waits up to 5 s more for them to return: the goodbye gives their
   *    leases back, and another worker may then start their actions, so a
   *    handler should stop when its signal aborts. One still running after
   *    that has its lease released anyway, and is named in the result.
   * 3. Waits up to 5 s for the server to answer the reports still
   *    unanswered, then says goodbye, which gives back every lease not
   *    reported (those aborted, and grants that never started), and waits
   *    for the server to end the session, within the same 5 s; while the
   *    stream is down it keeps reconnecting for that time to say it.
   * So close takes at most `timeoutMs` + 10 s (and returns as soon as
   * nothing is left to wait for). The result says whether the goodbye was
   * confirmed: when it was not (the server unreachable), the leases not
   * reported stay the session's until its grace period runs out. A later
   * call while it drains shortens step 1 to its own `timeoutMs` when that
   * ends sooner (`close({ timeoutMs: 0 })`: abort what runs now), and
   * returns the same promise.
   */
  close(options?: { timeoutMs?: number }): Promise<CloseResult>;
}

interface Running {
  readonly actionId: string;
  readonly epoch: number;
  /**
   * Set while the grant waits for a guarantee (it arrived when the last ack's
   * guarantee had run out, e.g. right after the server thawed or the agent
   * reconnected): calls the handler. Undefined once started or given back.
   */
  start: (() => void) | undefined;
  readonly controller: LazyAbortController;
  /** Aborted on a graceful stop request (revoke reason COLLECT_OUTPUTS). */
  readonly stop: LazyAbortController;
  /** The report to (re)send until the server answers it; set when the handler settles. */
  report: PendingReport | undefined;
  settled: Promise<void>;
  /** The trace context the completion carries back: the handler's span's, else the grant's. */
  traceParent: string | undefined;
  /**
   * The server ended this lease (revoked EXPIRED, SUPERSEDED or ROLLED_BACK,
   * or in a welcome), whatever stopped the handler first (a self-fence, say):
   * its slot is free on the server, and its outcome is no longer ours to report.
   */
  serverEnded: boolean;
  /**
   * The handler's latest progress not sent yet: it waits for the answer to
   * the one in flight, or for a stream (see sendProgress).
   */
  progressWaiting: Progress | undefined;
  /** The progress report sent and not answered yet, and the stream it went on. */
  progressSent: { readonly progress: Progress; readonly reportId: bigint; readonly conn: object } | undefined;
}

/** One progress report's content, checked against the server's limits. */
interface Progress {
  readonly phase: string;
  readonly details: JsonObject | undefined;
  readonly checkpoint: JsonObject | undefined;
}

/**
 * `newer` in place of `older`, both not sent: the latest phase and details
 * win, and the latest checkpoint is kept even when the newer report has none,
 * since the next attempt resumes from it.
 */
const coalesce = (older: Progress | undefined, newer: Progress): Progress =>
  newer.checkpoint !== undefined || older?.checkpoint === undefined
    ? newer
    : { phase: newer.phase, details: newer.details, checkpoint: older.checkpoint };

/**
 * What a handler sees of its grant. A class, not an object literal with
 * getters: V8 builds such a literal slowly (about a microsecond, every
 * grant). The signals are made only when read (LazyAbortController).
 */
class GrantContext implements ActionContext {
  readonly #running: Running;
  constructor(
    readonly actionId: string,
    readonly epoch: number,
    readonly attempt: number,
    readonly payload: JsonObject,
    readonly runId: string,
    readonly checkpoint: JsonObject | undefined,
    readonly progress: ActionContext["progress"],
    running: Running,
    fenceIfOverdue: () => void,
  ) {
    this.#running = running;
    this.#fenceIfOverdue = fenceIfOverdue;
  }
  readonly #fenceIfOverdue: () => void;
  get traceParent(): string | undefined {
    return this.#running.traceParent;
  }
  get signal(): AbortSignal {
    // A process paused past its deadline (SIGSTOP, a VM frozen) runs the handler's own timers
    // before the fence's on waking: the signal says the truth whenever it is read.
    this.#fenceIfOverdue();
    return this.#running.controller.signal;
  }
  get stopRequested(): AbortSignal {
    return this.#running.stop.signal;
  }
}

type PendingReport =
  | { kind: "succeeded"; output: JsonObject | undefined }
  | {
      kind: "failed";
      message: string;
      retryable: boolean;
      details: JsonObject | undefined;
      /** Sent in place of a report the server refused as INVALID (never replaced again). */
      refused?: true;
    }
  | {
      kind: "released";
      reason: string /** Stopped by the self-fence (ReleaseReport.self_fenced). */;
      selfFenced?: true;
    }
  | { kind: "dropped" };

const REVOKE_NAMES: Record<number, string> = {
  [RevokeReason.EXPIRED]: "expired",
  [RevokeReason.CANCELLED]: "cancelled",
  [RevokeReason.SUPERSEDED]: "superseded",
  [RevokeReason.ROLLED_BACK]: "rolled_back",
  [RevokeReason.COLLECT_OUTPUTS]: "collect_outputs",
  [RevokeReason.DRAINED]: "drained",
};

/** Revokes of a lease the server already ended, and whose slot it freed, when it sent them. */
const SERVER_ENDED: ReadonlySet<string> = new Set(["expired", "superseded", "rolled_back"]);

/**
 * Starts an agent: one stream to the server, heartbeats, grants run by
 * `handler` within `capacity` slots, reports answered by the server, and
 * reconnection with exponential backoff and jitter that lists the held
 * leases so they resume (SPEC rule 2). Self-fences (rule 5): when no
 * heartbeat ack arrives before the local deadline, every handler's signal
 * aborts before the server could hand the work to another worker.
 */
export function createAgent(options: AgentOptions): Agent {
  const addresses = typeof options.address === "string" ? [options.address] : [...options.address];
  if (addresses.length === 0) throw new Error("createAgent: address must name at least one server");
  const channel = channelOf(options, addresses);
  const margin = options.selfFenceMarginMs ?? 500;
  // A negative margin would run work past the server's deadline; NaN would never start any.
  if (typeof margin !== "number" || !Number.isFinite(margin) || margin < 0)
    throw new Error(
      `createAgent: selfFenceMarginMs must be a number of milliseconds of at least 0, not ${margin}`,
    );
  const initialBackoff = options.initialBackoffMs ?? 200;
  /**
   * Observers (onEvent, onGuarantee) are the application's code, called in
   * the middle of the agent's own work (before the first heartbeat, before a
   * handler starts): an exception from one would stop that work. It is caught
   * and told as a process warning (the SDK has no logger of its own).
   */
  const observe = (name: string, call: () => void) => {
    try {
      call();
    } catch (error) {
      process.emitWarning(
        `leasehold agent ${options.workerId}: ${name} threw, and the agent went on: ${error instanceof Error ? error.message : String(error)}`,
        { code: "LEASEHOLD_AGENT_OBSERVER_THREW" },
      );
    }
  };
  const onEvent = options.onEvent;
  const emit = (event: AgentEvent) => {
    if (onEvent) observe(`onEvent (${event.type} event)`, () => onEvent(event));
  };
  const capacity = options.capacity ?? 1;
  const prefetch = options.prefetch ?? 0;
  if (!Number.isInteger(capacity) || capacity < 1 || capacity > MAX_CAPACITY)
    throw new Error(
      `createAgent: capacity must be a whole number from 1 to ${MAX_CAPACITY}, not ${capacity}`,
    );
  if (!Number.isInteger(prefetch) || prefetch < 0)
    throw new Error(`createAgent: prefetch must be a whole number of at least 0, not ${prefetch}`);
  // The hello asks for both: a server refuses a capacity above its limit (worker.proto).
  if (capacity + prefetch > MAX_CAPACITY) {
    throw new Error(
      `createAgent: capacity + prefetch must be at most ${MAX_CAPACITY}, not ${capacity} + ${prefetch}`,
    );
  }
  // Refused here, by the server's own rules: a hello the server refuses would be sent again forever.
  const names = new Violations();
  checkWorkerNames(
    names,
    { workerId: options.workerId, cluster: options.cluster, labels: { ...options.labels } },
    { workerId: "workerId", cluster: "cluster", labels: "labels" },
  );
  names.throwIfAny();

  const running = new Map<string, Running>();
  /**
   * Handlers replaced in `running` by a newer grant of the same action while
   * they still stop: they take a slot until they return (see slotsTaken).
   */
  const superseded = new Set<Running>();
  /** Hello.instance_id: this agent's own, so that a second process with its worker id is refused. */
  const instanceId = randomUUID();
  let closing = false;
  let closed = false;
  let sessionId: string | undefined;
  let addressIndex = Math.floor(Math.random() * 1024);
  /** An address the next stream must go to: one that serves, found while leaving a server. */
  let preferred: string | undefined;
  /** When the agent last asked other addresses whether they serve (any stream's server). */
  let askedAt = Number.NEGATIVE_INFINITY;
  /** The addresses with names expanded, refreshed before every connection. */
  let targets: Target[] = addresses.map((address) => ({ address, name: undefined }));
  let attemptsWithoutWelcome = 0;
  /** Refusals of this agent's credentials in a row (they pace retries: `refusedDelayMs`). */
  let refusals = 0;
  /** The grace period of the last welcome: bounds the reconnect backoff. */
  let graceMs: number | undefined;
  let reconnectTimer: NodeJS.Timeout | undefined;
  let current: Connection | undefined;
  let nextReportId = 0n;
  /**
   * Local time after which held leases are no longer guaranteed: the latest of
   * (send time of an acknowledged heartbeat + its `remaining` − margin). Every
   * ack is a lower bound of the session's persisted deadline, which only
   * grows, so the latest bound holds (a stale ack processed late never
   * shortens it). Kept across reconnections: a broken stream does not extend
   * the guarantee. Minus infinity until the first ack: a grant that arrives
   * before any guarantee waits for one instead of running unfenced.
   */
  let deadline = Number.NEGATIVE_INFINITY;
  // Every local time of the fence (the deadline, heartbeat send times, acks) is performance.now(),
  // a steady clock: with the wall clock, a step back (NTP, a VM resumed) kept work running past
  // the server's deadline by the size of the step, and a step forward fenced it early.
  /** Local time the last heartbeat ack arrived, for the self_fenced event. */
  let lastAckAt = performance.now();
  /** Whether the last heartbeat ack said its server could not reach its database. */
  let lastAckUnreachable = false;
  let fenceTimer: NodeJS.Timeout | undefined;
  /** The deadline `fenceTimer` fires at, while it is set. */
  let fenceArmedFor: number | undefined;
  /** The heartbeat interval of the last welcome: when the next ack is due. */
  let heartbeatMs = 0;
  /** Whether held leases are guaranteed now (see `deadline`). */
  const guaranteed = () => performance.now() < deadline;
  /**
   * Whether a grant may start now: the guarantee outlasts the next heartbeat,
   * so a healthy stream renews it before the fence could stop the new work.
   * Right after a server thaws or restarts, acks can carry a guarantee that is
   * nearly spent until the server's next renewal; starting then would only
   * fence the work a moment later and give the action back for a re-run.
   */
  const mayStart = () => performance.now() + heartbeatMs < deadline;
  /** Report resends waiting to fire, cleared on close. */
  const retries = new Set<NodeJS.Timeout>();

  interface Connection {
    readonly call: grpc.ClientDuplexStream<unknown, ConnectResponse>;
    readonly client: { close(): void; readonly grpcClient: grpc.Client };
    /** Writes a message now: the hello, heartbeats, the goodbye. */
    send(message: RequestInit): void;
    /**
     * Sends a report (grant ack, progress, completion, release): when the
     * server takes batches, the reports of one turn of the event loop go out
     * together at its end, in order; otherwise at once.
     */
    report(message: RequestInit): void;
    /** Writes the reports waiting for the end of the turn now. */
    flush(): void;
    /**
     * Reports waiting for the end of the turn, encoded when they go out; a
     * grant ack carries its lease, so that a report on that lease in the same
     * turn can stand in for it (and the ack is never encoded).
     */
    readonly queued: { readonly message: RequestInit; readonly ackOf?: string }[];
    /** Leases a progress, completion or release report queued this turn is about. */
    readonly reported: Set<string>;
    flushTimer: NodeJS.Immediate | undefined;
    welcomed: boolean;
    /** The welcome said accepts_batches: reports may go in batches. */
    batches: boolean;
    /** The welcome said accepts_stop_grants. */
    takesStopGrants: boolean;
    /** The hello set stop_grants (it was sent while closing). */
    helloStoppedGrants: boolean;
    /**
     * The server sends no more grants on this stream: the agent is closing and
     * the server takes StopGrants (the hello set stop_grants, or one was sent).
     */
    grantsStopped: boolean;
    heartbeatTimer: NodeJS.Timeout | undefined;
    /** Local send time of each unacknowledged heartbeat, by sequence. */
    readonly sent: Map<bigint, number>;
    /**
     * The last heartbeat acknowledged and its local send time: a server whose
     * renewal was late (a database outage) answers it again (worker.proto).
     */
    lastAcked: { readonly sequence: bigint; readonly sentAt: number } | undefined;
    sequence: bigint;
    /** Sends a heartbeat now (after the welcome; a no-op before). */
    beat(): void;
    /** Reports waiting for their result, by report id. */
    readonly pending: Map<bigint, Running>;
    /** Progress reports waiting for their result, by report id. */
    readonly progressPending: Map<bigint, Running>;
    ended: boolean;
    /** Goodbye was sent: the server ends the stream once the session is closed. */
    saidGoodbye: boolean;
    /** Why the agent left this stream itself (the server stopped answering), if it did. */
    abandoned: string | undefined;
    /** The server's address, as the `connected` event gives it. */
    readonly address: string;
    /** When the first ack of the current run of acks saying the database is unreachable came. */
    unreachableSince: number | undefined;
    /** The agent is asking the other addresses whether they serve, for this stream. */
    asking: boolean;
  }

  /** Forgets `r` only if it is still the action's current entry (a newer grant may have replaced it). */
  const forget = (r: Running) => {
    if (running.get(r.actionId) === r) running.delete(r.actionId);
  };

  // Not the leases the server ended (worker.proto: stop listing them): after a takeover by
  // another process, the session holds them for that process.
  const heldLeases = () =>
    [...running.values()]
      .filter((r) => r.report?.kind !== "dropped" && !r.serverEnded)
      .map((r) => ({ actionId: r.actionId, epoch: BigInt(r.epoch) }));

  function sendReport(conn: Connection, r: Running): void {
    const report = r.report;
    if (!report || report.kind === "dropped" || conn.ended || !conn.welcomed) return;
    // Applied before the report, in order: the checkpoint reaches the next attempt.
    sendProgress(r, true);
    nextReportId += 1n;
    const reportId = nextReportId;
    conn.pending.set(reportId, r);
    conn.report(reportMessage(reportId, r, report));
  }

  /**
   * Sends the grant's waiting progress, when there is a stream and (unless
   * `now`, for a report about to follow it) no progress of the grant is in
   * flight: the server applies one action's reports one after another, each
   * in a transaction, so a handler that reports thousands of times a second
   * would queue them ahead of the heartbeats until the stream was dropped.
   * What waits meanwhile is replaced by newer calls (see coalesce), and kept
   * while the agent is not connected: a checkpoint is handed to the next
   * attempt only if it reaches the server before the lease's release.
   */
  function sendProgress(r: Running, now: boolean): void {
    const conn = current;
    const progress = r.progressWaiting;
    if (!progress || r.serverEnded || !conn || conn.ended || !conn.welcomed || conn.saidGoodbye) return;
    if (!now && r.progressSent?.conn === conn) return;
    // Once the lease's completion or release is decided, its progress goes only just before that
    // report (sendReport), never on its own: sent after it (a progress answered UNAVAILABLE and
    // sent again while the completion awaits its answer), it reaches the server after the action
    // ended there and is refused as fenced, which reads as a second worker on the lease. It
    // waits instead: sent before the report if that is sent again (answered UNAVAILABLE, or on
    // the next stream), dropped with the lease once the report is answered.
    if (!now && r.report) return;
    nextReportId += 1n;
    const reportId = nextReportId;
    r.progressWaiting = undefined;
    r.progressSent = { progress, reportId, conn };
    conn.progressPending.set(reportId, r);
    conn.report(progressMessage(reportId, r, progress));
  }

  function progressMessage(reportId: bigint, r: Running, progress: Progress): RequestInit {
    const { phase, details, checkpoint } = progress;
    return {
      message: {
        case: "progress",
        value: {
          reportId,
          actionId: r.actionId,
          epoch: BigInt(r.epoch),
          phase,
          ...(details ? { details: details as never } : {}),
          ...(checkpoint ? { checkpoint: checkpoint as never } : {}),
        },
      },
    };
  }

  function reportMessage(
    reportId: bigint,
    r: Running,
    report: Exclude<PendingReport, { kind: "dropped" }>,
  ): RequestInit {
    // Field by field, no spreads: V8 (Node 20) takes microseconds for an object literal that
    // begins with a spread and goes on with more properties. create() leaves undefined unset.
    const actionId = r.actionId;
    const epoch = BigInt(r.epoch);
    if (report.kind === "released") {
      const selfFenced = report.selfFenced === true;
      return {
        message: { case: "release", value: { reportId, actionId, epoch, reason: report.reason, selfFenced } },
      };
    }
    const traceParent = r.traceParent ?? "";
    if (report.kind === "succeeded") {
      return {
        message: {
          case: "completion",
          value: {
            reportId,
            actionId,
            epoch,
            traceParent,
            outcome: { case: "succeeded", value: { output: report.output as never } },
          },
        },
      };
    }
    return {
      message: {
        case: "completion",
        value: {
          reportId,
          actionId,
          epoch,
          traceParent,
          outcome: {
            case: "failed",
            value: {
              message: report.message,
              retryable: report.retryable,
              details: report.details as never,
            },
          },
        },
      },
    };
  }

  /**
   * A report as it can be sent, since the server would end the stream on
   * one that breaks its limits, and a report that cannot be encoded would
   * throw. NULs are replaced. An output that is not a JSON object (circular,
   * a Date, a bigint, a string, …) or that breaks a server limit (too deep,
   * too large) becomes a non-retryable failure that says so: it would fail
   * the same way again. A failure keeps its retryable flag: a message over
   * the server's limit is cut (saying how much), and details that are not
   * JSON or too large are left out (saying why), rather than losing the
   * handler's own error, and a retry with it.
   */
  function fitted(r: Running, report: PendingReport): PendingReport {
    if (report.kind === "succeeded") {
      const output = toJson(report.output, "output");
      if ("problem" in output)
        return notReported(`the handler's output cannot be sent as JSON: ${output.problem}`);
      const fit: PendingReport = { kind: "succeeded", output: output.json };
      const violation = reportViolation(reportMessage(0n, r, fit));
      return violation === undefined ? fit : notReported(`the handler's output ${overLimit(violation)}`);
    }
    if (report.kind !== "failed") return report;
    const notes: string[] = [];
    const details = toJson(report.details, "details");
    let fit: Extract<PendingReport, { kind: "failed" }> = {
      kind: "failed",
      message: "",
      retryable: report.retryable,
      details: undefined,
    };
    if ("problem" in details)
      notes.push(`its details were left out: they cannot be sent as JSON: ${details.problem}`);
    else if (details.json !== undefined) {
      fit.details = details.json;
      const violation = reportViolation(reportMessage(0n, r, fit));
      if (violation !== undefined) {
        notes.push(`its details were left out: ${violation.slice(0, 1024)}`);
        fit.details = undefined;
      }
    }
    const note = notes.length > 0 ? ` (${notes.join("; ")})` : "";
    fit = { ...fit, message: cutToFit(scrubNul(report.message), MAX_FAILURE_MESSAGE - note.length) + note };
    const violation = reportViolation(reportMessage(0n, r, fit));
    return violation === undefined ? fit : notReported(`the handler's failure ${overLimit(violation)}`);
  }

  /** A non-retryable failure saying why the handler's result could not be reported. */
  const notReported = (message: string): PendingReport => ({
    kind: "failed",
    message: cutToFit(scrubNul(message), 4096),
    retryable: false,
    details: undefined,
  });
  const overLimit = (violation: string) =>
    `breaks a server limit, so it was not reported: ${violation.slice(0, 1024)}`;

  function startAction(
    conn: Connection,
    grant: Extract<ConnectResponse["message"], { case: "grant" }>["value"],
  ): void {
    const actionId = grant.actionId;
    const epoch = Number(grant.epoch);
    const existing = running.get(actionId);
    // A grant sent again after a reconnect; unless the agent stopped it for a takeover and left it
    // out of its hello: then it runs anew, once the old handler has stopped.
    if (existing && existing.epoch === epoch && !existing.serverEnded) return;
    if (existing) {
      existing.serverEnded = true;
      existing.controller.abort(new LeaseLost("superseded", "a newer grant of this action arrived"));
      // Still stopping: the new grant must not run beside it, on the same action.
      if (!existing.report) superseded.add(existing);
    }
    const controller = new LazyAbortController();
    const stop = new LazyAbortController();
    const r: Running = {
      actionId,
      epoch,
      start: undefined,
      controller,
      stop,
      report: undefined,
      settled: Promise.resolve(),
      // A traced grant's context until its handler's span starts (see run).
      traceParent: grant.traceParent || undefined,
      serverEnded: false,
      progressWaiting: undefined,
      progressSent: undefined,
    };
    running.set(actionId, r);
    emit({ type: "grant", actionId, epoch, attempt: grant.attempt });
    nextReportId += 1n;
    conn.report({
      message: { case: "grantAck", value: { reportId: nextReportId, actionId, epoch: grant.epoch } },
    });
    const { held, busy } = slotsTaken(r);
    if (!closing && held >= capacity + prefetch) {
      // More grants than the hello asked for (the server should never do that): give it back.
      settle(r, { kind: "released", reason: "no free slot on this agent" });
      return;
    }
    const progress: ActionContext["progress"] = (phase, details, checkpoint) => {
      if (controller.aborted || r.report) return;
      const detailsJson = toJson(details, "details");
      if ("problem" in detailsJson)
        throw new TypeError(`progress details cannot be sent as JSON: ${detailsJson.problem}`);
      const checkpointJson = toJson(checkpoint, "checkpoint");
      if ("problem" in checkpointJson)
        throw new TypeError(`progress checkpoint cannot be sent as JSON: ${checkpointJson.problem}`);
      const report: Progress = {
        phase: scrubNul(phase),
        details: detailsJson.json,
        checkpoint: checkpointJson.json,
      };
      // The server would end the stream on it: the handler hears of it instead.
      const violation = reportViolation(progressMessage(0n, r, report));
      if (violation !== undefined) throw new RangeError(`progress breaks a server limit: ${violation}`);
      r.progressWaiting = coalesce(r.progressWaiting, report);
      sendProgress(r, false);
    };
    const ctx = new GrantContext(
      actionId,
      epoch,
      grant.attempt,
      (grant.payload ?? {}) as JsonObject,
      grant.runId,
      grant.checkpoint as JsonObject | undefined,
      progress,
      r,
      fenceIfOverdue,
    );
    const run = () => {
      r.start = undefined;
      // The handler always starts under a live guarantee, and the fence timer
      // covers it from its first moment.
      armFence();
      // Started only when the handler runs, so that a grant given back never leaves a span open.
      const traced = handlerSpan(grant);
      if (traced) r.traceParent = traced.traceParent;
      r.settled = (async () => {
        let report: PendingReport;
        try {
          const output = await (traced ? traced.run(() => options.handler(ctx)) : options.handler(ctx));
          // Finished after the deadline but before the fence's timer ran (a paused process): as if
          // the fence had come first, the lease is given back, not completed.
          fenceIfOverdue();
          report = controller.aborted ? afterAbort(r) : { kind: "succeeded", output: output ?? undefined };
        } catch (error) {
          fenceIfOverdue();
          if (controller.aborted) report = afterAbort(r);
          else if (error instanceof ActionFailure) {
            report = {
              kind: "failed",
              message: error.message,
              retryable: error.retryable,
              details: error.details,
            };
          } else {
            report = {
              kind: "failed",
              message: error instanceof Error ? error.message : String(error),
              retryable: true,
              details: undefined,
            };
          }
        }
        traced?.end(report);
        settle(r, report);
        // A slot is free: a prefetched grant takes it once this report has been written (the
        // reports of a turn go out at its end), so the server commits it while the next runs.
        // Without prefetch a grant waits only for a handler the server ended (see slotsTaken).
        if (prefetch > 0 || anyWaiting()) startTimer ??= setImmediate(startWaiting);
      })();
    };
    if (!closing && busy < capacity && mayStart() && !stillStopping(actionId)) {
      run();
      return;
    }
    // Every slot is taken (a prefetched grant), or the guarantee of the last ack
    // has run out or is about to (or none came yet on this agent): the server may
    // already count this session as silent. Running the handler now would run it
    // unfenced or only until the fence; aborting it at once would give back a
    // grant the server may still stand behind. So it waits, held and listed in
    // heartbeats, until a slot frees and an ack brings a fresh guarantee (asked
    // for right away), and is given back without running if its signal aborts
    // first (revoke, a reconnect that revokes it). While the agent closes, it
    // is given back at once if the server took StopGrants (see stopGrants), and
    // otherwise waits for the goodbye, which gives back every lease at once.
    r.start = run;
    controller.signal.addEventListener(
      "abort",
      () => {
        if (!r.start) return;
        r.start = undefined;
        settle(r, afterAbort(r));
      },
      { once: true },
    );
    if (closing) stopGrants(conn);
    else if (!mayStart()) conn.beat();
  }

  /** Records how a grant ended and reports it (or forgets it, when it is no longer ours). */
  function settle(r: Running, report: PendingReport): void {
    superseded.delete(r);
    r.report = fitted(r, report);
    if (report.kind === "dropped") forget(r);
    else if (current) sendReport(current, r);
  }

  /**
   * The grants the server counts against this agent (`held`: not reported
   * yet, and not ended by the server), and the handlers that take a slot here
   * (`busy`: started and not returned, at most `capacity`); `except` left out.
   * A handler whose lease the server ended (expired, superseded, rolled back)
   * is busy until it returns, but no longer held: the server freed its slot
   * at once and may grant it again while the handler is still stopping. That
   * grant waits for the handler instead of being released: released, it went
   * back to the queue and came straight back, over and over, until the
   * handler returned. A handler replaced by a newer grant of its own action
   * is busy the same way: the two would otherwise run at once, one stopping
   * and one starting, on the same action.
   */
  function slotsTaken(except?: Running): { held: number; busy: number } {
    let held = 0;
    let busy = 0;
    for (const r of running.values()) {
      if (r === except || r.report) continue;
      if (!r.serverEnded) held++;
      if (!r.start) busy++;
    }
    for (const r of superseded) if (!r.start) busy++;
    return { held, busy };
  }

  /**
   * Whether an earlier grant's handler of this action is still stopping: a new grant of the same
   * action never runs beside it, whatever slots are free.
   */
  const stillStopping = (actionId: string): boolean => {
    for (const r of superseded) if (r.actionId === actionId && !r.start && !r.report) return true;
    return false;
  };

  /** Whether a grant waits for a slot or a guarantee (see {@link startWaiting}). */
  const anyWaiting = (): boolean => {
    for (const r of running.values()) if (r.start) return true;
    return false;
  };

  /** A {@link startWaiting} scheduled after a handler ended, while one is. */
  let startTimer: NodeJS.Immediate | undefined;

  /** Starts waiting grants, in the order granted, while slots are free and there is a guarantee. */
  function startWaiting(): void {
    startTimer = undefined;
    if (!mayStart() || closing) return;
    let { busy } = slotsTaken();
    for (const r of [...running.values()]) {
      if (busy >= capacity) break;
      if (!r.start || r.controller.aborted || stillStopping(r.actionId)) continue;
      busy++;
      r.start();
    }
  }

  /**
   * Drops every lease at once, as worker.proto asks of a worker whose stream
   * ended ABORTED, reason SESSION_REAPED (its leases expired and may run
   * elsewhere already), or that another process holds the session of
   * (SESSION_TAKEN_OVER, WORKER_ID_IN_USE: the leases are that process's).
   * Every handler still running is aborted with `reason` (it keeps its slot
   * here until it returns, as after a revoke, and reports nothing when it
   * does), and every report not answered yet (a self-fence's release, a
   * completion) is dropped, not sent again on the next stream: there it could
   * only be fenced, or would end the other process's lease. None of them is
   * listed in a later hello or heartbeat. With `revokedEvents`, a revoked
   * event tells of each handler aborted here that the server had not ended
   * already (a takeover has its own event, taken_over).
   */
  function dropAll(
    reason: "expired" | "superseded",
    message: string,
    { revokedEvents }: { revokedEvents: boolean },
  ): void {
    for (const r of running.values()) {
      r.progressWaiting = undefined;
      r.progressSent = undefined;
      const endedHere = r.serverEnded;
      r.serverEnded = true;
      if (r.report) {
        r.report = { kind: "dropped" };
        forget(r);
        continue;
      }
      if (revokedEvents && !endedHere)
        emit({ type: "revoked", actionId: r.actionId, epoch: r.epoch, reason });
      if (!r.controller.aborted) r.controller.abort(new LeaseLost(reason, message));
    }
  }

  /** What to tell the server about an action whose handler was aborted. */
  function afterAbort(r: Running): PendingReport {
    // A lease the server ended is no longer ours to report on (a revoke may confirm a cancel or
    // a drain). One the agent stops because it closes is given back by the goodbye with the
    // rest: a release of its own would free a slot for the server to fill again.
    if (r.serverEnded) return { kind: "dropped" };
    const aborted = r.controller;
    const reason = aborted.reason instanceof LeaseLost ? aborted.reason.reason : "closing";
    if (reason === "closing") return { kind: "dropped" };
    const message = aborted.reason instanceof Error ? aborted.reason.message : reason;
    return reason === "self_fenced"
      ? { kind: "released", reason: message, selfFenced: true }
      : { kind: "released", reason: message };
  }

  /**
   * Runs when the local deadline passes: aborts every handler that is still
   * running. The fence is not a state the agent stays in: it is re-armed by
   * the next ack, and grants that come before that wait for one, so it holds
   * for every lease however many times the agent fenced or reconnected.
   */
  function selfFence(): void {
    fenceArmedFor = undefined;
    if (closed) return;
    if (guaranteed()) {
      armFence();
      return;
    }
    const silentMs = performance.now() - lastAckAt;
    // Started, still running handlers. A grant waiting for a guarantee runs nothing, and a
    // finished one only has a report left to deliver.
    const affected = [...running.values()].filter((r) => !r.start && !r.report && !r.controller.aborted);
    if (affected.length > 0) {
      for (const r of affected) {
        r.controller.abort(
          new LeaseLost(
            "self_fenced",
            // Acks that kept coming but counted down: the server was heard, its database was not.
            `${lastAckUnreachable ? "the server could not reach its database to extend the lease" : "no heartbeat ack from the server"} before the lease's guaranteed time ran out; stopping so the server can hand the action to another worker`,
          ),
        );
      }
      emit({
        type: "self_fenced",
        actionIds: affected.map((r) => r.actionId),
        silentMs,
        databaseUnreachable: lastAckUnreachable,
      });
    }
  }

  /** Runs the self-fence now if its time has come and its timer has not run yet. */
  function fenceIfOverdue(): void {
    if (fenceArmedFor !== undefined && performance.now() >= fenceArmedFor) selfFence();
  }

  /** Setup warnings already given, so that reconnects do not repeat them. */
  const warned = new Set<string>();
  function warnOnce(message: string): void {
    if (warned.has(message)) return;
    warned.add(message);
    process.emitWarning(`leasehold agent ${options.workerId}: ${message}`, { code: "LEASEHOLD_AGENT_SETUP" });
    emit({ type: "warning", message });
  }

  /** Servers whose acks said last that they cannot reach their database. */
  const databaseLost = new Set<string>();

  /** Emits `server_database` when what the acks of the server at `address` say about its database changes. */
  function tellDatabase(address: string, reachable: boolean): void {
    // Reachable and not lost, or unreachable and lost: nothing changed.
    if (reachable !== databaseLost.has(address)) return;
    if (reachable) databaseLost.delete(address);
    else databaseLost.add(address);
    emit({ type: "server_database", address, reachable });
  }

  function armFence(): void {
    // Every handler start arms it: a timer already set for this deadline stays.
    if (fenceArmedFor === deadline) return;
    clearTimeout(fenceTimer);
    fenceArmedFor = undefined;
    if (!Number.isFinite(deadline)) return;
    fenceTimer = setTimeout(selfFence, Math.max(0, deadline - performance.now()));
    fenceTimer.unref();
    fenceArmedFor = deadline;
  }

  /**
   * Asks every other address whether it serves (grpc.health.v1), and leaves
   * `conn`, whose server cannot reach its database, for the first, in the
   * order the agent goes through them, that says SERVING: its next stream
   * goes there and resumes the session. When none does (the database is
   * down for every server), it stays: leaving would only move the wait.
   */
  function leaveIfAnotherServes(conn: Connection): void {
    conn.asking = true;
    askedAt = performance.now();
    const here = addressIndex % targets.length;
    const current = (targets[here] as Target).address;
    const others = targets
      .map((_, k) => (here + 1 + k) % targets.length)
      .filter((i) => i !== here && (targets[i] as Target).address !== current);
    const asked = others.map((i) => {
      const target = targets[i] as Target;
      return servesWorkers(
        {
          address: target.address,
          credentials: channel.credentials,
          options: { ...channel.options, ...nameOverride(target) },
          interceptors: channel.interceptors,
        },
        heartbeatMs,
      ).catch(() => false);
    });
    void Promise.all(asked)
      .then((serving) => {
        const at = serving.indexOf(true);
        // Nothing to leave when an ack said the database is back while the others were asked.
        if (at === -1 || conn.ended || conn.saidGoodbye || closed || conn.unreachableSince === undefined)
          return;
        const target = targets[others[at] as number] as Target;
        // The next stream goes there, even if the names are resolved anew before it opens.
        preferred = target.address;
        conn.abandoned = `the server cannot reach its database; ${target.address} serves`;
        conn.call.cancel();
      })
      .catch(() => {})
      .finally(() => {
        conn.asking = false;
      });
  }

  /** An IP expanded from a name: the server's certificate names the name. */
  const nameOverride = (target: Target): grpc.ChannelOptions =>
    channel.tls && !channel.serverNameFixed && target.name
      ? { "grpc.ssl_target_name_override": target.name }
      : {};

  function connect(): void {
    if (closed) return;
    expandTargets(addresses).then(
      (expanded) => {
        if (expanded.length > 0) targets = expanded;
        openStream();
      },
      () => openStream(),
    );
  }

  function openStream(): void {
    if (closed) return;
    if (preferred !== undefined) {
      const at = targets.findIndex((t) => t.address === preferred);
      if (at !== -1) addressIndex = at;
      preferred = undefined;
    }
    const target = targets[addressIndex % targets.length] as Target;
    const address = target.address;
    const client = createClient(
      WorkerService,
      address,
      channel.credentials,
      {
        ...channel.options,
        ...nameOverride(target),
        "grpc.keepalive_time_ms": 10_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.keepalive_permit_without_calls": 1,
        // A connection of this stream's own: one left stuck before HTTP/2 started (grpc-js waits
        // for the server's SETTINGS without a bound, and keepalive starts only after them) must
        // not be shared with the next stream's client from the process-wide pool.
        "grpc.use_local_subchannel_pool": 1,
      },
      channel.interceptors,
      AGENT_DECODERS,
    );
    trackingConnections(client.grpcClient);
    const call = client.connect() as grpc.ClientDuplexStream<unknown, ConnectResponse>;
    const conn: Connection = {
      call,
      client,
      address,
      // Nothing follows a goodbye: it gives back every lease, and a write after the stream's
      // end fails the call, which would end close() before the server has released them.
      send: (message) => {
        if (!conn.ended && !conn.saidGoodbye) call.write(create(WorkerService.method.connect.input, message));
      },
      report: (message) => {
        if (conn.ended || conn.saidGoodbye) return;
        if (!conn.batches) {
          conn.send(message);
          return;
        }
        const m = message?.message;
        if (m?.case === "grantAck") conn.queued.push({ message, ackOf: leaseKey(m.value) });
        else {
          conn.queued.push({ message });
          if (m?.case === "progress" || m?.case === "completion" || m?.case === "release") {
            conn.reported.add(leaseKey(m.value));
          }
        }
        conn.flushTimer ??= setImmediate(conn.flush);
      },
      flush: () => {
        clearImmediate(conn.flushTimer);
        conn.flushTimer = undefined;
        if (conn.ended || conn.saidGoodbye || conn.queued.length === 0) return;
        // A report on a lease acknowledges its grant (worker.proto, GrantAck): an ack followed
        // by one in the same write is left out, and so is the server's answer to it.
        const queued = conn.queued
          .splice(0)
          .filter((q) => q.ackOf === undefined || !conn.reported.has(q.ackOf))
          .map((q) => encodeRequest(q.message));
        conn.reported.clear();
        // The client's serializer passes encoded messages through as they are.
        batchRuns(queued, MAX_BATCH_MESSAGES, MAX_REQUEST_BATCH_BYTES, (run) =>
          call.write(
            run.length === 1
              ? Buffer.from(
                  (run[0] as Uint8Array).buffer,
                  (run[0] as Uint8Array).byteOffset,
                  (run[0] as Uint8Array).byteLength,
                )
              : encodeRequestBatch(run),
          ),
        );
      },
      queued: [],
      reported: new Set(),
      flushTimer: undefined,
      welcomed: false,
      batches: false,
      takesStopGrants: false,
      helloStoppedGrants: false,
      grantsStopped: false,
      heartbeatTimer: undefined,
      sent: new Map(),
      lastAcked: undefined,
      sequence: 0n,
      beat: () => {
        if (conn.ended || !conn.welcomed || conn.saidGoodbye) return;
        if (unanswered()) {
          leaveIfUnanswered();
          return;
        }
        conn.sequence += 1n;
        conn.sent.set(conn.sequence, performance.now());
        conn.send({
          message: { case: "heartbeat", value: { sequence: conn.sequence, heldLeases: heldLeases() } },
        });
        // Looked at when this heartbeat has waited the bound, not at the next beat: that came
        // half an interval late, and with a grace of three intervals the leases with it.
        setTimeout(leaveIfUnanswered, UNANSWERED_HEARTBEATS * heartbeatMs + 1).unref();
      },
      pending: new Map(),
      progressPending: new Map(),
      ended: false,
      saidGoodbye: false,
      abandoned: undefined,
      unreachableSince: undefined,
      asking: false,
    };
    current = conn;
    /** Whether the oldest heartbeat of this stream is unanswered for longer than the bound. */
    const unanswered = () => {
      const oldest = conn.sent.values().next().value;
      return oldest !== undefined && performance.now() - oldest > UNANSWERED_HEARTBEATS * heartbeatMs;
    };
    /**
     * A server that stopped answering (hung, frozen, or a connection dead one
     * way) never ends the stream: leave it once the oldest heartbeat is
     * unanswered for 1.5 intervals, while the session and its leases can
     * still be resumed through the next address. Looked at again after the
     * I/O already received: after a stall of this process's own event loop,
     * timers run before the socket is read, and the answer may be waiting there.
     */
    const leaveIfUnanswered = () => {
      if (conn.ended || conn.abandoned !== undefined || !unanswered()) return;
      setImmediate(() => {
        if (conn.ended || conn.abandoned !== undefined || !unanswered()) return;
        conn.abandoned = `the server answered no heartbeat for ${Math.round(performance.now() - (conn.sent.values().next().value ?? 0))}ms`;
        call.cancel();
      });
    };

    /** Handles one server message; the messages of a batch come here one by one, in order. */
    const handle = (m: ConnectResponse["message"]) => {
      switch (m.case) {
        case "welcome": {
          conn.welcomed = true;
          conn.batches = m.value.acceptsBatches;
          conn.takesStopGrants = m.value.acceptsStopGrants;
          // A hello sent while closing set stop_grants: a server that takes it sends no more.
          // (close() called after the hello went out sends a StopGrants below instead.)
          conn.grantsStopped = conn.helloStoppedGrants && conn.takesStopGrants;
          attemptsWithoutWelcome = 0;
          if (m.value.gracePeriod) graceMs = durationMs(m.value.gracePeriod);
          sessionId = m.value.sessionId;
          for (const l of m.value.revoked) {
            const r = running.get(l.actionId);
            if (r && r.epoch === Number(l.epoch)) {
              // No longer the session's lease: its progress would be fenced (worker.proto).
              r.progressWaiting = undefined;
              r.progressSent = undefined;
              // Finished here already: the report is sent again below. If the server applied it
              // before the old stream broke (and so no longer counts the lease as held), it
              // accepts the repeat; otherwise it is fenced. Either way the agent learns which.
              if (r.report) continue;
              r.serverEnded = true;
              r.controller.abort(
                new LeaseLost("superseded", "the server revoked this lease when the agent reconnected"),
              );
            }
          }
          emit({
            type: "connected",
            sessionId: m.value.sessionId,
            resumed: m.value.resumed.map((l) => l.actionId),
            revoked: m.value.revoked.map((l) => l.actionId),
            address,
          });
          const every = m.value.heartbeatInterval ? durationMs(m.value.heartbeatInterval) : 2000;
          heartbeatMs = every;
          if (graceMs !== undefined && graceMs <= margin + every) {
            warnOnce(
              `selfFenceMarginMs (${margin} ms) leaves no guarantee to start work under: the server at ${address} grants a grace period of ${graceMs} ms with heartbeats every ${every} ms, and a grant starts only while the guarantee (at most the grace period less the margin) outlasts the next heartbeat; grants are held unrun until revoked. Use a margin below ${graceMs - every} ms.`,
            );
          }
          // The first heartbeat goes out at once: its ack renews the guarantee that
          // may have run low while the stream was down.
          conn.beat();
          conn.heartbeatTimer = setInterval(conn.beat, every);
          // Progress and reports that could not be answered on the previous stream, each
          // lease's progress first (sendReport sends it before the report).
          for (const r of running.values()) {
            const lost = r.progressSent;
            if (lost && lost.conn !== conn) {
              // Sent on a stream that ended before its answer: it may not have been applied.
              r.progressSent = undefined;
              if (!r.serverEnded)
                r.progressWaiting = coalesce(lost.progress, r.progressWaiting ?? lost.progress);
            }
            if (r.report) sendReport(conn, r);
            else sendProgress(r, false);
          }
          if (closing) {
            stopGrants(conn);
            finishClose(conn);
          }
          break;
        }
        case "heartbeatAck": {
          const { sequence } = m.value;
          const sentAt =
            conn.sent.get(sequence) ??
            (conn.lastAcked?.sequence === sequence ? conn.lastAcked.sentAt : undefined);
          if (sentAt === undefined) break;
          for (const seq of conn.sent.keys()) if (seq <= sequence) conn.sent.delete(seq);
          conn.lastAcked = { sequence, sentAt };
          lastAckAt = performance.now();
          lastAckUnreachable = m.value.databaseUnreachable;
          const remaining = m.value.remaining ? durationMs(m.value.remaining) : 0;
          deadline = Math.max(deadline, sentAt + remaining - margin);
          armFence();
          const onGuarantee = options.onGuarantee;
          if (onGuarantee) observe("onGuarantee", () => onGuarantee(deadline - performance.now()));
          tellDatabase(conn.address, !m.value.databaseUnreachable);
          if (!m.value.databaseUnreachable) conn.unreachableSince = undefined;
          else {
            const now = performance.now();
            conn.unreachableSince ??= now;
            if (
              addresses.length > 1 &&
              !conn.asking &&
              now - conn.unreachableSince >= UNREACHABLE_HEARTBEATS * heartbeatMs &&
              now - askedAt >= ASK_AGAIN_HEARTBEATS * heartbeatMs
            )
              leaveIfAnotherServes(conn);
          }
          startWaiting();
          break;
        }
        case "grant":
          startAction(conn, m.value);
          break;
        case "revoke": {
          const r = running.get(m.value.actionId);
          if (r && r.epoch === Number(m.value.epoch)) {
            const reason = REVOKE_NAMES[m.value.reason] ?? "revoked";
            emit({ type: "revoked", actionId: r.actionId, epoch: r.epoch, reason });
            // Even when something else stopped the handler first (a self-fence, a cancel).
            if (SERVER_ENDED.has(reason)) r.serverEnded = true;
            if (reason === "collect_outputs") {
              // Not a loss: the lease stays valid while the handler saves its outputs.
              if (!r.stop.aborted) r.stop.abort(new LeaseLost(reason, m.value.message || "stop and save"));
            } else if (!r.controller.aborted)
              r.controller.abort(new LeaseLost(reason, m.value.message || `lease revoked (${reason})`));
            // Only a lease the server ended is forgotten with its report unanswered; after any other
            // revoke (a reason this agent does not know included: taken as a cancel, worker.proto)
            // the report on its way lets go, and is sent again if the server could not apply it.
            else if (r.report && SERVER_ENDED.has(reason)) forget(r);
          }
          break;
        }
        case "reportResult": {
          const progressOf = conn.progressPending.get(m.value.reportId);
          if (progressOf) {
            conn.progressPending.delete(m.value.reportId);
            const sent = progressOf.progressSent;
            if (sent?.reportId !== m.value.reportId) break;
            progressOf.progressSent = undefined;
            if (m.value.rejectReason === 4 /* UNAVAILABLE */) {
              // Not applied: it waits again (unless a newer call replaced it), and goes with the
              // next report, the next stream, or shortly.
              progressOf.progressWaiting = coalesce(
                sent.progress,
                progressOf.progressWaiting ?? sent.progress,
              );
              const retry = setTimeout(() => {
                retries.delete(retry);
                if (running.get(progressOf.actionId) === progressOf) sendProgress(progressOf, false);
              }, 500);
              retry.unref();
              retries.add(retry);
            } else sendProgress(progressOf, false);
            break;
          }
          const r = conn.pending.get(m.value.reportId);
          if (!r) break;
          conn.pending.delete(m.value.reportId);
          const report = r.report;
          if (
            m.value.rejectReason === 2 /* INVALID */ &&
            (report?.kind === "succeeded" || (report?.kind === "failed" && !report.refused)) &&
            running.get(r.actionId) === r
          ) {
            // The server's limits differ from the ones this agent fitted the report to (another
            // version): the lease is still held, and the same report would be refused again. The
            // action fails with the server's reason instead; nothing re-runs it.
            r.report = {
              kind: "failed",
              message: cutToFit(
                `the server refused this action's ${report.kind === "succeeded" ? "output" : "failure report"}: ${scrubNul(m.value.message)}`,
                MAX_FAILURE_MESSAGE,
              ),
              retryable: false,
              details: undefined,
              refused: true,
            };
            sendReport(conn, r);
            break;
          }
          if (m.value.rejectReason !== 4 /* UNAVAILABLE */) {
            // Accepted, fenced, invalid or not found: nothing more to say about this grant.
            forget(r);
            if (report && report.kind !== "dropped") {
              emit({
                type: "finished",
                actionId: r.actionId,
                epoch: r.epoch,
                outcome: report.kind,
                accepted: m.value.accepted,
                message: m.value.message,
              });
            }
            if (closing) finishClose(conn);
          } else {
            // UNAVAILABLE: the server could not apply it now; send it again shortly.
            // Unless a reconnect re-sent it already or the entry was replaced.
            const retry = setTimeout(() => {
              retries.delete(retry);
              const c = current;
              if (c && c === conn && running.get(r.actionId) === r && ![...c.pending.values()].includes(r)) {
                sendReport(c, r);
              }
            }, 500);
            retry.unref();
            retries.add(retry);
          }
          break;
        }
        case "drain":
          emit({ type: "drain", reason: m.value.reason });
          break;
        default:
          break;
      }
    };
    call.on("data", (response: ConnectResponse) => {
      const m = response.message;
      if (m.case !== "batch") {
        handle(m);
        return;
      }
      for (const inner of m.value.messages) {
        if (inner.message.case !== "batch" && inner.message.case !== "welcome") handle(inner.message);
      }
    });
    const onEnd = (error: Error | undefined) => {
      if (conn.ended) return;
      conn.ended = true;
      clearInterval(conn.heartbeatTimer);
      // Reports not written yet are sent again on the next stream, like those never answered.
      clearImmediate(conn.flushTimer);
      conn.queued.length = 0;
      conn.reported.clear();
      // A connection that never started HTTP/2 stays open in grpc-js after close(): end it too.
      closeWithPendingConnections(client.grpcClient);
      if (!conn.welcomed) attemptsWithoutWelcome += 1;
      // Ended by the server without an error: it closed the session on the goodbye.
      if (conn.saidGoodbye) {
        goodbyeConfirmed ||= error === undefined;
        closeDone?.();
      }
      if (closed || conn.saidGoodbye) return;
      // The fence timer keeps running: the deadline from the last ack still applies.
      addressIndex = anotherAddress(targets, addressIndex);
      const code = (error as { code?: unknown } | undefined)?.code;
      const reason = errorReasonOf(error);
      const takenOver = code === grpc.status.ABORTED && reason === "SESSION_TAKEN_OVER";
      // A hello refused because another process holds the session changed nothing there: try
      // again at the pace of refused credentials, soon at first (the other may be a predecessor
      // whose lost stream the server has not yet marked), then less and less often.
      const inUse = code === grpc.status.ALREADY_EXISTS && reason === "WORKER_ID_IN_USE";
      const refused = code === grpc.status.UNAUTHENTICATED || code === grpc.status.PERMISSION_DENIED || inUse;
      refusals = refused ? refusals + 1 : 0;
      let retryInMs = refused
        ? refusedDelayMs(refusals)
        : reconnectDelayMs({
            attempt: attemptsWithoutWelcome,
            initialMs: initialBackoff,
            maxMs: options.maxBackoffMs,
            graceMs,
          });
      if (takenOver || inUse) {
        // This agent never opens a second stream, so another process connected with this
        // worker id and took the session, its leases and its grants (or holds it, and this
        // agent's hello was refused): stop every handler at once and drop every lease, reports
        // included (worker.proto). After a takeover, let that process keep the session for a
        // grace period before trying again.
        const grace = graceMs ?? 10_000;
        if (takenOver) retryInMs = Math.max(retryInMs, grace + Math.random() * grace);
        dropAll("superseded", `another process connected as worker ${options.workerId} and took over`, {
          revokedEvents: false,
        });
        emit({ type: "taken_over", retryInMs });
      }
      if (code === grpc.status.ABORTED && reason === "SESSION_REAPED")
        dropAll("expired", "the server reaped this agent's session: its deadline passed unheard", {
          revokedEvents: true,
        });
      emit({ type: "disconnected", error: conn.abandoned ?? error?.message ?? "stream ended", retryInMs });
      reconnectTimer = setTimeout(connect, retryInMs);
    };
    call.on("error", (error) => onEnd(error));
    call.on("end", () => onEnd(undefined));
    conn.send({
      message: {
        case: "hello",
        value: {
          workerId: options.workerId,
          cluster: options.cluster,
          capacity: capacity + prefetch,
          labels: { ...(options.labels ?? {}) },
          heldLeases: heldLeases(),
          agentVersion: options.agentVersion ?? `leasehold-agent-sdk ${versionText()}`,
          instanceId,
          acceptsBatches: true,
          stopGrants: closing,
        },
      },
    });
    conn.helloStoppedGrants = closing;
    // With one address there is nowhere else to go: a server that is merely slow to set up the
    // connection (TLS handshakes of thousands of agents after a restart) is waited for, up to
    // SETUP_BOUND_MS, and the probe's clock starts once HTTP/2 is up; otherwise every agent would
    // leave at 1.5 intervals and come back with a new handshake, feeding the storm.
    const oneAddress = new Set(targets.map((t) => t.address)).size === 1;
    const setupStartedAt = performance.now();
    /** Whether the connection is up; if not, waits for it (or leaves past the bound) and probes then. */
    function connectionReady(): boolean {
      const channel = client.grpcClient.getChannel();
      const state = channel.getConnectivityState(true);
      if (state === grpc.connectivityState.READY) return true;
      const waitedMs = performance.now() - setupStartedAt;
      if (waitedMs >= SETUP_BOUND_MS) {
        conn.abandoned = `the server did not set up the connection (HTTP/2) within ${Math.round(waitedMs)}ms`;
        call.cancel();
        return false;
      }
      // Looked at again shortly, on the steady clock: grpc-js's watchConnectivityState takes a wall
      // clock deadline, which a clock stepped back (NTP, a resumed VM) would turn into a busy loop.
      setTimeout(probeUntilWelcome, SETUP_POLL_MS).unref();
      return false;
    }
    probeUntilWelcome();

    /**
     * Before the welcome, the rule on unanswered heartbeats does not apply
     * yet, and a server may rightly hold the hello for long (starting, or
     * waiting for its database). A hung one holds it forever, and HTTP/2
     * keepalive notices only after 15 s, past a 10 s grace, or never: a
     * peer that accepts the TCP connection but never starts HTTP/2 (a
     * middlebox with a hung backend, a frozen server) leaves grpc-js waiting
     * for its SETTINGS without a bound, and keepalive pings start only after
     * them. So ask this connection's server for its health every heartbeat
     * interval, and leave it when an answer takes longer than the bound on
     * heartbeat acks: for another address, or, with one address, for a new
     * connection to it after the backoff. Any answer, NOT_SERVING too, means
     * it is alive.
     */
    function probeUntilWelcome(): void {
      if (conn.ended || conn.welcomed || conn.abandoned !== undefined) return;
      if (oneAddress && !connectionReady()) return;
      const intervalMs = heartbeatMs > 0 ? heartbeatMs : DEFAULT_HEARTBEAT_MS;
      const sentAt = performance.now();
      void answersOnConnection(client.grpcClient, UNANSWERED_HEARTBEATS * intervalMs).then((answered) => {
        if (conn.ended || conn.welcomed || conn.abandoned !== undefined) return;
        const waitedMs = performance.now() - sentAt;
        if (answered) {
          setTimeout(probeUntilWelcome, Math.max(0, intervalMs - waitedMs)).unref();
          return;
        }
        conn.abandoned = `the server answered no health check for ${Math.round(waitedMs)}ms before welcoming the agent`;
        call.cancel();
      });
    }
  }

  /**
   * While closing, on a stream whose server takes StopGrants: asks for no more
   * grants (once), then gives back the grants that wait for a slot or a
   * guarantee, so that they run elsewhere now rather than after the goodbye.
   * Without StopGrants they wait for the goodbye: given back one by one, each
   * would free a slot for the server to fill again.
   */
  function stopGrants(conn: Connection): void {
    if (!closing || conn.ended || !conn.welcomed || conn.saidGoodbye) return;
    if (!conn.grantsStopped) {
      if (!conn.takesStopGrants) return;
      // Sent at once, ahead of the reports queued this turn: a completion the server read
      // first would have its freed slot filled in the same transaction.
      conn.send({ message: { case: "stopGrants", value: { reason: "agent shutting down" } } });
      conn.grantsStopped = true;
    }
    for (const r of running.values()) {
      if (r.start === undefined || r.report) continue;
      r.start = undefined;
      settle(r, { kind: "released", reason: "the agent is shutting down" });
    }
  }

  let closeDone: (() => void) | undefined;
  /** The server ended the stream without an error after the goodbye. */
  let goodbyeConfirmed = false;
  /**
   * Says goodbye once no handler runs and no report waits for its answer.
   * Grants that never started are left to the goodbye, which gives them back.
   */
  function finishClose(conn: Connection): void {
    if (!goodbyeDue || conn.ended || !conn.welcomed || conn.saidGoodbye) return;
    for (const r of running.values()) if (r.report ? r.report.kind !== "dropped" : !r.start) return;
    // Checkpoints and reports still waiting go first: the goodbye releases whatever is left, and
    // a checkpoint is handed to the next attempt only if it came before.
    for (const r of running.values()) sendProgress(r, true);
    conn.flush();
    conn.send({ message: { case: "goodbye", value: { reason: "agent shutting down" } } });
    conn.saidGoodbye = true;
    conn.call.end();
  }

  connect();

  let closingPromise: Promise<CloseResult> | undefined;
  /**
   * Set by close once the handlers are done (or past its waits): before, a report answered
   * meanwhile must not send the goodbye, with a handler superseded by a newer grant of its
   * action still stopping (it is not among the grants finishClose looks at).
   */
  let goodbyeDue = false;
  /** While close() waits for running handlers: ends that wait sooner, at `timeoutMs` from now. */
  let shortenDrain: ((timeoutMs: number) => void) | undefined;
  const close = (closeOptions: { timeoutMs?: number } = {}) => {
    const timeoutMs = closeOptions.timeoutMs ?? 30_000;
    if (closingPromise) {
      shortenDrain?.(timeoutMs);
      return closingPromise;
    }
    closingPromise = (async () => {
      // From here no grant starts: the ones waiting for a slot or a guarantee, and any that
      // arrive, are given back unrun: at once if the server takes StopGrants (see stopGrants),
      // else by the goodbye (see finishClose).
      closing = true;
      if (current) stopGrants(current);
      // Handlers superseded by a newer grant of their action are still work of this agent.
      const allSettled = Promise.all([...running.values(), ...superseded].map((r) => r.settled));
      await new Promise<void>((resolve) => {
        let endsAt = performance.now() + timeoutMs;
        let timer = setTimeout(resolve, timeoutMs);
        shortenDrain = (ms) => {
          if (performance.now() + ms >= endsAt) return;
          endsAt = performance.now() + ms;
          clearTimeout(timer);
          timer = setTimeout(resolve, ms);
        };
        const settled = () => {
          clearTimeout(timer);
          resolve();
        };
        allSettled.then(settled, settled);
      });
      shortenDrain = undefined;
      const stopped: { actionId: string; epoch: number }[] = [];
      for (const r of running.values()) {
        if (r.controller.aborted) continue;
        // A handler still running when the wait ended: stopped here, and its lease given back.
        if (!r.report && !r.start && !r.serverEnded) stopped.push({ actionId: r.actionId, epoch: r.epoch });
        r.controller.abort(new LeaseLost("closing", "the agent is shutting down"));
      }
      // Handlers that ignore their signal do not hold the agent hostage: release their leases anyway.
      let graceTimer: NodeJS.Timeout | undefined;
      await Promise.race([
        Promise.all([...running.values(), ...superseded].map((r) => r.settled)),
        new Promise<void>((r) => {
          graceTimer = setTimeout(r, 5000);
        }),
      ]);
      clearTimeout(graceTimer);
      const stillRunning: string[] = [];
      for (const r of running.values()) {
        if (!r.report && !r.start) {
          stillRunning.push(r.actionId);
          // A lease the server ended, or another process holds, is not this agent's to release.
          if (r.serverEnded) {
            settle(r, { kind: "dropped" });
            continue;
          }
          r.report = {
            kind: "released",
            reason: "the agent shut down while the handler ignored its abort signal",
          };
          if (current) sendReport(current, r);
        }
      }
      // Wait (bounded) for the server to answer the final reports, then for it to end the session
      // on our goodbye.
      goodbyeDue = true;
      await new Promise<void>((resolve) => {
        closeDone = resolve;
        const conn = current;
        // Never welcomed and no hello in flight: no session to end, and nothing to wait for.
        if (sessionId === undefined && (conn === undefined || conn.ended)) resolve();
        if (conn) finishClose(conn);
        // The server may have ended the stream on an earlier goodbye already.
        if (conn?.ended && conn.saidGoodbye) resolve();
        setTimeout(resolve, 5000).unref();
      });
      closed = true;
      clearTimeout(reconnectTimer);
      clearImmediate(startTimer);
      for (const t of retries) clearTimeout(t);
      const conn = current;
      if (conn) {
        clearInterval(conn.heartbeatTimer);
        clearTimeout(fenceTimer);
        fenceArmedFor = undefined;
        if (!conn.ended) {
          conn.flush();
          conn.ended = true;
          conn.call.end();
          closeWithPendingConnections(conn.client.grpcClient);
        }
      }
      return { goodbye: goodbyeConfirmed, stillRunning, stopped };
    })();
    return closingPromise;
  };

  return {
    get sessionId() {
      return sessionId;
    },
    get running() {
      return running.size;
    },
    close,
    [Symbol.asyncDispose]: () => close().then(() => {}),
  };
}

/**
 * The handler's span of a traced grant (its trace_parent set): a child of
 * the server's grant span, made with the process's global OpenTelemetry
 * tracer (a no-op one when the application registered none, which still
 * passes the context on). Undefined for an untraced grant: no work at all.
 */
function handlerSpan(grant: { actionId: string; epoch: bigint; attempt: number; traceParent: string }) {
  const parent = parseTraceParent(grant.traceParent);
  if (!parent) return undefined;
  const parentContext = trace.setSpanContext(ROOT_CONTEXT, parent);
  const span = trace.getTracer("leasehold/agent").startSpan(
    "leasehold.handle",
    {
      kind: SpanKind.CONSUMER,
      attributes: {
        "leasehold.action_id": grant.actionId,
        "leasehold.epoch": Number(grant.epoch),
        "leasehold.attempt": grant.attempt,
      },
    },
    parentContext,
  );
  const spanContext = trace.setSpan(parentContext, span);
  return {
    traceParent: span.isRecording() ? traceParentOf(span) : grant.traceParent,
    run: <T>(fn: () => T): T => context.with(spanContext, fn),
    end(report: PendingReport): void {
      span.setAttribute("leasehold.outcome", report.kind);
      if (report.kind === "failed") span.setStatus({ code: SpanStatusCode.ERROR, message: report.message });
      span.end();
    },
  };
}
