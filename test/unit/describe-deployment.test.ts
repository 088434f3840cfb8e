import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { describeDeployment } from "../../src/cli/lease-run.js";
import { DeploymentPhase, DeploymentSchema } from "../../src/gen/leasehold/v1/resource_pb.js";

describe("describeDeployment", () => {
  it("says each container's state, with an exited one's code and why", () => {
    const deployment = create(DeploymentSchema, {
      id: "d1",
      phase: DeploymentPhase.STOPPED,
      message: "stopped",
      containers: [
        { name: "web", state: "exited", exitCode: 143, message: "stopped by SIGTERM" },
        { name: "side", state: "running" },
      ],
    });
    expect(describeDeployment(deployment)).toBe(
      "d1 STOPPED web=exited(143, stopped by SIGTERM) side=running - stopped",
    );
  });
});
