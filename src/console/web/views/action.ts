/**
 * One action explained (ExplainAction): where it is now, each attempt and
 * what its session went through, and the timeline of its lease history.
 */
import {
  type Action,
  ActionState,
  ActionStateSchema,
  AttemptOutcomeSchema,
  type ExplainActionResponse,
  type ExplainedAttempt,
  type TimelineStep,
} from "../../../gen/leasehold/v1/action_pb.js";
import { EventKindSchema } from "../../../gen/leasehold/v1/event_pb.js";
import { type Child, h } from "../dom.js";
import { enumName, kindLabel, toMs } from "../format.js";
import { href } from "../router.js";
import { ago, badge, clock, countdown, idText, muted, NONE, table } from "../widgets.js";
import { detailHeader, foldedJson, summaryGrid } from "./detail.js";
import { createView, operatorButton, type View, type ViewContext } from "./view.js";

export function actionView(ctx: ViewContext): View {
  const id = ctx.route.id;
  const header = detailHeader("Action", id, { href: "#/actions", text: "← all actions" });

  return createView(header, async (signal) => {
    const explained = await ctx.api.actions.explainAction({ actionId: id }, { signal });
    const now = ctx.clock.now();
    return [
      explained.action ? summary(explained.action, now, ctx) : null,
      h("h2", null, "Attempts"),
      attempts(explained.attempts, now),
      h("h2", null, "Timeline"),
      timeline(explained),
      explained.action ? payloads(explained.action) : null,
    ];
  });
}

/** The action's header: state, epoch, cluster, holder and the rest in a dense grid. */
function summary(a: Action, now: number, ctx: ViewContext): HTMLElement {
  const state = enumName(ActionStateSchema, a.state);
  const holder = a.lease?.workerId ?? "";
  const cancellable =
    (a.state === ActionState.QUEUED || a.state === ActionState.LEASED) && !a.cancelRequested;
  const fields: [string, Child][] = [
    [
      "State",
      [
        badge(state, state, { "data-action-state": state }),
        a.cancelRequested ? " cancel requested" : null,
        cancellable
          ? [
              " ",
              operatorButton(
                ctx,
                "Cancel",
                {
                  question:
                    a.state === ActionState.LEASED
                      ? `Cancel this action?\n\n${holder} is asked to stop it (its command is killed); it ends CANCELLED. Why (optional):`
                      : "Cancel this action? It leaves the queue and ends CANCELLED. Why (optional):",
                  reasonRequired: false,
                },
                (reason) => ctx.api.actions.cancelAction({ actionId: a.id, reason }),
              ),
            ]
          : null,
      ],
    ],
    ["Epoch", h("span", { class: "num", "data-action-epoch": String(a.epoch) }, String(a.epoch))],
    ["Cluster", h("a", { href: href("/workers", { cluster: a.cluster }) }, a.cluster)],
    ["Holder", holder === "" ? NONE : h("a", { href: href("/actions", { worker: holder }) }, holder)],
    [
      "Attempts",
      `${a.attemptCount} (${a.failureCount} failed, ${a.systemRetryCount}/${a.maxSystemRetries} lease expiries)`,
    ],
    ["Phase", a.phase || NONE],
    ["Failure reason", a.failureReason || NONE],
    ["Last error", a.lastError ? a.lastError.message : NONE],
    ["Submitted", [ago(toMs(a.createTime), now), a.createdBy ? muted(` by ${a.createdBy}`) : null]],
    ["Updated", ago(toMs(a.updateTime), now)],
    ["Finished", ago(toMs(a.finishTime), now)],
    ["Run", a.runId || NONE],
  ];
  return summaryGrid(fields);
}

function attempts(list: readonly ExplainedAttempt[], now: number): HTMLElement {
  const rows = list.map((x) => {
    const t = x.attempt;
    const outcome = enumName(AttemptOutcomeSchema, t?.outcome ?? 0);
    const deadline = toMs(x.sessionDeadline);
    const sessionEnd = toMs(x.sessionEndTime);
    return h(
      "tr",
      { "data-epoch": String(t?.epoch ?? 0n) },
      h("td", { class: "num" }, String(t?.epoch ?? NONE)),
      h("td", null, t ? h("a", { href: href("/actions", { worker: t.workerId }) }, t.workerId) : NONE),
      h("td", null, t ? idText(t.sessionId) : NONE),
      h("td", null, badge(outcome), t?.error ? h("div", { class: "muted" }, t.error.message) : null),
      h("td", null, clock(toMs(t?.startTime))),
      h("td", null, clock(toMs(t?.endTime))),
      // A live session's deadline counts down; an ended one's is history.
      h(
        "td",
        null,
        deadline === undefined ? NONE : sessionEnd === undefined ? countdown(deadline, now) : clock(deadline),
      ),
      h("td", null, clock(toMs(x.streamLostTime))),
      h("td", null, x.sessionEndReason ? [x.sessionEndReason, " ", clock(sessionEnd)] : NONE),
    );
  });
  return table(
    [
      "Epoch",
      "Worker",
      "Session",
      "Outcome",
      "Started",
      "Ended",
      "Session deadline",
      "Stream lost",
      "Session end",
    ],
    rows,
    "Not granted yet: the action waits for a worker of its cluster.",
  );
}

function timeline(explained: ExplainActionResponse): HTMLElement {
  const steps = explained.timeline.map(step);
  return h(
    "div",
    null,
    h("ol", { class: "timeline", "data-timeline": true }, steps),
    explained.truncated
      ? h(
          "p",
          { class: "note" },
          "Truncated: more than 1000 events concern this action; the timeline shows the first 1000. ",
          h("code", { class: "cmd" }, `leasehold events --action ${explained.action?.id ?? ""}`),
          " lists them all.",
        )
      : null,
  );
}

function step(s: TimelineStep): HTMLLIElement {
  const kind = s.event ? enumName(EventKindSchema, s.event.kind) : "";
  return h(
    "li",
    { "data-epoch": String(s.epoch), "data-kind": kind },
    clock(toMs(s.time)),
    h("span", { class: "epoch-tag" }, s.epoch > 0n ? `epoch ${s.epoch}` : ""),
    // A step of no event is an attempt's heartbeat summary (its epoch), or a queued action's
    // last step, epoch 0: why it is not granted now.
    kind === ""
      ? h("span", { class: "kind" }, muted(s.epoch > 0n ? "session" : "now"))
      : h("span", { class: "kind" }, badge(kind, kindLabel(kind))),
    h("span", { class: "step-summary" }, s.summary),
  );
}

/** Payload, output and the last error's details, folded. */
function payloads(a: Action): HTMLElement {
  return h(
    "div",
    { class: "payloads" },
    foldedJson("Payload", a.payload),
    foldedJson("Output", a.output),
    foldedJson("Last error details", a.lastError?.details),
  );
}
