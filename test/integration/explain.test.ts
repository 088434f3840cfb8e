import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { status as Code } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from "vitest";
import { ActionService, ActionState, AttemptOutcome } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { BIN } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const run = promisify(execFile);

/** Resolves once an event of `kind` about `workerId` is in the log. */
async function waitForEvent(t: TestServer, workerId: string, kind: EventKind): Promise<void> {
  for await (const _ of t.client(EventService).watchEvents({ workerId, kind, afterSequence: 0n })) return;
}

/**
 * Heartbeats `w` every 300 ms (grace 5 s), listing `held` as it is at each beat; returns the stop,
 * which also runs when the test ends, passed or failed.
 */
function keepAlive(w: TestWorker, held: readonly { actionId: string; epoch: bigint }[]): () => void {
  let sequence = 1000;
  const timer = setInterval(() => {
    w.send({
      message: { case: "heartbeat", value: { sequence: BigInt(sequence++), heldLeases: [...held] } },
    });
  }, 300);
  const stop = () => clearInterval(timer);
  onTestFinished(stop);
  return stop;
}

// Real timers and streams (grace 5 s: a worker waits for its grant unheard, and a loaded machine
// may take seconds to serve it), both drivers: a lease lost and re-granted, a stale report
// fenced, a completion accepted; and a lease kept across a reconnect within grace.
describe("ExplainAction", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer({ config: { gracePeriod: "5s", heartbeatInterval: "500ms" } });
  });
  afterAll(async () => t?.[Symbol.asyncDispose]());

  it("tells a failover: grant, lost stream, expiry and why, re-grant, fenced report, accepted completion", async () => {
    const api = t.client(ActionService);
    const a = await connectWorker(t.address, { workerId: "explain-a", cluster: "explain-1", capacity: 1 });
    const { action } = await api.submitAction({ cluster: "explain-1", payload: { n: 1 } });
    const id = action?.id ?? "";
    const first = await a.next("grant", (g) => g.actionId === id);
    await a.heartbeat(1, [{ actionId: id, epoch: first.epoch }]);
    a.drop();

    // B is there once A's session is reaped: the action is granted to it under epoch 2. It
    // heartbeats meanwhile, or its own session would end at the same grace.
    const b = await connectWorker(t.address, { workerId: "explain-b", cluster: "explain-1", capacity: 1 });
    const bHeld: { actionId: string; epoch: bigint }[] = [];
    const stopB = keepAlive(b, bHeld);
    const second = await b.next("grant", (g) => g.actionId === id);
    bHeld.push({ actionId: id, epoch: second.epoch });
    expect(second.epoch).toBe(2n);
    // A comes back with a new session and reports the lease it lost: fenced.
    const back = await connectWorker(t.address, { workerId: "explain-a", cluster: "explain-1", capacity: 1 });
    const stopBack = keepAlive(back, []);
    const fenced = await back.complete({ actionId: id, epoch: 1n }, { output: { stale: true } });
    expect(fenced.accepted).toBe(false);
    // The fenced report's event is written after its answer: in the log before B's completion.
    await waitForEvent(t, "explain-a", EventKind.REPORT_FENCED);
    expect((await b.complete({ actionId: id, epoch: 2n }, { output: { ok: true } })).accepted).toBe(true);
    stopB();
    stopBack();

    const explained = await api.explainAction({ actionId: id });
    expect(explained.action).toMatchObject({ id, state: ActionState.SUCCEEDED, epoch: 2n });
    expect(explained.truncated).toBe(false);
    const [one, two] = explained.attempts;
    expect(one?.attempt).toMatchObject({
      epoch: 1n,
      workerId: "explain-a",
      outcome: AttemptOutcome.LEASE_EXPIRED,
    });
    expect(one?.sessionEndReason).toBe("reaped");
    expect(one?.streamLostTime).toBeDefined();
    expect(two?.attempt).toMatchObject({
      epoch: 2n,
      workerId: "explain-b",
      outcome: AttemptOutcome.SUCCEEDED,
    });
    expect(two?.sessionEndTime).toBeUndefined();

    // Whether a renewal tick recorded B's heartbeats during its short attempt, and so where its
    // summary sits between its grant and its completion, depends on the tick.
    const bBeats = explained.timeline.findIndex((s) => !s.event && s.epoch === 2n);
    expect(explained.timeline[bBeats]?.summary).toMatch(
      /^heartbeats: (none recorded from worker explain-b|worker explain-b .* was last heard)/,
    );
    expect(bBeats).toBeGreaterThan(
      explained.timeline.findIndex((s) => s.event?.kind === EventKind.LEASE_GRANTED && s.epoch === 2n),
    );
    const steps = explained.timeline
      .filter((_, i) => i !== bBeats)
      .map((s) => [Number(s.epoch), s.event?.kind ?? "heartbeats", s.summary]);
    // The reap and the expiry are written by one statement: their order in the log is the plan's.
    if (steps[4]?.[1] === EventKind.LEASE_EXPIRED) steps.splice(4, 2, steps[5] ?? [], steps[4] ?? []);
    const kinds = steps.map(([, kind]) => kind);
    expect(kinds).toEqual([
      EventKind.ACTION_SUBMITTED,
      EventKind.LEASE_GRANTED,
      "heartbeats",
      EventKind.STREAM_LOST,
      EventKind.SESSION_REAPED,
      EventKind.LEASE_EXPIRED,
      EventKind.LEASE_GRANTED,
      EventKind.REPORT_FENCED,
      EventKind.ACTION_SUCCEEDED,
    ]);
    const say = (i: number) => String(steps[i]?.[2]);
    expect(steps.map(([epoch]) => epoch)).toEqual([0, 1, 1, 1, 1, 1, 2, 1, 2]);
    expect(say(0)).toBe("submitted by anonymous to cluster explain-1");
    expect(say(1)).toBe(`epoch 1 granted to worker explain-a (session ${a.welcome.sessionId})`);
    expect(say(2)).toMatch(
      /^heartbeats: worker explain-a \(session .+\) was last heard \d+\.\d s after the grant of epoch 1/,
    );
    expect(say(3)).toMatch(
      /^stream of worker explain-a lost, in grace until .+Z \(\d\.\d s\); epoch 1 waits/,
    );
    expect(say(4)).toBe(
      `session ${a.welcome.sessionId} of worker explain-a reaped: its deadline passed with no heartbeat`,
    );
    expect(say(5)).toMatch(
      /^epoch 1 expired: worker explain-a's session .+ lost its stream at .+Z and did not come back before its deadline .+Z; the action goes back to the queue$/,
    );
    expect(say(6)).toMatch(/^epoch 2 granted to worker explain-b/);
    expect(say(7)).toMatch(
      /^fenced: completion from worker explain-a rejected: epoch 1 is older than the current epoch 2/,
    );
    expect(say(8)).toBe("completed by worker explain-b under epoch 2: accepted (reported as anonymous)");
    back.goodbye();
    b.goodbye();
  });

  it("tells a reconnect within grace: the lease resumes under the same epoch", async () => {
    const api = t.client(ActionService);
    const a = await connectWorker(t.address, { workerId: "explain-c", cluster: "explain-2", capacity: 1 });
    const { action } = await api.submitAction({ cluster: "explain-2" });
    const id = action?.id ?? "";
    const grant = await a.next("grant", (g) => g.actionId === id);
    a.drop();
    // Reconnecting before the server saw the stream end would be a takeover, not a resume.
    await waitForEvent(t, "explain-c", EventKind.STREAM_LOST);
    const held = [{ actionId: id, epoch: grant.epoch }];
    const again = await connectWorker(t.address, {
      workerId: "explain-c",
      cluster: "explain-2",
      capacity: 1,
      heldLeases: held,
    });
    const stop = keepAlive(again, held);

    const explained = await api.explainAction({ actionId: id });
    const kinds = explained.timeline.map((s) => s.event?.kind ?? "heartbeats");
    expect(kinds).toEqual([
      EventKind.ACTION_SUBMITTED,
      EventKind.LEASE_GRANTED,
      EventKind.STREAM_LOST,
      EventKind.SESSION_RESUMED,
      EventKind.LEASE_RESUMED,
      "heartbeats",
    ]);
    expect(explained.timeline.at(-1)?.summary).toMatch(
      /^heartbeats: worker explain-c \(session .+\) holds epoch 1, last heard \d+\.\d s ago; its deadline is .+Z$/,
    );
    expect(explained.timeline[4]?.summary).toMatch(
      /^epoch 1 resumed by worker explain-c, reconnected in time \(session .+\): the lease still holds$/,
    );
    expect(explained.attempts[0]?.attempt?.outcome).toBe(AttemptOutcome.RUNNING);
    stop();
    again.goodbye();
  });

  it("tells a restarted worker ending its predecessor's session: a new process, not a deadline", async () => {
    const api = t.client(ActionService);
    const hello = { workerId: "explain-r", cluster: "explain-4", capacity: 1 };
    const a = await connectWorker(t.address, { ...hello, instanceId: "first-process" });
    const { action } = await api.submitAction({ cluster: "explain-4" });
    const id = action?.id ?? "";
    await a.next("grant", (g) => g.actionId === id);
    a.drop();
    await waitForEvent(t, "explain-r", EventKind.STREAM_LOST);
    // A new process of the worker: its hello ends the lost session at once, long before its deadline.
    const again = await connectWorker(t.address, { ...hello, instanceId: "second-process" });
    const stop = keepAlive(again, []);
    const regrant = await again.next("grant", (g) => g.actionId === id);
    expect(regrant.epoch).toBe(2n);

    const explained = await api.explainAction({ actionId: id });
    const say = (kind: EventKind) => explained.timeline.find((s) => s.event?.kind === kind)?.summary;
    expect(say(EventKind.SESSION_REAPED)).toBe(
      `session ${a.welcome.sessionId} of worker explain-r ended: a new process of the worker connected while the stream of this one was gone`,
    );
    expect(say(EventKind.LEASE_EXPIRED)).toMatch(
      /^epoch 1 expired: worker explain-r's session .+ lost its stream at .+Z and a new process of the worker connected at .+Z, ending the session instead of resuming it; the action goes back to the queue$/,
    );
    const { events } = await t.client(EventService).listEvents({
      workerId: "explain-r",
      kind: EventKind.SESSION_REAPED,
    });
    expect(events.map((e) => e.details)).toEqual([{ cause: "restarted" }]);
    stop();
    again.goodbye();
  });

  it("leaves out what an agent of another cluster reported about the action", async () => {
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "explain-4" });
    const id = action?.id ?? "";
    // An agent of another cluster names the action: fenced, and recorded in its own cluster.
    const other = await connectWorker(t.address, {
      workerId: "explain-other",
      cluster: "elsewhere",
      capacity: 1,
    });
    expect(await other.complete({ actionId: id, epoch: 1n }, { output: {} })).toMatchObject({
      accepted: false,
    });
    await waitForEvent(t, "explain-other", EventKind.REPORT_FENCED);
    other.goodbye();
    const explained = await api.explainAction({ actionId: id });
    // The last step, of no event, says why the action is still queued.
    expect(explained.timeline.map((s) => s.event?.kind)).toEqual([EventKind.ACTION_SUBMITTED, undefined]);
  });

  /** The last step of a queued action's explanation: why it is not granted now. */
  async function whyQueued(actionId: string): Promise<string> {
    const explained = await t.client(ActionService).explainAction({ actionId });
    expect(explained.action?.state).toBe(ActionState.QUEUED);
    const last = explained.timeline.at(-1);
    expect(last?.epoch).toBe(0n);
    expect(last?.event).toBeUndefined();
    return last?.summary ?? "";
  }

  /** A worker of `cluster` that stays connected until the test ends (it heartbeats `held`). */
  async function connected(
    workerId: string,
    cluster: string,
    hello: { capacity?: number; labels?: Record<string, string>; stopGrants?: boolean } = {},
    held: { actionId: string; epoch: bigint }[] = [],
  ): Promise<TestWorker> {
    const w = await connectWorker(t.address, { workerId, cluster, capacity: 1, ...hello });
    keepAlive(w, held);
    onTestFinished(() => w.goodbye());
    return w;
  }

  it("tells why a queued action waits when no worker of its cluster is connected, or only one in grace", async () => {
    const api = t.client(ActionService);
    const { action } = await api.submitAction({ cluster: "explain-empty" });
    const id = action?.id ?? "";
    expect(await whyQueued(id)).toBe("not granted now: no worker of cluster explain-empty is connected");
    // A worker that lost its stream keeps its session until its deadline, but takes no grant meanwhile.
    const gone = await connectWorker(t.address, {
      workerId: "explain-gone",
      cluster: "explain-empty",
      capacity: 1,
      labels: { gpu: "no" },
    });
    const { action: picky } = await api.submitAction({
      cluster: "explain-empty",
      labelSelector: { gpu: "yes" },
    });
    gone.drop();
    await waitForEvent(t, "explain-gone", EventKind.STREAM_LOST);
    expect(await whyQueued(picky?.id ?? "")).toBe(
      "not granted now: no worker of cluster explain-empty is connected (1 lost its stream and gets no grants until it reconnects)",
    );
  });

  it("tells which labels a queued action requires that the connected workers lack", async () => {
    const api = t.client(ActionService);
    await connected("explain-l1", "explain-labels", { labels: { gpu: "no", zone: "b" } });
    const submit = async (labelSelector: Record<string, string>) =>
      (await api.submitAction({ cluster: "explain-labels", labelSelector })).action?.id ?? "";
    // One worker: what it lacks, and what it has instead.
    expect(await whyQueued(await submit({ gpu: "yes" }))).toBe(
      "not granted now: the one connected worker of cluster explain-labels does not carry the labels it requires (gpu=yes): worker explain-l1 lacks gpu=yes (has gpu=no)",
    );
    await connected("explain-l2", "explain-labels", { labels: { zone: "b" } });
    await connected("explain-l3", "explain-labels", { labels: { zone: "c" } });
    // A label no connected worker carries is the reason.
    expect(await whyQueued(await submit({ gpu: "yes", zone: "b" }))).toBe(
      "not granted now: none of the 3 connected workers of cluster explain-labels carries the labels it requires (gpu=yes, zone=b): none carries gpu=yes",
    );
    // Each label is carried by some worker, none carries both: the closest ones, and what each lacks.
    expect(await whyQueued(await submit({ gpu: "no", zone: "c" }))).toBe(
      "not granted now: none of the 3 connected workers of cluster explain-labels carries the labels it requires (gpu=no, zone=c); closest: " +
        "worker explain-l1 lacks zone=c (has zone=b); worker explain-l3 lacks gpu=no (has no gpu); " +
        "worker explain-l2 lacks gpu=no (has no gpu) and zone=c (has zone=b)",
    );
  });

  it("tells that every connected worker that could take a queued action is draining or stopped taking grants", async () => {
    const api = t.client(ActionService);
    await connected("explain-drained", "explain-drain");
    await t.client(ClusterService).drainWorker({ workerId: "explain-drained", reason: "maintenance" });
    const { action } = await api.submitAction({ cluster: "explain-drain" });
    const id = action?.id ?? "";
    const waits = "it waits for a worker that can take it to connect";
    expect(await whyQueued(id)).toBe(
      `not granted now: 1 connected worker of cluster explain-drain: worker explain-drained is draining; ${waits}`,
    );
    // A worker that says it takes no grants from its hello on (an agent reconnecting while it closes).
    await connected("explain-stopping", "explain-drain", { capacity: 2, stopGrants: true });
    expect(await whyQueued(id)).toBe(
      `not granted now: 2 connected workers of cluster explain-drain: worker explain-drained is draining and worker explain-stopping has stopped taking grants; ${waits}`,
    );
  });

  it("tells that a queued action waits its turn while every worker that carries its labels is busy", async () => {
    const api = t.client(ActionService);
    const held: { actionId: string; epoch: bigint }[] = [];
    const busy = await connected("explain-busy", "explain-full", { labels: { gpu: "yes" } }, held);
    await connected("explain-cpu", "explain-full", { labels: { gpu: "no" } });
    const { action: first } = await api.submitAction({
      cluster: "explain-full",
      labelSelector: { gpu: "yes" },
    });
    const grant = await busy.next("grant", (g) => g.actionId === first?.id);
    held.push({ actionId: grant.actionId, epoch: grant.epoch });
    const { action } = await api.submitAction({ cluster: "explain-full", labelSelector: { gpu: "yes" } });
    expect(await whyQueued(action?.id ?? "")).toBe(
      "not granted now: 1 connected worker of cluster explain-full carries its labels (gpu=yes): worker explain-busy has all its slots busy; it waits its turn for a free slot",
    );
    // Granted once the slot frees: the explanation was about now, and the step is gone.
    await busy.complete(grant, { output: {} });
    const next = await busy.next("grant", (g) => g.actionId === action?.id);
    held.splice(0, 1, { actionId: next.actionId, epoch: next.epoch });
    const explained = await api.explainAction({ actionId: action?.id ?? "" });
    expect(explained.timeline.at(-1)?.summary).not.toMatch(/^not granted now/);
  });

  it("answers NOT_FOUND for an unknown action and INVALID_ARGUMENT without an id", async () => {
    const api = t.client(ActionService);
    await expect(api.explainAction({ actionId: "no-such-action" })).rejects.toMatchObject({
      code: Code.NOT_FOUND,
    });
    await expect(api.explainAction({ actionId: "" })).rejects.toMatchObject({
      code: Code.INVALID_ARGUMENT,
      details: expect.stringContaining("action_id"),
    });
    await expect(api.explainAction({ actionId: "   " })).rejects.toMatchObject({
      code: Code.INVALID_ARGUMENT,
      details: "action_id: is required (it holds only whitespace)",
    });
  });

  it("leasehold action explain prints the timeline, and --json the response", async () => {
    const api = t.client(ActionService);
    const w = await connectWorker(t.address, { workerId: "explain-d", cluster: "explain-3", capacity: 1 });
    const { action } = await api.submitAction({ cluster: "explain-3" });
    const id = action?.id ?? "";
    const grant = await w.next("grant", (g) => g.actionId === id);
    await w.complete(grant, { output: {} });

    const human = await run(process.execPath, [BIN, "--server", t.address, "action", "explain", id]);
    const lines = human.stdout.trim().split("\n");
    expect(lines[0]).toBe(`action ${id} in cluster explain-3: succeeded, epoch 1, 1 attempt`);
    expect(lines[2]).toMatch(/^TIME\s+EPOCH\s+WHAT HAPPENED$/);
    expect(lines[3]).toMatch(/^\S+Z\s+-\s+submitted by anonymous to cluster explain-3$/);
    expect(lines.at(-1)).toMatch(/^\S+Z\s+1\s+completed by worker explain-d under epoch 1: accepted/);

    const json = await run(process.execPath, [BIN, "--server", t.address, "--json", "action", "explain", id]);
    const parsed = JSON.parse(json.stdout);
    expect(parsed.action.id).toBe(id);
    expect(parsed.timeline[0].event.kind).toBe("EVENT_KIND_ACTION_SUBMITTED");
    expect(parsed.attempts[0].attempt.workerId).toBe("explain-d");

    const missing = await run(process.execPath, [
      BIN,
      "--server",
      t.address,
      "action",
      "explain",
      "nope",
    ]).catch((e) => e);
    expect(missing.code).toBe(4);
    w.goodbye();

    // A queued action's explanation ends with why it is not granted now.
    const { action: queued } = await api.submitAction({
      cluster: "explain-3",
      labelSelector: { gpu: "yes" },
    });
    const waiting = await run(process.execPath, [
      BIN,
      "--server",
      t.address,
      "action",
      "explain",
      queued?.id ?? "",
    ]);
    expect(waiting.stdout.trim().split("\n").at(-1)).toMatch(
      /^\S+Z\s+-\s+not granted now: no worker of cluster explain-3 is connected$/,
    );
  });
});
