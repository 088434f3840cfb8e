import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { cancelMatching } from "../../src/cli/action-commands.js";
import { CliError } from "../../src/cli/output.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { toStatusObject } from "../../src/rpc/status.js";

type Api = Parameters<typeof cancelMatching>[0];
type Answer = { cancelledIds: string[]; cancelRequestedIds: string[]; more: boolean };

/** A CancelActions that answers `steps` in turn: an answer, or a status the server refused with. */
function fakeApi(steps: (Answer | LeaseholdError)[]): { api: Api; calls: () => number } {
  let calls = 0;
  const log = pino({ level: "silent" });
  const api = {
    async cancelActions() {
      const step = steps[calls++];
      if (step instanceof LeaseholdError) {
        // As a grpc-js client sees it: code, details and the status details in the metadata.
        const status = toStatusObject(step, log, "leasehold.v1.ActionService/CancelActions");
        throw Object.assign(new Error(status.details), status);
      }
      if (!step) throw new Error("called too often");
      return step;
    },
  } as unknown as Api;
  return { api, calls: () => calls };
}

const busy = () =>
  new LeaseholdError(Code.ResourceExhausted, "the server is busy", {
    reason: "UNARY_CALLS_OVER_LIMIT",
    retryDelayMs: 20,
  });

describe("action cancel without an id", () => {
  let out: string[];
  beforeEach(() => {
    out = [];
    vi.spyOn(process.stdout, "write").mockImplementation((chunk) => {
      out.push(String(chunk));
      return true;
    });
  });
  afterEach(() => {
    vi.restoreAllMocks();
  });

  it("calls again while more match, and again after a busy server's RetryInfo delay", async () => {
    const { api, calls } = fakeApi([
      { cancelledIds: ["a", "b"], cancelRequestedIds: ["c"], more: true },
      busy(),
      { cancelledIds: ["d"], cancelRequestedIds: [], more: false },
    ]);
    await cancelMatching(api, true, { cluster: "east", runId: "r" });
    expect(calls()).toBe(3);
    expect(JSON.parse(out.join(""))).toEqual({ cancelledIds: ["a", "b", "d"], cancelRequestedIds: ["c"] });
  });

  it("gives up after a few busy answers, saying how far it got and to run it again", async () => {
    const { api, calls } = fakeApi([
      { cancelledIds: ["a"], cancelRequestedIds: [], more: true },
      busy(),
      busy(),
      busy(),
      busy(),
      busy(),
    ]);
    const error = await cancelMatching(api, false, { cluster: "east", all: true }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(CliError);
    expect((error as CliError).message).toMatch(
      /^the server is busy\nso far 1 cancelled and 0 cancel requested; run the same command again to go on$/,
    );
    expect(calls()).toBe(6);
  });
});
