import { describe, expect, it } from "vitest";
import { deploymentView } from "../../src/scope/deployment.js";
import type { ResourceRecord } from "../../src/store/scope-leases.js";
import type { ActionRecord } from "../../src/work/action.js";

const resource = {
  id: "d1",
  leaseId: "l1",
  actionId: "a1",
  body: { containers: [{ name: "web" }, { name: "late" }] },
} as unknown as ResourceRecord;

/** An action of the deployment; only the fields a view reads matter. */
const action = (fields: Partial<ActionRecord>) =>
  ({
    state: "LEASED",
    cluster: "east",
    attemptCount: 1,
    epoch: 1,
    workerId: "w1",
    phase: "ready",
    phaseDetails: null,
    stopReason: null,
    output: null,
    lastError: null,
    failureReason: "",
    ...fields,
  }) as ActionRecord;

/** The last progress report: one container running, one not started yet. */
const lastReport = {
  containers: [
    { name: "web", state: "running", exitCode: 0, message: "" },
    { name: "late", state: "waiting", exitCode: 0, message: "" },
  ],
};

describe("a deployment's view", () => {
  it("shows a destroyed deployment's containers stopped, not running as its last report left them", () => {
    const view = deploymentView(
      resource,
      action({
        state: "CANCELLED",
        phaseDetails: lastReport,
        failureReason: "scope lease l1 was rolled back",
      }),
    );
    expect(view).toMatchObject({ phase: "STOPPED", message: "scope lease l1 was rolled back" });
    expect(view.containers).toEqual([
      {
        name: "web",
        state: "exited",
        exitCode: 0,
        message: "stopped with the deployment; its exit was not reported",
      },
      {
        name: "late",
        state: "waiting",
        exitCode: 0,
        message: "never started",
      },
    ]);
  });

  it("keeps a running deployment's containers as reported, and an ended one's from its final report", () => {
    expect(deploymentView(resource, action({ phaseDetails: lastReport })).containers).toEqual(
      lastReport.containers,
    );
    const final = [{ name: "web", state: "exited", exitCode: 143, message: "stopped by SIGTERM" }];
    const ended = action({ state: "SUCCEEDED", phaseDetails: lastReport, output: { containers: final } });
    expect(deploymentView(resource, ended).containers).toEqual(final);
  });
});
