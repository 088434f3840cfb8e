import { afterEach, describe, expect, it } from "vitest";
import {
  type ActionContext,
  ActionFailure,
  type AgentOptions,
  createAgent,
  type JsonObject,
} from "../../src/agent/index.js";
import type { JsonObject as ClientJsonObject } from "../../src/client.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { agentEvents, finishedOf } from "../helpers/agent-events.js";
import { startTestServer } from "../helpers/server.js";

/** Returns what each payload's `kind` names: results a handler should not return, and good ones. */
function handler(ctx: ActionContext): Promise<JsonObject | undefined> {
  const kind = ctx.payload.kind;
  const circular = (): JsonObject => {
    const res: JsonObject = { ok: true };
    res.req = { res };
    return res;
  };
  const results: Record<string, () => unknown> = {
    circular,
    date: () => ({ at: new Date(0) }),
    string: () => "hello",
    number: () => 42,
    array: () => [1, 2, 3],
    bigint: () => ({ n: 10n }),
    map: () => ({ m: new Map() }),
    function: () => ({ f: () => 1 }),
    nothing: () => undefined,
    ok: () => ({ done: true }),
    "circular-details": () => {
      throw new ActionFailure("bad input", { retryable: true, details: circular() });
    },
    "long-message": () => {
      throw new Error(`upstream returned 503: ${"x".repeat(70_000)}`);
    },
    "large-details": () => {
      throw new ActionFailure("too much", { details: { blob: "y".repeat(1_100_000) } });
    },
  };
  return Promise.resolve().then(() => (results[String(kind)] as () => JsonObject | undefined)());
}

describe("what an SDK handler returns or throws reaches the server as JSON, or as a failure that says why", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  /** Runs one action of each kind at once on one agent; the settled actions, by kind. */
  async function runKinds(kinds: string[]) {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const events = agentEvents();
    const agent = createAgent({
      address: t.address,
      cluster: "east",
      workerId: "results",
      capacity: kinds.length,
      onEvent: events.onEvent,
      handler,
    });
    cleanups.push(() => agent.close({ timeoutMs: 1000 }));
    const api = t.client(ActionService);
    const ids = new Map<string, string>();
    for (const kind of kinds) {
      const { action } = await api.submitAction({
        cluster: "east",
        payload: { kind },
        retryPolicy: { maxAttempts: 1 },
      });
      ids.set(kind, action?.id ?? "");
    }
    await Promise.all([...ids.values()].map((id) => events.until(finishedOf(id))));
    const actions = new Map<string, NonNullable<Awaited<ReturnType<typeof api.getAction>>["action"]>>();
    for (const [kind, id] of ids) {
      const { action } = await api.getAction({ actionId: id });
      if (action) actions.set(kind, action);
    }
    await agent.close({ timeoutMs: 1000 });
    return actions;
  }

  it("a circular output fails its action, not retried, naming where; the agent and its other actions go on", async () => {
    const actions = await runKinds(["circular", "ok"]);
    expect(actions.get("circular")).toMatchObject({
      state: ActionState.FAILED,
      lastError: {
        message:
          "the handler's output cannot be sent as JSON: output.req.res is circular: it is output again",
        retryable: false,
      },
    });
    expect(actions.get("ok")).toMatchObject({ state: ActionState.SUCCEEDED, output: { done: true } });
  });

  it("an output that is not a JSON object fails its action with what was wrong and where, instead of storing something else", async () => {
    const actions = await runKinds([
      "date",
      "string",
      "number",
      "array",
      "bigint",
      "map",
      "function",
      "nothing",
    ]);
    const failed = (kind: string) => {
      const a = actions.get(kind);
      expect(a?.state, kind).toBe(ActionState.FAILED);
      expect(a?.lastError?.retryable, kind).toBe(false);
      return a?.lastError?.message;
    };
    expect(failed("date")).toMatch(
      /^the handler's output cannot be sent as JSON: output\.at is a Date, which JSON cannot hold/,
    );
    expect(failed("string")).toBe(
      "the handler's output cannot be sent as JSON: output is a string: return a JSON object (or nothing)",
    );
    expect(failed("number")).toMatch(/output is a number: return a JSON object/);
    expect(failed("array")).toMatch(/output is an array: return a JSON object/);
    expect(failed("bigint")).toMatch(/output\.n is a bigint, which JSON cannot hold/);
    expect(failed("map")).toMatch(/output\.m is a Map, which JSON cannot hold/);
    expect(failed("function")).toMatch(/output\.f is a function, which JSON cannot hold/);
    expect(actions.get("nothing")?.state).toBe(ActionState.SUCCEEDED);
  });

  it("a failure keeps its message and retryable flag: details that are not JSON or too large are left out, and an over-long message is cut, saying so", async () => {
    const actions = await runKinds(["circular-details", "long-message", "large-details"]);
    expect(actions.get("circular-details")?.lastError).toMatchObject({
      message:
        "bad input (its details were left out: they cannot be sent as JSON: details.req.res is circular: it is details again)",
      retryable: true,
    });
    expect(actions.get("circular-details")?.lastError?.details).toBeUndefined();
    const long = actions.get("long-message")?.lastError;
    expect(long?.retryable).toBe(true);
    const message = long?.message ?? "";
    // Within the server's limit, and cut no more than the note about it takes.
    expect(message.length).toBeLessThanOrEqual(65_536);
    expect(message.length).toBeGreaterThan(65_500);
    const cut = /^upstream returned 503: x+… \((\d+) characters cut\)$/.exec(message);
    expect(cut).not.toBeNull();
    expect(message.length - `… (${cut?.[1]} characters cut)`.length + Number(cut?.[1])).toBe(
      "upstream returned 503: ".length + 70_000,
    );
    const large = actions.get("large-details")?.lastError;
    expect(large).toMatchObject({ retryable: true });
    expect(large?.message).toMatch(/^too much \(its details were left out: completion\.failed\.details/);
    expect(large?.details).toBeUndefined();
  });

  it("a handler may return nothing, and JsonObject comes from the SDK's entry points (type-checked)", () => {
    const work = (): Promise<void> => Promise.resolve();
    const returnsNothing: AgentOptions["handler"] = async () => {
      await work();
    };
    const output: ClientJsonObject = { ok: true };
    const returnsOutput: AgentOptions["handler"] = async () => output;
    expect([returnsNothing, returnsOutput]).toHaveLength(2);
  });
});
