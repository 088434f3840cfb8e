import { Code, LeaseholdError, quote } from "../errors.js";
import {
  type CancelFilter,
  type CancelledMatching,
  cancelAction,
  cancelMatchingActions,
  findAction,
  findActionsByRequestId,
  listActions,
  listAttempts,
} from "../store/actions.js";
import { createBatcher } from "../store/batcher.js";
import type { Clock } from "../store/clock.js";
import type { Db } from "../store/database.js";
import { uuidv7 } from "../store/ids.js";
import { readActionHistory } from "../store/queries/explain-action.js";
import { insertActions, insertActionsAtomically } from "../store/queries/insert-actions.js";
import type { HostedGrantState } from "../store/queries/queued-placement.js";
import {
  type ActionFilter,
  type ActionRecord,
  type AttemptRecord,
  type NewAction,
  TERMINAL_STATES,
} from "./action.js";
import { actionTopic, type ChangeFeed, EVENTS_TOPIC, QUEUE_TOPIC, wakeupsOf } from "./change-feed.js";
import { type Explanation, explainHistory } from "./explain.js";
import { type PAGE_BYTES, type Page, toPage } from "./page.js";
import { decodePageToken, issuedFor } from "./page-token.js";

/**
 * Rounds of a bulk submit that lost a race for one of its request ids before
 * it gives up with ABORTED. Each lost round means another submission of the
 * same id committed, which the next round finds: two rounds settle it unless
 * the caller keeps racing itself.
 */
const BULK_ROUNDS = 4;

/** The most events an explanation reads (its timeline adds one heartbeat summary per attempt). */
export const EXPLAIN_EVENTS = 1000;

/** Result of a submit. */
export interface SubmitResult {
  readonly action: ActionRecord;
  /** False when the request id matched an earlier submission. */
  readonly created: boolean;
}

/** Submitting, reading, listing, cancelling and watching actions. */
export interface ActionService extends AsyncDisposable {
  /**
   * Queues `action` submitted by `actor` (its `created_by`, and the actor of
   * its event). A request id is `actor`'s own: a repeat of the same request
   * returns its action (created false), a different one is ALREADY_EXISTS,
   * and another principal's use of the same id is a new action.
   */
  submit(action: NewAction, actor: string): Promise<SubmitResult>;
  /**
   * Queues `actions` submitted by `actor` in one transaction: all of them or
   * none. Each item's request id behaves as in {@link submit} (a repeat of
   * the same request answers with its action, created false); a request id
   * reused for a different request is ALREADY_EXISTS naming the item
   * (`actions[i].request_id`) and queues nothing. Request ids must be
   * distinct within `actions`. Results are in the order of `actions`. The
   * scheduler is woken once, whatever the number of items. `check` sees the
   * results before they commit when the call holds request ids (see
   * `insertActionsAtomically`); throwing refuses the call, queuing nothing.
   */
  submitMany(
    actions: readonly NewAction[],
    actor: string,
    check?: (results: readonly SubmitResult[]) => void | Promise<void>,
  ): Promise<SubmitResult[]>;
  get(id: string): Promise<{ action: ActionRecord; attempts: AttemptRecord[] }>;
  /**
   * One page of actions. With `sizeOf` (an action's size as the caller sends
   * it), the page also ends before that size passes {@link PAGE_BYTES}, with a
   * next page token; it always holds one action.
   */
  list(
    filter: ActionFilter,
    pageSize: number,
    pageToken: string,
    sizeOf?: (action: ActionRecord) => number,
  ): Promise<Page<ActionRecord>>;
  /** Cancels an action; `actor` is who asked, recorded on the event. */
  cancel(id: string, reason: string, actor: string): Promise<ActionRecord>;
  /**
   * Cancels up to `limit` queued or leased actions matching `filter`, each as
   * {@link cancel} would, in one transaction; `more` when others still match.
   */
  cancelMatching(
    filter: CancelFilter,
    limit: number,
    reason: string,
    actor: string,
  ): Promise<CancelledMatching>;
  /** The action now, then after every change; ends after a terminal state. */
  watch(id: string, signal: AbortSignal): AsyncIterable<ActionRecord>;
  /**
   * The action's lease history as one timeline (at most {@link EXPLAIN_EVENTS}
   * of its events); a queued action's ends with why it is not granted now.
   */
  explain(id: string): Promise<Explanation>;
  /** Flushes pending submits. */
  close(): Promise<void>;
}

/** Dependencies of {@link createActionService}. */
export interface ActionServiceDeps {
  readonly db: Db;
  /** Clock for `not_before` (the database clock in production). */
  readonly clock: Clock;
  readonly feed: ChangeFeed;
  /** Called after a leased action is marked for cancellation: revoke it from its owner. */
  readonly onCancelRequested?: (action: ActionRecord) => void;
  /** Counts submissions: created, or an earlier action answered for a repeated request id. */
  readonly submitted?: { inc(labels: { result: "created" | "existing" }, n?: number): void };
  /**
   * What this process's hosted streams do that the database does not hold
   * (a worker that stopped taking grants), for explaining a queued action.
   * Without it, every session counts as hosted here and none as stopped.
   */
  readonly hostedGrants?: () => HostedGrantState;
}

export function createActionService({
  db,
  clock,
  feed,
  onCancelRequested,
  submitted,
  hostedGrants,
}: ActionServiceDeps): ActionService {
  // Submits are group-committed: concurrent calls share one insert statement.
  const submits = createBatcher<{ action: NewAction; actor: string }, ActionRecord | undefined>(
    async (batch) => {
      const items = batch.map(({ action, actor }) => ({ id: uuidv7(), action, actor }));
      const inserted = new Map((await insertActions(db, clock, items)).map((a) => [a.id, a]));
      return items.map((item) => inserted.get(item.id));
    },
  );

  const notFound = (id: string) => LeaseholdError.notFound("action", id);

  async function submit(action: NewAction, actor: string): Promise<SubmitResult> {
    const inserted = await submits.add({ action, actor });
    if (inserted) {
      submitted?.inc({ result: "created" });
      feed.publish(EVENTS_TOPIC);
      feed.publish(QUEUE_TOPIC);
      return { action: inserted, created: true };
    }
    // Not inserted: the actor used its request id already (before, or in this batch).
    const requestId = action.requestId as string;
    const existing = (await findActionsByRequestId(db, actor, [requestId])).get(requestId);
    if (!existing) {
      throw new LeaseholdError(
        Code.Aborted,
        "the submission conflicted with a concurrent one; retry the call",
      );
    }
    if (existing.requestHash !== action.requestHash) {
      throw new LeaseholdError(
        Code.AlreadyExists,
        `request_id ${quote(requestId)} was already used for a different request (action ${existing.action.id}); use a new request_id for a new action`,
        { reason: "REQUEST_ID_REUSED", metadata: { action_id: existing.action.id, request_id: requestId } },
      );
    }
    submitted?.inc({ result: "existing" });
    return { action: existing.action, created: false };
  }

  async function submitMany(
    actions: readonly NewAction[],
    actor: string,
    check?: (results: readonly SubmitResult[]) => void | Promise<void>,
  ): Promise<SubmitResult[]> {
    const items = actions.map((action) => ({ id: uuidv7(), action }));
    // A race with a concurrent submission of one of the request ids rolls
    // everything back; the next round's lookup sees the winner's row.
    for (let round = 1; round <= BULK_ROUNDS; round++) {
      const outcome = await insertActionsAtomically(db, clock, actor, items, check);
      if (outcome.kind === "raced") continue;
      if (outcome.kind === "reused") {
        const requestId = actions[outcome.index]?.requestId as string;
        const field = `actions[${outcome.index}].request_id`;
        throw new LeaseholdError(
          Code.AlreadyExists,
          `${field}: ${quote(requestId)} was already used for a different request (action ${outcome.existing.id}); use a new request_id for a new action`,
          {
            reason: "REQUEST_ID_REUSED",
            metadata: { action_id: outcome.existing.id, request_id: requestId, field },
          },
        );
      }
      const created = outcome.results.filter((r) => r.created).length;
      if (created > 0) {
        submitted?.inc({ result: "created" }, created);
        feed.publish(EVENTS_TOPIC);
        feed.publish(QUEUE_TOPIC);
      }
      if (created < outcome.results.length)
        submitted?.inc({ result: "existing" }, outcome.results.length - created);
      return [...outcome.results];
    }
    throw new LeaseholdError(
      Code.Aborted,
      "the submission kept conflicting with concurrent ones using the same request ids; retry the call",
    );
  }

  async function explain(id: string): Promise<Explanation> {
    const history = await readActionHistory(db, id, EXPLAIN_EVENTS, hostedGrants?.());
    if (!history) throw notFound(id);
    return explainHistory(history);
  }

  async function get(id: string) {
    const action = await findAction(db, id);
    if (!action) throw notFound(id);
    return { action, attempts: await listAttempts(db, id) };
  }

  async function list(
    filter: ActionFilter,
    size: number,
    pageToken: string,
    sizeOf?: (action: ActionRecord) => number,
  ): Promise<Page<ActionRecord>> {
    const cursor = decodePageToken(pageToken, issuedFor("actions", filter));
    // One row more than asked tells whether another page exists.
    const { items, cut } = await listActions(db, filter, cursor?.after, size + 1);
    return toPage(items, size, (a) => a.id, issuedFor("actions", filter), { more: cut, sizeOf });
  }

  async function cancel(id: string, reason: string, actor: string): Promise<ActionRecord> {
    const outcome = await cancelAction(db, id, reason, actor);
    switch (outcome.kind) {
      case "not_found":
        throw notFound(id);
      case "unchanged":
        if (outcome.action.state === "CANCELLED" || outcome.action.cancelRequested) return outcome.action;
        throw LeaseholdError.failedPrecondition(
          "ACTION_FINISHED",
          `action ${id} already finished as ${outcome.action.state}; only queued or leased actions can be cancelled`,
          { type: "ACTION_STATE", subject: `actions/${id}`, description: `state is ${outcome.action.state}` },
        );
      case "revoke_requested":
        onCancelRequested?.(outcome.action);
        feed.publish(actionTopic(id));
        feed.publish(EVENTS_TOPIC);
        return outcome.action;
      case "cancelled":
        feed.publish(actionTopic(id));
        feed.publish(EVENTS_TOPIC);
        return outcome.action;
    }
  }

  async function cancelMatching(
    filter: CancelFilter,
    limit: number,
    reason: string,
    actor: string,
  ): Promise<CancelledMatching> {
    const outcome = await cancelMatchingActions(db, filter, limit, reason, actor);
    for (const action of outcome.cancelRequested) {
      onCancelRequested?.(action);
      feed.publish(actionTopic(action.id));
    }
    for (const id of outcome.cancelled) feed.publish(actionTopic(id));
    if (outcome.cancelled.length + outcome.cancelRequested.length > 0) feed.publish(EVENTS_TOPIC);
    return outcome;
  }

  async function* watch(id: string, signal: AbortSignal): AsyncIterable<ActionRecord> {
    // Subscribe before the first read so no change can slip in between.
    const wakeups = wakeupsOf(feed, actionTopic(id));
    try {
      let last = await findAction(db, id);
      if (!last) throw notFound(id);
      yield last;
      while (!TERMINAL_STATES.has(last.state) && !signal.aborted) {
        await wakeups.next(signal);
        if (signal.aborted) return;
        const current = await findAction(db, id);
        if (!current) return;
        if (current.updatedAt.getTime() !== last.updatedAt.getTime() || current.state !== last.state) {
          yield current;
        }
        last = current;
      }
    } finally {
      wakeups[Symbol.dispose]();
    }
  }

  const close = () => submits.close();
  return {
    submit,
    submitMany,
    get,
    list,
    cancel,
    cancelMatching,
    watch,
    explain,
    close,
    [Symbol.asyncDispose]: close,
  };
}
