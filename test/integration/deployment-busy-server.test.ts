import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createAgent, createDeploymentHandler } from "../../src/agent/index.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import {
  CreateFileRequestSchema,
  DeploymentPhase,
  type DownloadFileRequest,
  ResourceService,
} from "../../src/gen/leasehold/v1/resource_pb.js";
import { createServiceDefinition } from "../../src/rpc/adapter.js";
import { createClient } from "../../src/rpc/client.js";
import { toStatusObject } from "../../src/rpc/status.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/**
 * A server serving as many unary calls as it takes refuses more with
 * RESOURCE_EXHAUSTED, reason UNARY_CALLS_OVER_LIMIT, having done nothing. The
 * agent saving a deployment's outputs waits that out instead of dropping them,
 * and one fetching its inputs also waits out servers that are unavailable.
 */
describe("a deployment's outputs, saved through a server too busy for a moment", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer({ config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  /**
   * Starts `front` on a port of its own and an agent of cluster `runtime` whose deployment
   * handler calls the ResourceService through it (its stream goes to the server itself).
   */
  async function agentBehind(front: grpc.Server, runtime: string, workerId: string) {
    const port = await new Promise<number>((resolve, reject) =>
      front.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
        error ? reject(error) : resolve(p),
      ),
    );
    const workDir = await mkdtemp(join(tmpdir(), `leasehold-${runtime}-`));
    const agent = createAgent({
      address: t.address,
      cluster: runtime,
      workerId,
      handler: createDeploymentHandler({ address: `127.0.0.1:${port}`, workDir }),
    });
    return { workDir, agent };
  }

  it("are saved once the server takes calls again", async () => {
    // The agent's ResourceService calls go through this front, which refuses the first two
    // uploads as the server does when it is busy, then passes everything on.
    const real = createClient(ResourceService, t.address);
    let refused = 0;
    const front = new grpc.Server();
    front.addService(createServiceDefinition(ResourceService), {
      createFile(call: grpc.ServerUnaryCall<Buffer, unknown>, done: grpc.sendUnaryData<unknown>) {
        if (refused < 2) {
          refused++;
          const busy = new LeaseholdError(Code.ResourceExhausted, "serving 32 unary calls, 224 waiting", {
            reason: "UNARY_CALLS_OVER_LIMIT",
          });
          done(toStatusObject(busy, pino({ level: "silent" }), "CreateFile"));
          return;
        }
        // Unary requests reach a handler as bytes (the adapter decodes them in the call).
        real.createFile(fromBinary(CreateFileRequestSchema, call.request)).then(
          (response) => done(null, response),
          (error: unknown) => done(toStatusObject(error, pino({ level: "silent" }), "CreateFile")),
        );
      },
    });
    const { workDir, agent } = await agentBehind(front, "busy", "saver");
    const runtime = "busy";
    try {
      const leases = t.client(LeaseService);
      const leaseId = (await leases.createLease({ runtime })).lease?.id ?? "";
      const script = `require("fs").writeFileSync("out/a.txt", "one"); setInterval(() => {}, 1000);`;
      await t.client(ResourceService).createDeployment({
        leaseId,
        spec: {
          containers: [{ name: "w", command: { argv: [process.execPath, "-e", script] } }],
          readinessProbe: { check: { case: "exec", value: { argv: ["test", "-f", "out/a.txt"] } } },
          outputsDir: "out",
        },
      });
      for await (const _ of leases.waitLease({ leaseId, timeout: { seconds: 60n } }));
      const collected = await leases.collectOutputs({ leaseId, timeout: { seconds: 60n } });
      expect(refused).toBe(2);
      expect(collected.skipped).toEqual([]);
      expect(collected.fileIds).toHaveLength(1);
    } finally {
      await agent.close({ timeoutMs: 0 });
      front.forceShutdown();
      real.close();
      await rm(workDir, { recursive: true, force: true });
    }
  }, 120_000);
  it("fetches its inputs through servers that are unavailable for a moment (a restart)", async () => {
    // Downloads go through a front that answers the first two UNAVAILABLE, as a server does while
    // it restarts, then passes them on: a read is safe to repeat.
    const real = createClient(ResourceService, t.address);
    let unavailable = 0;
    const front = new grpc.Server();
    front.addService(createServiceDefinition(ResourceService), {
      // A server-streaming request reaches the handler decoded (unlike a unary one).
      async downloadFile(call: grpc.ServerWritableStream<DownloadFileRequest, unknown>) {
        if (unavailable < 2) {
          unavailable++;
          call.emit("error", { code: grpc.status.UNAVAILABLE, details: "restarting (injected)" });
          return;
        }
        try {
          for await (const part of real.downloadFile(call.request)) call.write(part);
          call.end();
        } catch (error) {
          call.emit("error", toStatusObject(error, pino({ level: "silent" }), "DownloadFile"));
        }
      },
    });
    const { workDir, agent } = await agentBehind(front, "restarting", "fetcher");
    const runtime = "restarting";
    try {
      const leases = t.client(LeaseService);
      const leaseId = (await leases.createLease({ runtime })).lease?.id ?? "";
      const file = await t.client(ResourceService).createFile({
        leaseId,
        name: "in.txt",
        content: new TextEncoder().encode("input"),
      });
      await t.client(ResourceService).createDeployment({
        leaseId,
        spec: {
          containers: [
            { name: "w", command: { argv: [process.execPath, "-e", "setInterval(() => {}, 1000)"] } },
          ],
          readinessProbe: { check: { case: "exec", value: { argv: ["test", "-f", "in.txt"] } } },
          inputs: [{ fileId: file.resource?.id ?? "", path: "in.txt" }],
        },
      });
      let last: { phase: DeploymentPhase | undefined; message: string | undefined } | undefined;
      for await (const m of leases.waitLease({ leaseId, timeout: { seconds: 60n } }))
        last = { phase: m.deployment?.phase, message: m.deployment?.message };
      expect(unavailable).toBe(2);
      expect(last).toEqual({ phase: DeploymentPhase.READY, message: expect.any(String) });
    } finally {
      await agent.close({ timeoutMs: 0 });
      front.forceShutdown();
      real.close();
      await rm(workDir, { recursive: true, force: true });
    }
  }, 120_000);
});
