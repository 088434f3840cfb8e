import type { ActionHistory, HoldingSession } from "../store/queries/explain-action.js";
import type { Placement } from "../store/queries/queued-placement.js";
import type { ActionRecord, AttemptRecord } from "./action.js";
import type { EventRecord } from "./event.js";

/** A step names an error by its start: the whole of it is in the attempt (GetAction, ExplainAction). */
const STEP_TEXT_CHARS = 500;
const clip = (text: string): string =>
  text.length <= STEP_TEXT_CHARS ? text : `${text.slice(0, STEP_TEXT_CHARS)}… (${text.length} characters)`;

/** One step of an action's timeline. */
export interface TimelineStep {
  readonly at: Date;
  /** The lease epoch it is about; 0 for none (the submission). */
  readonly epoch: number;
  /** One sentence: what happened, who, which epoch, why. */
  readonly summary: string;
  /** The logged event it shows; absent for a heartbeat summary. */
  readonly event?: EventRecord;
}

/** An action's lease history, as ExplainAction answers it. */
export interface Explanation {
  readonly action: ActionRecord;
  readonly attempts: ActionHistory["attempts"];
  readonly timeline: readonly TimelineStep[];
  readonly truncated: boolean;
}

const iso = (d: Date) => d.toISOString();
const who = (actor: string) => actor || "the server";

/** Seconds between two instants, for sentences: "8.0 s". */
const seconds = (from: Date, to: Date) => `${((to.getTime() - from.getTime()) / 1000).toFixed(1)} s`;

/**
 * The timeline of `history`: its events in log order, each told in a
 * sentence, with one summary of each attempt's heartbeats placed at the last
 * one recorded. Pure: everything comes from `history`.
 */
export function explainHistory(history: ActionHistory): Explanation {
  const { attempts, now } = history;
  const byEpoch = new Map(attempts.map((a) => [a.attempt.epoch, a]));
  /** The attempt a session event belongs to: the one its session held at that moment. */
  const heldBy = (e: EventRecord) =>
    attempts.find(
      ({ attempt: t }) => t.sessionId === e.sessionId && t.startedAt <= e.at && e.at <= (t.endedAt ?? now),
    );

  const steps: TimelineStep[] = history.events.map((event) => {
    const epoch = event.epoch ?? heldBy(event)?.attempt.epoch ?? 0;
    return { at: event.at, epoch, summary: tell(event, byEpoch.get(epoch), history.action), event };
  });
  steps.forEach((step, i) => {
    if (step.event?.kind === "lease_resumed")
      steps[i] = { ...step, summary: resumedUntil(step, steps.slice(i + 1)) };
  });
  for (const { attempt, session } of attempts) {
    if (!session) continue;
    const heartbeats = heartbeatStep(attempt, session, now);
    // A running attempt's summary tells how it is now: last. An ended one's sits at its last
    // heartbeat, after its grant and before what happened at that instant or later.
    const granted = steps.findIndex((s) => s.event?.kind === "lease_granted" && s.epoch === attempt.epoch);
    const at = attempt.endedAt ? steps.findIndex((s, i) => i > granted && s.at >= heartbeats.at) : -1;
    steps.splice(at === -1 ? steps.length : at, 0, heartbeats);
  }
  // A queued action's last step is how it is now: why no worker was granted it.
  if (history.placement) steps.push(queuedStep(history.action, history.placement, now));
  return { action: history.action, attempts, timeline: steps, truncated: history.truncated };
}

/**
 * The summary of an attempt's heartbeats: when its session was last heard
 * while it held the lease. Renewals record that once per tick, so an attempt
 * shorter than a tick may have none recorded.
 */
function heartbeatStep(attempt: AttemptRecord, session: HoldingSession, now: Date): TimelineStep {
  const end = attempt.endedAt ?? now;
  const last = new Date(Math.min(session.lastHeardAt.getTime(), end.getTime()));
  const holder = `worker ${attempt.workerId} (session ${attempt.sessionId})`;
  const epoch = attempt.epoch;
  if (last < attempt.startedAt) {
    const summary = `heartbeats: none recorded from ${holder} while it held epoch ${epoch} (${seconds(attempt.startedAt, end)})`;
    return { at: attempt.startedAt, epoch, summary };
  }
  const summary = attempt.endedAt
    ? `heartbeats: ${holder} was last heard ${seconds(attempt.startedAt, last)} after the grant of epoch ${epoch}, at ${iso(last)}`
    : `heartbeats: ${holder} holds epoch ${epoch}, last heard ${seconds(last, now)} ago; its deadline is ${iso(session.deadline)}`;
  return { at: last, epoch, summary };
}

/**
 * `message` without its leading `prefix` (the part a sentence already says),
 * else `: message`: what follows "worker a5 released epoch 2" or "cancel
 * requested by alice-op", as ": ops-cleanup" or nothing.
 */
function rest(message: string, prefix: RegExp): string {
  const cut = message.replace(prefix, "");
  if (cut === message) return message ? `: ${message}` : "";
  return cut;
}

/** One event in a sentence, with the attempt it concerns when there is one. */
function tell(
  e: EventRecord,
  held: { attempt: AttemptRecord; session: HoldingSession | undefined } | undefined,
  action: ActionRecord,
) {
  const worker = `worker ${e.workerId ?? held?.attempt.workerId ?? "?"}`;
  const session = e.sessionId ?? held?.attempt.sessionId;
  const epoch = e.epoch ?? held?.attempt.epoch;
  switch (e.kind) {
    case "action_submitted":
      return `submitted by ${who(e.actor)} to cluster ${e.cluster ?? "?"}`;
    case "lease_granted":
      return `epoch ${epoch} granted to ${worker} (session ${session})`;
    case "lease_resumed":
      // Not "nothing re-runs": a worker that self-fenced meanwhile still lists the lease until
      // its release is answered. resumedUntil says so when a later step ended the lease.
      if (e.details?.late === true)
        return `epoch ${epoch} resumed by ${worker}, reconnected after its deadline: its session was kept while its cluster was partitioned (or its server could not renew it) (session ${session})`;
      return `epoch ${epoch} resumed by ${worker}, reconnected in time (session ${session})`;
    case "stream_lost": {
      const deadline = typeof e.details?.deadline === "string" ? new Date(e.details.deadline) : undefined;
      const grace = deadline ? `, in grace until ${iso(deadline)} (${seconds(e.at, deadline)})` : "";
      // Ended by its server to spread the streams over the processes: the worker reconnects.
      if (e.details?.reason === "REBALANCING")
        return `stream of ${worker} ended to rebalance, for it to reconnect to another server${grace}; epoch ${epoch} waits for it to come back`;
      return `stream of ${worker} lost${grace}; epoch ${epoch} waits for it to come back`;
    }
    case "session_resumed":
      if (e.details?.late === true)
        return `${worker} reconnected after its deadline; session ${session}, kept while its cluster was partitioned (or its server could not renew it), resumed`;
      return `${worker} reconnected within the grace period; session ${session} resumed`;
    case "session_taken_over":
      return `a new stream of ${worker} took session ${session} over; the older stream was closed`;
    case "session_reaped": {
      if (endedByRestart(e, held?.session))
        return `session ${session} of ${worker} ended: a new process of the worker connected while the stream of this one was gone`;
      const host = silentServer(e);
      return host
        ? `session ${session} of ${worker} reaped at its deadline: ${host}`
        : `session ${session} of ${worker} reaped: its deadline passed with no heartbeat`;
    }
    case "session_closed":
      return `${worker} said goodbye; session ${session} closed`;
    case "lease_expired":
      return `epoch ${epoch} expired: ${expiryCause(e, held)}; ${afterExpiry(e)}`;
    case "lease_revoked":
      return `epoch ${epoch} revoked from ${worker}: ${e.message}`;
    case "lease_released":
      return `${worker} released epoch ${epoch}${rest(e.message, /^worker \S+ released the lease/)}`;
    case "report_fenced":
      return `fenced: ${e.message}${e.actor ? ` (sent as ${e.actor})` : ""}`;
    case "action_succeeded":
      return `completed by ${worker} under epoch ${epoch}: accepted${e.actor ? ` (reported as ${e.actor})` : ""}`;
    case "action_failed":
      // The action's reason says why it ended for good, as GetAction shows it: the failures
      // that used up max_attempts, or an error not worth retrying, with the last error.
      if (action.state === "FAILED" && action.failureReason.startsWith("failed "))
        return `action ${clip(action.failureReason)}${epoch ? ` (epoch ${epoch}, ${worker})` : ""}`;
      return `${e.message}${epoch ? ` (epoch ${epoch}, ${worker})` : ""}`;
    case "action_retry_scheduled": {
      // The message says when the retry is due; the attempt's row keeps its error, whole (a step
      // holds its start: forty errors of 120 KB each would not fit one answer twice).
      const error = held?.attempt.error?.message && clip(held.attempt.error.message);
      const retry = /; (retry after .*)$/.exec(e.message)?.[1] ?? "it goes back to the queue";
      return `attempt of epoch ${epoch} failed on ${worker}${error ? `: ${error}` : ""}; ${retry}`;
    }
    case "action_cancelled":
      return `${e.message}${epoch ? ` (epoch ${epoch}, ${worker})` : ""}`;
    case "action_cancel_requested":
      return `cancel requested by ${who(e.actor)}${rest(e.message, /^cancel requested/)}`;
    case "cluster_expiries_resumed":
      // Its message says "an operator"; the event's actor is the one who did.
      return e.actor && e.message.startsWith("an operator ")
        ? `operator ${e.actor} ${e.message.slice("an operator ".length)}`
        : `${e.message}${e.actor ? ` (by ${e.actor})` : ""}`;
    default:
      return e.message;
  }
}

/**
 * The end of a resume's sentence: the lease still holds, unless a later step
 * ended it. A worker that stopped the work while it was away (it self-fenced:
 * its guarantee ran out before it reconnected) resumes the lease only to
 * release it, and the action runs again under a new epoch; "still holds"
 * would then be the opposite of what happened.
 */
function resumedUntil(resumed: TimelineStep, later: readonly TimelineStep[]): string {
  const epoch = resumed.epoch;
  for (const step of later) {
    const kind = step.event?.kind;
    const after = `${seconds(resumed.at, step.at)} later, at ${iso(step.at)}`;
    if (step.epoch === epoch && kind === "lease_released")
      return `${resumed.summary}, but the worker released it ${after}, so the lease no longer holds`;
    if (step.epoch === epoch && kind === "lease_expired")
      return `${resumed.summary}; the lease held until it expired ${after}`;
    if (step.epoch > epoch && kind === "lease_granted")
      return `${resumed.summary}; the lease ended before epoch ${step.epoch} was granted ${after}`;
    if (
      step.epoch === epoch &&
      (kind === "action_succeeded" || kind === "action_failed" || kind === "action_cancelled")
    )
      return `${resumed.summary}; the lease held until the action ended ${after}`;
  }
  return `${resumed.summary}: the lease still holds`;
}

/**
 * Whether a reap's event (session_reaped or lease_expired) ended its session
 * because a new process of the worker said hello while the session's stream
 * was gone, rather than at its deadline. The event's `details.cause` says so
 * (ReapCause); older events have none, and then the session's row does: only
 * a restart reaps a session before its deadline.
 */
function endedByRestart(e: EventRecord, session: HoldingSession | undefined): boolean {
  const cause = e.details?.cause;
  if (cause === "restarted") return true;
  if (cause === "deadline" || cause === "server_silent") return false;
  return session?.endReason === "reaped" && session.endedAt !== null && session.endedAt < session.deadline;
}

/**
 * A reap's event of cause `server_silent` (ReapCause) told as its cause:
 * the session's server process stopped renewing it; undefined for another
 * cause. The worker was connected to that process, and may well have kept
 * heartbeating it: its silence is not what the record shows.
 */
function silentServer(e: EventRecord): string | undefined {
  if (e.details?.cause !== "server_silent") return undefined;
  const server = typeof e.details.server_id === "string" ? e.details.server_id : "?";
  const until =
    typeof e.details.server_alive_until === "string" ? iso(new Date(e.details.server_alive_until)) : "?";
  return `its server process ${server} stopped renewing it (its liveness mark ran out at ${until}: it lost its database, hung or died) while the worker was connected to it`;
}

/** What became of the action when its lease expired, from the event's `details.state` (events written before it have none). */
function afterExpiry(e: EventRecord): string {
  switch (e.details?.state) {
    case "CANCELLED":
      return "the action is cancelled, as was asked while it was leased";
    case "FAILED":
      return "the action failed: its system-retry budget is spent";
    default:
      return "the action goes back to the queue";
  }
}

/** Why a lease expired, from its event and its session's row. */
function expiryCause(
  e: EventRecord,
  held: { attempt: AttemptRecord; session: HoldingSession | undefined } | undefined,
): string {
  const host = silentServer(e);
  if (host) {
    const session = held?.session;
    const holder = held
      ? `worker ${held.attempt.workerId}'s session ${held.attempt.sessionId}`
      : "its session";
    return session
      ? `${holder} passed its deadline ${iso(session.deadline)} (last renewed at ${iso(session.lastHeardAt)}): ${host}`
      : `${holder} passed its deadline: ${host}`;
  }
  const restarted = endedByRestart(e, held?.session);
  if (!held?.session) {
    return restarted
      ? "a new process of its worker connected while its session's stream was gone"
      : "its session's deadline passed";
  }
  const { attempt, session } = held;
  const holder = `worker ${attempt.workerId}'s session ${attempt.sessionId}`;
  const lost = session.streamLostAt
    ? `lost its stream at ${iso(session.streamLostAt)}`
    : `was last heard at ${iso(session.lastHeardAt)}`;
  if (restarted) {
    return `${holder} ${lost} and a new process of the worker connected at ${iso(e.at)}, ending the session instead of resuming it`;
  }
  return `${holder} ${lost} and did not come back before its deadline ${iso(session.deadline)}`;
}

/** Selector labels a sentence names before "and N more"; their values are cut to {@link LABEL_CHARS}. */
const LABELS_SHOWN = 4;
const LABEL_CHARS = 64;

const cut = (text: string) => (text.length > LABEL_CHARS ? `${text.slice(0, LABEL_CHARS)}…` : text);
const pair = (key: string, value: string) => `${cut(key)}=${cut(value)}`;
/** "a, b and c". */
const and = (items: readonly string[]) =>
  items.length <= 1 ? (items[0] ?? "") : `${items.slice(0, -1).join(", ")} and ${items.at(-1)}`;
/** At most `max` of `items`, then "and N more". */
const some = (items: readonly string[], max: number) =>
  items.length <= max ? and(items) : `${items.slice(0, max).join(", ")} and ${items.length - max} more`;
const plural = (n: number, one: string, many: string) => (n === 1 ? one : many);

/** The selector as "gpu=yes, zone=b", by key, at most {@link LABELS_SHOWN} of them. */
function labelsText(selector: Readonly<Record<string, string>>): string {
  const pairs = Object.keys(selector)
    .sort()
    .map((k) => pair(k, selector[k] ?? ""));
  const shown = pairs.slice(0, LABELS_SHOWN).join(", ");
  return pairs.length > LABELS_SHOWN ? `${shown} and ${pairs.length - LABELS_SHOWN} more` : shown;
}

/**
 * The step that ends a queued action's timeline: why it is not granted now,
 * from where it could go (`placement`, read with the history) and its retry
 * backoff. Bounded: counts, and at most three workers by name.
 */
export function queuedStep(action: ActionRecord, placement: Placement, now: Date): TimelineStep {
  const backoff =
    action.notBefore > now
      ? `its retry backoff lasts until ${iso(action.notBefore)} (${seconds(now, action.notBefore)} from now)`
      : undefined;
  const where = placementText(action, placement, backoff !== undefined);
  return { at: now, epoch: 0, summary: `not granted now: ${backoff ? `${backoff}; then ${where}` : where}` };
}

/** Why no worker of the action's cluster takes it now, or which ones are free to. */
function placementText(action: ActionRecord, p: Placement, waiting: boolean): string {
  const cluster = `cluster ${action.cluster}`;
  if (p.connected === 0) {
    const grace =
      p.inGrace > 0
        ? ` (${p.inGrace} lost ${plural(p.inGrace, "its stream and gets", "their streams and get")} no grants until ${plural(p.inGrace, "it reconnects", "they reconnect")})`
        : "";
    return `no worker of ${cluster} is connected${grace}`;
  }
  const selector = action.labelSelector;
  const required = labelsText(selector);
  const { draining, stopped, busy, free } = p.fit;
  const fitting = (draining?.n ?? 0) + (stopped?.n ?? 0) + (busy?.n ?? 0) + (free?.n ?? 0);
  if (fitting === 0) return noneFits(p, cluster, selector, required);

  const who =
    Object.keys(selector).length === 0
      ? `${p.connected} connected ${plural(p.connected, "worker", "workers")} of ${cluster}`
      : `${fitting} connected ${plural(fitting, "worker", "workers")} of ${cluster} ${plural(fitting, "carries", "carry")} its labels (${required})`;
  if (free) {
    const names = p.free.map(
      (f) => `worker ${f.workerId} (${f.freeSlots} free ${plural(f.freeSlots, "slot", "slots")})`,
    );
    const listed =
      free.n > names.length ? `${names.join(", ")} and ${free.n - names.length} more` : and(names);
    const here = p.free.some((f) => f.hostedHere);
    const due = waiting
      ? "it goes to one of them once its backoff ends"
      : here
        ? "a grant is due at the next claim"
        : // Whether a worker hosted elsewhere stopped taking grants is known to its server only.
          "a grant is due at their server's next claim, unless they stopped taking grants (which only their server knows)";
    return `${who}; with a free slot: ${listed}; ${due}`;
  }
  const kinds = [
    draining && (draining.n === 1 ? `worker ${draining.first} is draining` : `${draining.n} are draining`),
    stopped &&
      (stopped.n === 1
        ? `worker ${stopped.first} has stopped taking grants`
        : `${stopped.n} have stopped taking grants`),
    busy &&
      (busy.n === 1 ? `worker ${busy.first} has all its slots busy` : `${busy.n} have all their slots busy`),
  ].filter((k): k is string => typeof k === "string");
  const then = busy
    ? "it waits its turn for a free slot"
    : "it waits for a worker that can take it to connect";
  return `${who}: ${and(kinds)}; ${then}`;
}

/** Why none of the connected workers carries the selector: labels no one carries, or the nearest misses. */
function noneFits(
  p: Placement,
  cluster: string,
  selector: Readonly<Record<string, string>>,
  required: string,
): string {
  const head =
    p.connected === 1
      ? `the one connected worker of ${cluster} does not carry the labels it requires (${required})`
      : `none of the ${p.connected} connected workers of ${cluster} carries the labels it requires (${required})`;
  const missing = p.carried.filter((c) => c.workers === 0).map((c) => pair(c.key, c.value));
  if (missing.length > 0 && p.connected > 1) return `${head}: none carries ${some(missing, LABELS_SHOWN)}`;
  const near = p.closest.map(({ workerId, labels }) => {
    const lacks = Object.keys(selector)
      .sort()
      .filter((k) => labels[k] !== selector[k])
      .map((k) => {
        const has = labels[k];
        return `${pair(k, selector[k] ?? "")} (${has === undefined ? `has no ${cut(k)}` : `has ${pair(k, has)}`})`;
      });
    return `worker ${workerId} lacks ${some(lacks, 2)}`;
  });
  return `${head}${p.connected === 1 ? ": " : "; closest: "}${near.join("; ")}`;
}
