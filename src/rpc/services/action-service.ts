import { create, type DescMessage, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import type * as grpc from "@grpc/grpc-js";
import { type Attributes, SpanKind, SpanStatusCode } from "@opentelemetry/api";
import type { Logger } from "pino";
import type { Access } from "../../auth/access.js";
import { Code, LeaseholdError, quote } from "../../errors.js";
import {
  ActionSchema,
  ActionService,
  ActionState,
  ActionView,
  AttemptOutcome,
  type AttemptSchema,
  CancelActionResponseSchema,
  ExplainActionResponseSchema,
  GetActionResponseSchema,
  ListActionsResponseSchema,
  type SubmitActionRequest,
  SubmitActionResponseSchema,
  SubmitActionsRequestSchema,
  WatchActionResponseSchema,
} from "../../gen/leasehold/v1/action_pb.js";
import { requestHash } from "../../request-hash.js";
import { NO_TRACING, type Tracing, traceParentOf } from "../../telemetry.js";
import {
  ACTION_DEFAULTS,
  type ActionRecord,
  type AttemptRecord,
  type ActionState as DomainState,
  type JsonObject,
  type NewAction,
} from "../../work/action.js";
import type { ActionService as Actions, SubmitResult } from "../../work/action-service.js";
import { pageSize } from "../../work/page-token.js";
import { decodeSubmitActionsRequest, encodeBasicSubmitResults } from "../action-wire.js";
import { EncodedResponse, type FastDecoders } from "../adapter.js";
import { actionParts, attemptParts, eventParts, fitAnswer } from "../answer-budget.js";
import { encodedSize } from "../encoded-size.js";
import { type Turns, turns } from "../large-calls.js";
import { requestValidator } from "../request-validator.js";
import { bind, type ServiceBinding } from "../server.js";
import {
  checkFilterName,
  checkLabels,
  checkLength,
  checkName,
  durationField,
  requireId,
  Violations,
} from "../validate.js";
import { toProtoEvent } from "./event-service.js";

const DAY_MS = 24 * 60 * 60 * 1000;

const validateSubmitActions = requestValidator(SubmitActionsRequestSchema);

/**
 * A bulk submit is decoded without protobuf-es (action-wire.ts); the request
 * validator still runs, and a request it refuses is decoded again the
 * ordinary way, which answers it as before.
 */
export const ACTION_FAST_DECODERS: FastDecoders = {
  submitActions(bytes) {
    const request = decodeSubmitActionsRequest(bytes);
    return request && validateSubmitActions(request) === undefined ? request : undefined;
  },
};

/**
 * The ActionService handlers over the domain's action service. Rights are
 * checked in the cluster of the action a call touches (loaded first where the
 * request names only its id); the adapter checked the method's right exists
 * somewhere already.
 */
/** `log` gets an audit line for each cancel (who cancelled what); none when omitted (tests). */
export function actionServiceBinding(
  actions: Actions,
  tracing: Tracing = NO_TRACING,
  log?: Logger,
): ServiceBinding {
  return bind(ActionService, {
    async submitAction(request, ctx) {
      const action = toNewAction(request);
      ctx.access.require("action.submit", action.cluster);
      return traced(
        tracing,
        "leasehold.submit",
        ctx.metadata,
        { "leasehold.cluster": action.cluster, "leasehold.principal": ctx.access.actor },
        async (trace, note) => {
          const { action: submitted, created } = await actions.submit(
            { ...action, ...trace },
            ctx.access.actor,
          );
          // created false: the request id was used before, and this is the action it made then.
          note({ "leasehold.action_id": submitted.id, "leasehold.created": created });
          return { action: toProtoAction(submitted), created };
        },
      );
    },
    async submitActions(request, ctx) {
      const toProto = viewOf(request.view);
      const full = request.view !== ActionView.BASIC;
      // Refused before anything is queued (see ANSWER_BYTES_PER_ITEM).
      if (full)
        refuseUnlessFits(
          ctx.requestBytes +
            request.actions.length * (ANSWER_BYTES_PER_ITEM + Buffer.byteLength(ctx.access.actor)),
          "up to ",
        );
      const paced = turns();
      const items = await toNewActions(request.actions, paced);
      // Every distinct cluster once; the first item naming a refused cluster is the one reported.
      const checked = new Set<string>();
      items.forEach((item, i) => {
        if (checked.has(item.cluster)) return;
        checked.add(item.cluster);
        try {
          ctx.access.require("action.submit", item.cluster);
        } catch (error) {
          throw atItem(error, `actions[${i}].cluster`);
        }
      });
      const attributes = { "leasehold.actions": items.length, "leasehold.principal": ctx.access.actor };
      return traced(tracing, "leasehold.submit_many", ctx.metadata, attributes, async (trace, note) => {
        const traced = trace.traceParent ? items.map((item) => ({ ...item, ...trace })) : items;
        const encodeFull = (results: readonly SubmitResult[]) =>
          encodeResultsInTurns(results, (r) => ({ action: toProto(r.action), created: r.created }), paced);
        // An item whose request id was used before is answered with the action it made, as it is
        // now (its output, its last error): nothing in the request bounds that. The answer is
        // made before the commit, and refused with it.
        let answer: Buffer | undefined;
        const check = async (results: readonly SubmitResult[]) => {
          const bytes = await encodeFull(results);
          refuseUnlessFits(bytes.byteLength, "");
          answer = bytes;
        };
        const results = await actions.submitMany(traced, ctx.access.actor, full ? check : undefined);
        // The ids of the first hundred (a span is no place for ten thousand), and how many were new.
        note({
          "leasehold.action_ids": results.slice(0, 100).map((r) => r.action.id),
          "leasehold.created": results.filter((r) => r.created).length,
        });
        const encoded = full ? (answer ?? (await encodeFull(results))) : encodeBasicSubmitResults(results);
        if (encoded) return new EncodedResponse(encoded);
        return { results: results.map(({ action, created }) => ({ action: toProto(action), created })) };
      });
    },
    async getAction(request, ctx) {
      const id = requireId("action_id", request.actionId);
      const { action, attempts } = await actions.get(id);
      readable(ctx.access, action, id);
      const whole = { action: toProtoAction(action), attempts: attempts.map(toProtoAttempt) };
      const { answer, omitted, over } = fitAnswer(GetActionResponseSchema, whole, () => [
        ...attemptParts(whole.attempts, (i) => `attempts[${i}]`),
        ...actionParts(whole.action, "action"),
        ...attemptParts(whole.attempts, (i) => `attempts[${i}]`, "message"),
      ]);
      if (over) throw tooLargeToAnswer(action.id, attempts.length);
      return { ...answer, omitted };
    },
    async listActions(request, ctx) {
      ctx.access.requireListScope("action.read", request.cluster);
      checkFilterName("cluster", request.cluster);
      const state = request.state === ActionState.UNSPECIFIED ? undefined : stateName(request.state);
      const filter = {
        state,
        cluster: request.cluster || undefined,
        runId: request.runId || undefined,
        workerId: request.workerId || undefined,
      };
      const page = await actions.list(filter, pageSize(request.pageSize), request.pageToken, (a) =>
        encodedSize(ActionSchema, toProtoAction(a)),
      );
      const whole = { actions: page.items.map(toProtoAction), nextPageToken: page.nextPageToken };
      // A page of several actions is under PAGE_BYTES already (toPage): only one alone can be over.
      if (whole.actions.length !== 1) return whole;
      return fitActions(
        ListActionsResponseSchema,
        whole,
        whole.actions.map((action, i) => ({ at: `actions[${i}]`, action })),
      );
    },
    async cancelAction(request, ctx) {
      const actionId = requireId("action_id", request.actionId);
      const v = new Violations();
      checkLength(v, "reason", request.reason, 1024);
      v.throwIfAny();
      const { action: current } = await actions.get(actionId);
      readable(ctx.access, current, actionId);
      ctx.access.requireOwned("action.cancel", current.cluster, current.createdBy);
      const cancelled = await actions.cancel(actionId, request.reason, ctx.access.actor);
      log?.info(
        {
          principal: ctx.access.actor,
          actionId,
          cluster: current.cluster,
          reason: request.reason,
          state: cancelled.state,
        },
        "audit: cancel action",
      );
      const whole = { action: toProtoAction(cancelled) };
      return fitActions(CancelActionResponseSchema, whole, [{ at: "action", action: whole.action }]);
    },
    async cancelActions(request, ctx) {
      const v = new Violations();
      checkName(v, "cluster", request.cluster);
      checkLength(v, "reason", request.reason, 1024);
      if (request.limit < 0 || request.limit > MAX_CANCEL)
        v.add("limit", `must be 1–${MAX_CANCEL}, or 0 for ${MAX_CANCEL} (got ${request.limit})`);
      const named = request.state === ActionState.UNSPECIFIED ? undefined : stateName(request.state);
      const state = named === "QUEUED" || named === "LEASED" ? named : undefined;
      if (named !== state)
        v.add(
          "state",
          `must be QUEUED or LEASED, or UNSPECIFIED for both: only those can be cancelled (got ${named})`,
        );
      const ids = new Set<string>();
      request.actionIds.forEach((id, i) => {
        if (id.trim() === "") v.add(`action_ids[${i}]`, "is empty");
        else if (ids.has(id)) v.add(`action_ids[${i}]`, `repeats ${quote(id)}`);
        ids.add(id);
      });
      if (!request.runId && ids.size === 0 && !request.all)
        v.add(
          "all",
          "must be true to cancel every action of the cluster; otherwise narrow the call with run_id or action_ids",
        );
      v.throwIfAny();
      const { cluster, runId } = request;
      // The caller's own actions, unless it may cancel anyone's: others' are not matched, not refused.
      let createdBy: string | undefined;
      if (!ctx.access.can("action.cancel.any", cluster)) {
        ctx.access.require("action.cancel.own", cluster);
        createdBy = ctx.access.actor;
      }
      const outcome = await actions.cancelMatching(
        {
          cluster,
          runId: runId || undefined,
          actionIds: ids.size > 0 ? [...ids] : undefined,
          state,
          createdBy,
        },
        request.limit || MAX_CANCEL,
        request.reason,
        ctx.access.actor,
      );
      log?.info(
        {
          principal: ctx.access.actor,
          cluster,
          runId: runId || undefined,
          actionIds: ids.size > 0 ? [...ids] : undefined,
          state,
          reason: request.reason,
          cancelled: outcome.cancelled.length,
          cancelRequested: outcome.cancelRequested.length,
          more: outcome.more,
        },
        "audit: cancel actions",
      );
      return {
        cancelledIds: [...outcome.cancelled],
        cancelRequestedIds: outcome.cancelRequested.map((a) => a.id),
        more: outcome.more,
      };
    },
    async explainAction(request, ctx) {
      const id = requireId("action_id", request.actionId);
      // The right first, on the action's row: the history is the expensive read.
      readable(ctx.access, (await actions.get(id)).action, id);
      const explained = await actions.explain(id);
      const whole = {
        action: toProtoAction(explained.action),
        attempts: explained.attempts.map(({ attempt, session }) => ({
          attempt: toProtoAttempt(attempt),
          ...(session && {
            sessionLastHeardTime: timestampFromDate(session.lastHeardAt),
            sessionDeadline: timestampFromDate(session.deadline),
            ...(session.streamLostAt && { streamLostTime: timestampFromDate(session.streamLostAt) }),
            ...(session.endedAt && { sessionEndTime: timestampFromDate(session.endedAt) }),
            sessionEndReason: session.endReason ?? "",
          }),
        })),
        timeline: explained.timeline.map((step) => ({
          time: timestampFromDate(step.at),
          epoch: BigInt(step.epoch),
          summary: step.summary,
          ...(step.event && { event: toProtoEvent(step.event) }),
        })),
        truncated: explained.truncated,
      };
      const { answer, omitted, over } = fitAnswer(ExplainActionResponseSchema, whole, () => [
        ...attemptParts(
          whole.attempts.map((a) => a.attempt),
          (i) => `attempts[${i}].attempt`,
        ),
        ...eventParts(whole.timeline),
        ...actionParts(whole.action, "action"),
        ...attemptParts(
          whole.attempts.map((a) => a.attempt),
          (i) => `attempts[${i}].attempt`,
          "message",
        ),
      ]);
      if (over) throw tooLargeToAnswer(id, whole.attempts.length);
      return { ...answer, omitted };
    },
    async *watchAction(request, ctx) {
      let checked = false;
      const id = requireId("action_id", request.actionId);
      for await (const action of actions.watch(id, ctx.signal)) {
        // The first item is the action as it is now: checked before anything is sent.
        if (!checked) readable(ctx.access, action, id);
        checked = true;
        const whole = { action: toProtoAction(action) };
        yield fitActions(WatchActionResponseSchema, whole, [{ at: "action", action: whole.action }]);
      }
    },
  });
}

/** Most actions one CancelActions call cancels. */
const MAX_CANCEL = 1000;

/**
 * Passes when the caller may read `action`; NOT_FOUND, as for an id that does
 * not exist, otherwise: ids are no oracle for another cluster's work.
 */
function readable(access: Access, action: Pick<ActionRecord, "cluster">, requestedId: string): void {
  access.requireVisible("action.read", action.cluster, () => LeaseholdError.notFound("action", requestedId));
}

/**
 * Runs a submit in a span whose parent is the caller's `traceparent`
 * metadata (W3C trace context), when the server traces; `fn` gets the span's
 * context to store with the actions (their grants' spans are its children).
 */
async function traced<T>(
  tracing: Tracing,
  name: string,
  metadata: grpc.Metadata,
  attributes: Attributes,
  fn: (trace: { traceParent?: string }, note: (attributes: Attributes) => void) => Promise<T>,
): Promise<T> {
  if (!tracing.enabled) return fn({}, () => {});
  const parent = metadata.get("traceparent")[0];
  const span = tracing.start(
    name,
    typeof parent === "string" ? parent : undefined,
    attributes,
    SpanKind.SERVER,
  );
  try {
    return await fn({ traceParent: traceParentOf(span) }, (more) => span.setAttributes(more));
  } catch (error) {
    span.recordException(error as Error);
    span.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
    throw error;
  } finally {
    span.end();
  }
}

/** What default gRPC clients (grpc-js, grpc-go, grpc-core) accept as one answer. */
const CLIENT_RECEIVE_BYTES = 4 * 1024 * 1024;

/**
 * More than a SubmitActions answer in view FULL adds to a new item of the
 * request, besides the principal: the action's id, state, times, counters
 * and retry policy, with framing. With the request's size it bounds the
 * answer of a call without request ids before anything is queued: such a
 * call committed everything, and its client then saw RESOURCE_EXHAUSTED,
 * which action.proto says queued nothing.
 */
const ANSWER_BYTES_PER_ITEM = 512;

/** Refuses a SubmitActions answer in view FULL of (`about` and) `answerBytes` that default clients would refuse. */
function refuseUnlessFits(answerBytes: number, about: string): void {
  if (answerBytes <= CLIENT_RECEIVE_BYTES) return;
  const mib = (answerBytes / (1024 * 1024)).toFixed(1);
  const description = `the answer in view ACTION_VIEW_FULL would take ${about}${mib} MiB, over the 4 MiB default gRPC clients accept; ask for view ACTION_VIEW_BASIC (each action without its payload) or send fewer actions per call`;
  throw new LeaseholdError(Code.ResourceExhausted, `view: ${description}`, {
    reason: "ANSWER_TOO_LARGE",
    fieldViolations: [{ field: "view", description }],
  });
}

/** An action whose answer passes 3 MiB even without its details and its attempts' messages. */
const tooLargeToAnswer = (id: string, attempts: number) =>
  new LeaseholdError(
    Code.ResourceExhausted,
    `action ${id} has ${attempts} attempts: more than one answer can carry (3 MiB) even without their errors; ListEvents with its action_id reads its history page by page`,
    { reason: "ANSWER_TOO_LARGE" },
  );

/**
 * `whole`, an answer holding `actions` (each with the path `omitted` names it
 * by), kept under PAGE_BYTES as GetAction keeps its action: their Structs
 * left out in the order of actionParts. Each Struct is bounded on its own, at
 * 1 Mi characters of JSON, but that is 3 MiB as sent in characters of three
 * bytes, and an action holds four: ListActions, CancelAction and WatchAction
 * sent one of 6 MB whole, which no default client reads (4 MiB).
 */
function fitActions<M extends DescMessage>(
  schema: M,
  whole: MessageInitShape<M>,
  actions: readonly { readonly at: string; readonly action: MessageInitShape<typeof ActionSchema> }[],
): MessageInitShape<M> & { omitted: string[] } {
  const { answer, omitted, over } = fitAnswer(schema, whole, () =>
    actions.flatMap(({ at, action }) => [...actionParts(action, at)]),
  );
  if (over) {
    const ids = actions.map(({ action }) => action.id).join(", ");
    throw new LeaseholdError(
      Code.ResourceExhausted,
      `action ${ids} takes more than one answer can carry (3 MiB) even without its payload, output and details`,
      { reason: "ANSWER_TOO_LARGE" },
    );
  }
  return { ...answer, omitted };
}

/** `error` (a LeaseholdError) with the item it is about prefixed to its message and in its metadata. */
function atItem(error: unknown, field: string): unknown {
  if (!(error instanceof LeaseholdError)) return error;
  return new LeaseholdError(error.code, `${field}: ${error.message}`, {
    ...(error.reason !== undefined ? { reason: error.reason } : {}),
    metadata: { ...error.metadata, field },
    fieldViolations: error.fieldViolations,
    preconditionViolations: error.preconditionViolations,
  });
}

/** How a response shows an action, by the request's `view`. */
function viewOf(view: ActionView): (a: ActionRecord) => MessageInitShape<typeof ActionSchema> {
  switch (view) {
    case ActionView.UNSPECIFIED:
    case ActionView.FULL:
      return toProtoAction;
    case ActionView.BASIC:
      return toBasicProtoAction;
    default:
      throw LeaseholdError.invalidArgument(
        "view",
        `is not a known ActionView (${view}); use ACTION_VIEW_BASIC or ACTION_VIEW_FULL`,
      );
  }
}

function stateName(state: ActionState): DomainState {
  const name = ActionState[state];
  if (name === undefined)
    throw LeaseholdError.invalidArgument("state", `is not a known ActionState (${state})`);
  return name as DomainState;
}

/** Validates a submission (every violation at once) and fills in defaults. */
export function toNewAction(request: SubmitActionRequest): NewAction {
  const v = new Violations();
  const action = checkSubmission(v, request, "");
  v.throwIfAny();
  return action;
}

/**
 * Validates the items of a bulk submission exactly as {@link toNewAction}
 * validates one, each violation named with its item's index
 * (`actions[3].cluster`), every item's at once (up to the violations a
 * status carries). Two items sharing a request_id are a violation too: a
 * request id names one action of its principal.
 */
export async function toNewActions(
  requests: readonly SubmitActionRequest[],
  paced: Turns = turns(),
): Promise<NewAction[]> {
  const v = new Violations();
  if (requests.length === 0) v.add("actions", "must hold at least 1 action (at most 1000)");
  if (requests.length > MAX_BULK) {
    v.add("actions", `must hold at most ${MAX_BULK} actions (got ${requests.length}); split the call`);
  }
  const firstUse = new Map<string, number>();
  const actions: NewAction[] = [];
  for (const [i, request] of requests.entries()) {
    // Hashing 1,000 payloads takes tens of milliseconds: heartbeats go in between.
    if (paced.due()) await paced.next();
    const action = checkSubmission(v, request, `actions[${i}].`);
    if (request.requestId !== "") {
      const first = firstUse.get(request.requestId);
      if (first === undefined) firstUse.set(request.requestId, i);
      else {
        v.add(
          `actions[${i}].request_id`,
          `repeats the request_id of actions[${first}]; every item of a call needs its own request_id`,
        );
      }
    }
    actions.push(action);
  }
  v.throwIfAny();
  return actions;
}

/**
 * A SubmitActionsResponse of `results`, encoded one result at a time in turns
 * of the event loop (1,000 actions with their payloads take tens of
 * milliseconds). The bytes are toBinary's: the message has only its repeated
 * field 1, which is each element tagged and length-prefixed, in order.
 */
export async function encodeResultsInTurns<T>(
  results: readonly T[],
  toResult: (result: T) => MessageInitShape<typeof SubmitActionResponseSchema>,
  paced: Turns,
): Promise<Buffer> {
  const writer = new BinaryWriter();
  for (const result of results) {
    if (paced.due()) await paced.next();
    const item = create(SubmitActionResponseSchema, toResult(result));
    writer.tag(1, WireType.LengthDelimited).bytes(toBinary(SubmitActionResponseSchema, item));
  }
  const bytes = writer.finish();
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Most items of one SubmitActions call (action.proto). */
export const MAX_BULK = 1000;

/**
 * The checks and defaults of one submission; violations go to `v`, their
 * fields prefixed with `prefix` (empty, or `actions[3].` in a bulk call).
 * The result is meaningful only when `v` stays empty.
 */
function checkSubmission(v: Violations, request: SubmitActionRequest, prefix: string): NewAction {
  checkLength(v, `${prefix}request_id`, request.requestId, 128);
  checkName(v, `${prefix}cluster`, request.cluster);
  checkLength(v, `${prefix}run_id`, request.runId, 128);
  checkLabels(v, `${prefix}label_selector`, request.labelSelector);
  // The payload's depth and size were checked with every request (limits.ts).
  // A deployment's action is made by CreateDeployment, after its checks (the
  // lease, the caller's right to read each input); the reference agent runs a
  // `deployment` payload as one, and an agent may download a deployment's
  // inputs only through a server-made deployment. A hand-made one would skip
  // every check, so the key is reserved.
  if (request.payload !== undefined && Object.hasOwn(request.payload, "deployment")) {
    v.add(
      `${prefix}payload.deployment`,
      "is reserved for deployments of scope leases; create them with ResourceService.CreateDeployment",
    );
  }
  if (request.priority < -1000 || request.priority > 1000) {
    v.add(`${prefix}priority`, `must be between -1000 and 1000 (got ${request.priority})`);
  }
  const defaults = ACTION_DEFAULTS.retryPolicy;
  const rp = request.retryPolicy;
  const maxAttempts = rp?.maxAttempts || defaults.maxAttempts;
  if (maxAttempts > 100)
    v.add(`${prefix}retry_policy.max_attempts`, `must be at most 100 (got ${maxAttempts})`);
  const initialBackoffMs = durationField(
    v,
    `${prefix}retry_policy.initial_backoff`,
    rp?.initialBackoff,
    defaults.initialBackoffMs,
    DAY_MS,
  );
  const maxBackoffMs = durationField(
    v,
    `${prefix}retry_policy.max_backoff`,
    rp?.maxBackoff,
    defaults.maxBackoffMs,
    DAY_MS,
  );
  const multiplier = rp?.backoffMultiplier || defaults.backoffMultiplier;
  if (!Number.isFinite(multiplier) || multiplier < 1 || multiplier > 100) {
    v.add(
      `${prefix}retry_policy.backoff_multiplier`,
      `must be between 1 and 100, or 0 for the default 2 (got ${multiplier})`,
    );
  }
  if (rp?.maxBackoff !== undefined && maxBackoffMs < initialBackoffMs) {
    v.add(
      `${prefix}retry_policy.max_backoff`,
      `must not be shorter than ${prefix}retry_policy.initial_backoff`,
    );
  }
  const maxSystemRetries = request.maxSystemRetries || ACTION_DEFAULTS.maxSystemRetries;
  if (maxSystemRetries > 100)
    v.add(`${prefix}max_system_retries`, `must be at most 100 (got ${maxSystemRetries})`);

  const action: { -readonly [K in keyof NewAction]: NewAction[K] } = {
    requestId: request.requestId || undefined,
    requestHash: undefined,
    runId: request.runId,
    cluster: request.cluster,
    labelSelector: { ...request.labelSelector },
    payload: request.payload as JsonObject | undefined,
    priority: request.priority,
    retryPolicy: { maxAttempts, initialBackoffMs, backoffMultiplier: multiplier, maxBackoffMs },
    maxSystemRetries,
  };
  // Set afterwards, not with a spread (slow in V8: see toProtoAction). The hash is the same
  // as of the action without it: JSON leaves out a key whose value is undefined.
  if (action.requestId) action.requestHash = requestHash(action);
  return action;
}

const ts = (date: Date | null) => (date ? timestampFromDate(date) : undefined);

/**
 * An action as the API shows it (ACTION_VIEW_FULL): the basic view's object with the rest
 * assigned to it, absent messages as undefined (create() leaves them unset). V8 (Node 20)
 * took 20–40 µs an action for the same object built with a leading spread and conditional
 * spreads.
 */
export function toProtoAction(a: ActionRecord): MessageInitShape<typeof ActionSchema> {
  type Init = MessageInitShape<typeof ActionSchema>;
  return Object.assign(toBasicProtoAction(a), {
    labelSelector: { ...a.labelSelector },
    payload: (a.payload ?? undefined) as Init["payload"],
    priority: a.priority,
    retryPolicy: {
      maxAttempts: a.retryPolicy.maxAttempts,
      initialBackoff: durationFromMs(a.retryPolicy.initialBackoffMs),
      backoffMultiplier: a.retryPolicy.backoffMultiplier,
      maxBackoff: durationFromMs(a.retryPolicy.maxBackoffMs),
    },
    maxSystemRetries: a.maxSystemRetries,
    epoch: BigInt(a.epoch),
    attemptCount: a.attemptCount,
    failureCount: a.failureCount,
    systemRetryCount: a.systemRetryCount,
    lease:
      a.state === "LEASED" && a.workerId && a.sessionId
        ? {
            workerId: a.workerId,
            sessionId: a.sessionId,
            epoch: BigInt(a.epoch),
            grantTime: ts(a.grantedAt),
          }
        : undefined,
    cancelRequested: a.cancelRequested,
    output: (a.output ?? undefined) as Init["output"],
    lastError: a.lastError
      ? {
          message: a.lastError.message,
          retryable: a.lastError.retryable,
          details: (a.lastError.details ?? undefined) as never,
        }
      : undefined,
    failureReason: a.failureReason,
    phase: a.phase,
    phaseDetails: (a.phaseDetails ?? undefined) as Init["phaseDetails"],
    updateTime: ts(a.updatedAt),
    notBefore: ts(a.notBefore),
    finishTime: ts(a.finishedAt),
  });
}

/** The fields of ACTION_VIEW_BASIC (action.proto): what names the action, nothing of its content. */
export function toBasicProtoAction(a: ActionRecord): MessageInitShape<typeof ActionSchema> {
  return {
    id: a.id,
    requestId: a.requestId ?? "",
    runId: a.runId,
    cluster: a.cluster,
    state: ActionState[a.state],
    createTime: ts(a.createdAt),
    createdBy: a.createdBy,
  };
}

function toProtoAttempt(a: AttemptRecord): MessageInitShape<typeof AttemptSchema> {
  return {
    actionId: a.actionId,
    epoch: BigInt(a.epoch),
    workerId: a.workerId,
    sessionId: a.sessionId,
    outcome: AttemptOutcome[a.outcome],
    ...(a.error
      ? {
          error: {
            message: a.error.message,
            retryable: a.error.retryable,
            ...(a.error.details ? { details: a.error.details as never } : {}),
          },
        }
      : {}),
    startTime: ts(a.startedAt),
    endTime: ts(a.endedAt),
  };
}
