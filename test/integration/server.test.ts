import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { delimiter, join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { healthClient, reflectionClient } from "../helpers/grpc-peers.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

const SERVICES = [
  "leasehold.v1.ActionService",
  "leasehold.v1.ClusterService",
  "leasehold.v1.EventService",
  "leasehold.v1.LeaseService",
  "leasehold.v1.ResourceService",
  "leasehold.v1.WorkerService",
];
/**
 * grpcurl, a real third-party client: the GRPCURL variable, else the first on
 * PATH, else the one beside the clone (`../shared/tools/grpcurl`, where our CI
 * machines keep it). Without one its test is skipped, with the reason in its name.
 */
const GRPCURL = [
  process.env.GRPCURL,
  ...(process.env.PATH ?? "").split(delimiter).map((dir) => dir && join(dir, "grpcurl")),
  fileURLToPath(new URL("../../../shared/tools/grpcurl", import.meta.url)),
].find((path): path is string => Boolean(path) && existsSync(path as string));
const NO_GRPCURL = GRPCURL ? "" : " (skipped: no grpcurl in GRPCURL, on PATH or in ../shared/tools)";
if (!GRPCURL) console.warn(`server.test.ts: grpcurl not found${NO_GRPCURL}`);

describe("a started server", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer();
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("listens on an ephemeral port and reports SERVING for itself and every service", async () => {
    expect(t.server.port).toBeGreaterThan(0);
    const health = healthClient(t.address);
    try {
      expect(await health.check("")).toBe("SERVING");
      for (const service of SERVICES) expect(await health.check(service)).toBe("SERVING");
    } finally {
      health.close();
    }
  });

  it("lists every leasehold.v1 service over reflection and describes each with its comments", async () => {
    const reflection = reflectionClient(t.address);
    try {
      const listed = await reflection.ask({ list_services: "*" });
      const names = (listed.list_services_response as { service: { name: string }[] }).service.map(
        (s) => s.name,
      );
      expect(names).toEqual(expect.arrayContaining([...SERVICES, "grpc.health.v1.Health"]));

      for (const service of SERVICES) {
        const answer = await reflection.ask({ file_containing_symbol: service });
        const files = (
          answer.file_descriptor_response as { file_descriptor_proto: Buffer[] }
        ).file_descriptor_proto.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
        const short = service.split(".").at(-1);
        const file = files.find((f) => f.service.some((s) => s.name === short));
        expect(file, `a file describing ${service}`).toBeDefined();
        const desc = file?.service.find((s) => s.name === short);
        expect(desc?.method.length).toBeGreaterThan(0);
        // Source info is served, so clients see the documentation.
        const documented =
          file?.sourceCodeInfo?.location.filter((l) => l.leadingComments.trim() !== "") ?? [];
        expect(documented.length).toBeGreaterThan(desc?.method.length ?? 0);
      }
    } finally {
      reflection.close();
    }
  });

  // grpcurl is a real third-party client; CI has it, a user's machine may not.
  it.skipIf(!GRPCURL)(`can be listed, described and called with grpcurl${NO_GRPCURL}`, async () => {
    // Async: the server runs in this process, so a blocking child would starve it.
    const grpcurl = async (...args: string[]) =>
      (await promisify(execFile)(GRPCURL as string, ["-plaintext", ...args], { encoding: "utf8" })).stdout;
    expect((await grpcurl(t.address, "list")).split("\n")).toEqual(expect.arrayContaining(SERVICES));
    expect(await grpcurl(t.address, "describe", "leasehold.v1.ActionService.SubmitAction")).toMatch(
      /Retrying with the same request_id returns the action/,
    );
    const response = JSON.parse(
      await grpcurl(
        "-d",
        '{"cluster":"gpu","payload":{"argv":["echo","hi"]}}',
        t.address,
        "leasehold.v1.ActionService/SubmitAction",
      ),
    );
    expect(response).toMatchObject({
      created: true,
      action: { cluster: "gpu", state: "ACTION_STATE_QUEUED" },
    });
  });
});
