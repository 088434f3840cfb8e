import { create } from "@bufbuild/protobuf";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import {
  type LiveTestClients,
  type LiveTestEvent,
  runLiveTest,
  waitForLease,
} from "../../src/cli/lease-run.js";
import { parseManifest } from "../../src/cli/manifest.js";
import { cliErrorFrom, EXIT } from "../../src/cli/output.js";
import { LeaseholdError } from "../../src/errors.js";
import {
  CloseReason,
  CollectOutputsResponseSchema,
  LeaseSchema,
  LeaseState,
  WaitLeaseResponseSchema,
} from "../../src/gen/leasehold/v1/lease_pb.js";
import { DeploymentPhase, ResourceSchema } from "../../src/gen/leasehold/v1/resource_pb.js";
import { toStatusObject } from "../../src/rpc/status.js";

const MANIFEST = parseManifest(
  `runtime: east
deployment:
  containers: [{name: web, argv: [sleep, "60"]}]
  outputs_dir: out
outputs:
  promote: [report.txt]
`,
  { file: "manifest.yaml", dir: "/m" },
);

/** What grpc-js throws for a call while the server is down. */
const refused = () =>
  Object.assign(new Error("14 UNAVAILABLE: No connection established"), {
    code: 14,
    details: "No connection established. Last error: connect ECONNREFUSED 127.0.0.1:50051",
  });

/** What grpc-js throws for a call whose connection broke after the request was sent (a server killed). */
const dropped = () =>
  Object.assign(new Error("14 UNAVAILABLE: Connection dropped"), {
    code: 14,
    details: "Connection dropped",
  });

/**
 * Clients of a server that works, except that the first `down[method]` calls
 * of a method fail as a server that went away fails them. `calls` counts every
 * call by method.
 */
function clientsDown(down: Record<string, number>) {
  const calls: Record<string, number> = {};
  const answer =
    <T>(method: string, value: T) =>
    async () => {
      calls[method] = (calls[method] ?? 0) + 1;
      if (calls[method] <= (down[method] ?? 0)) throw refused();
      return value;
    };
  const lease = create(LeaseSchema, { id: "l1", runtime: "east", state: LeaseState.OPEN });
  const file = create(ResourceSchema, {
    id: "f1",
    body: { case: "file", value: { name: "report.txt" } },
  });
  const clients = {
    leases: {
      createLease: answer("createLease", { lease }),
      getLease: answer("getLease", { lease }),
      waitLease: async function* () {
        yield create(WaitLeaseResponseSchema, {
          done: true,
          deployment: { id: "d1", phase: DeploymentPhase.READY },
        });
      },
      collectOutputs: answer("collectOutputs", create(CollectOutputsResponseSchema, { fileIds: ["f1"] })),
      promoteResource: answer("promoteResource", { resource: file }),
      setResult: answer("setResult", { lease }),
      rollbackLease: answer("rollbackLease", { lease, destroyedResources: 2 }),
    },
    resources: {
      createDeployment: answer("createDeployment", { resource: { id: "d1" } }),
      getResource: answer("getResource", { resource: file }),
    },
  };
  return { clients: clients as unknown as LiveTestClients, calls, lease };
}

async function run(clients: LiveTestClients) {
  const events: LiveTestEvent[] = [];
  const outcome = await runLiveTest(clients, {
    manifest: MANIFEST,
    keepLease: false,
    emit: (e) => events.push(e),
    signal: new AbortController().signal,
    server: "127.0.0.1:50051",
  });
  return { outcome, events, names: events.map((e) => e.event).filter((n) => n !== "deployment_phase") };
}

describe("lease run through a server restart", () => {
  it("collects the outputs, records the result and rolls the lease back once a server that went away after the checks is back", async () => {
    const { clients, calls } = clientsDown({
      collectOutputs: 1,
      getResource: 1,
      promoteResource: 1,
      setResult: 1,
      rollbackLease: 2,
    });
    const { outcome, events, names } = await run(clients);
    expect(names).toEqual([
      "lease_created",
      "deployment_created",
      "deployment_ready",
      "server_unavailable",
      "outputs_collected",
      "server_unavailable",
      "output_promoted",
      "server_unavailable",
      "result_recorded",
      "server_unavailable",
      "lease_rolled_back",
      "done",
    ]);
    expect(outcome).toEqual({ passed: true, exitCode: 0 });
    expect(calls).toMatchObject({ collectOutputs: 2, setResult: 2, rollbackLease: 3 });
    // Said once per outage (until something else happens), naming the step and why; not once per try.
    expect(events.filter((e) => e.event === "server_unavailable").map((e) => e.step)).toEqual([
      "collect_outputs",
      "promote_outputs",
      "record_result",
      "rollback",
    ]);
    expect(events.find((e) => e.event === "server_unavailable")?.message).toBe(
      "the server at 127.0.0.1:50051 is unavailable (connect ECONNREFUSED 127.0.0.1:50051); trying again",
    );
    expect(events.at(-1)).toMatchObject({ event: "done", passed: true, exit_code: 0, lease_id: "l1" });
  });

  it("rolls the lease back through a restart after a step failed for another reason", async () => {
    const { clients, calls } = clientsDown({ rollbackLease: 3 });
    clients.leases.promoteResource = async () => {
      throw Object.assign(new Error("9 FAILED_PRECONDITION: no"), { code: 9, details: "no" });
    };
    const { outcome, names } = await run(clients);
    // The failed run's result is recorded before the rollback is tried.
    expect(names.slice(-5)).toEqual([
      "error",
      "result_recorded",
      "server_unavailable",
      "lease_rolled_back",
      "done",
    ]);
    expect(outcome).toMatchObject({ passed: false, exitCode: 1, error: "no" });
    expect(calls.rollbackLease).toBe(4);
  });
});

describe("lease run's wait through a server restart", () => {
  it("waits again for a wait whose stream broke before its first message, once the server is back", async () => {
    const { clients } = clientsDown({});
    let waits = 0;
    clients.leases.waitLease = async function* () {
      waits++;
      // Killed right after the deployment was created: the first stream breaks before it answers.
      if (waits === 1) throw dropped();
      yield create(WaitLeaseResponseSchema, {
        done: true,
        deployment: { id: "d1", phase: DeploymentPhase.READY },
      });
    } as never;
    const { outcome, events, names } = await run(clients);
    expect(names.slice(0, 4)).toEqual([
      "lease_created",
      "deployment_created",
      "server_unavailable",
      "deployment_ready",
    ]);
    expect(events.find((e) => e.event === "server_unavailable")?.step).toBe("wait_ready");
    expect(outcome).toEqual({ passed: true, exitCode: 0 });
    expect(waits).toBe(2);
  });

  it("names the call it waits for in server_unavailable: the result after a failed wait, not the wait", async () => {
    const { clients, calls } = clientsDown({ setResult: 1 });
    clients.leases.waitLease = async function* () {
      yield* [];
      throw Object.assign(new Error("13 INTERNAL: boom"), { code: 13, details: "boom" });
    } as never;
    const { outcome, events, names } = await run(clients);
    expect(names.slice(-5)).toEqual([
      "error",
      "server_unavailable",
      "result_recorded",
      "lease_rolled_back",
      "done",
    ]);
    expect(events.find((e) => e.event === "error")?.step).toBe("wait_ready");
    expect(events.find((e) => e.event === "server_unavailable")?.step).toBe("record_result");
    expect(outcome).toMatchObject({ passed: false, exitCode: 1 });
    expect(calls.setResult).toBe(2);
  });

  it("says of a wait cut off in flight that it asked for no change, not that a change's outcome is unknown", async () => {
    const { clients } = clientsDown({});
    clients.leases.waitLease = async function* () {
      yield* [];
      throw dropped();
    } as never;
    // Never answered, and not known to have reached this server: thrown at once (a wrong address).
    const error = await waitForLease(clients.leases, "l1", 60_000, () => {}).catch((e: unknown) => e);
    const e = cliErrorFrom(error, "127.0.0.1:50051");
    expect(e).toMatchObject({ exitCode: EXIT.unreachable });
    expect(e.message).toBe(
      "the connection to the server at 127.0.0.1:50051 broke during the call (Connection dropped): it asked " +
        "for no change, so running it again once the server is back is safe",
    );
    // The same error from a call that asks for a change still says its outcome is unknown.
    expect(cliErrorFrom(dropped(), "127.0.0.1:50051").message).toContain(
      "the outcome of a change it asked for is unknown",
    );
  });
});

describe("lease run's final rollback", () => {
  it("counts a rollback refused because an earlier try whose answer was lost did it as done", async () => {
    const { clients, calls, lease } = clientsDown({});
    let tries = 0;
    clients.leases.rollbackLease = async () => {
      tries++;
      if (tries === 1) {
        // The server rolled it back, then went away before answering.
        lease.state = LeaseState.ROLLED_BACK;
        lease.closeReason = CloseReason.ROLLED_BACK;
        throw refused();
      }
      throw toStatusObject(
        LeaseholdError.failedPrecondition("LEASE_CLOSED", "cannot roll back: lease l1 is ROLLED_BACK", {
          type: "LEASE_STATE",
          subject: "leases/l1",
          description: "state is ROLLED_BACK",
        }),
        pino({ enabled: false }),
        "RollbackLease",
      );
    };
    const { outcome, events, names } = await run(clients);
    expect(names.slice(-3)).toEqual(["server_unavailable", "lease_rolled_back", "done"]);
    expect(events.find((e) => e.event === "lease_rolled_back")).toMatchObject({
      destroyed_resources: 0,
      already: true,
      close_reason: "ROLLED_BACK",
    });
    expect(outcome).toEqual({ passed: true, exitCode: 0 });
    expect(tries).toBe(2);
    expect(calls.setResult).toBe(1);
  });
});
