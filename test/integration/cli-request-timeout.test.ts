import * as grpc from "@grpc/grpc-js";
import { describe, expect, it, onTestFinished } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { createServiceDefinition } from "../../src/rpc/adapter.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { runCli } from "../helpers/process.js";

/** A server that takes every ActionService call and never answers it: a hung process. */
async function hungActionServer(): Promise<{ address: string; calls: () => number }> {
  let calls = 0;
  const server = new grpc.Server();
  const never = () => {
    calls += 1;
  };
  server.addService(
    createServiceDefinition(ActionService),
    Object.fromEntries(ActionService.methods.map((m) => [m.localName, never])),
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
      error ? reject(error) : resolve(p),
    ),
  );
  onTestFinished(() => server.forceShutdown());
  return { address: `127.0.0.1:${port}`, calls: () => calls };
}

describe.runIf(runsDriverNeutralTests())("the CLI's --request-timeout", () => {
  it("gives up on a server that never answers, saying the outcome is unknown (exit 3)", async () => {
    const hung = await hungActionServer();
    const r = await runCli(["--server", hung.address, "--request-timeout", "500ms", "action", "get", "a1"]);
    expect(hung.calls()).toBe(1);
    expect(r.code).toBe(3);
    expect(r.stderr).toContain(
      `the server at ${hung.address} did not answer within 0.5 s (--request-timeout)`,
    );
    expect(r.stderr).toContain("may or may not have been made");
  });

  it("is refused when it is not a duration, naming the flag (exit 2)", async () => {
    const r = await runCli(["--request-timeout", "soon", "action", "get", "a1"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--request-timeout/);
  });
});
