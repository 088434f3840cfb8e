import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { healthClient, reflectionClient } from "../helpers/grpc-peers.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

describe("reflection and health with authentication on", () => {
  let dir: string;
  let open: TestServer;
  let closed: TestServer;
  let token: string;
  const bearer = (t: string) => {
    const m = new grpc.Metadata();
    m.set("authorization", `Bearer ${t}`);
    return m;
  };

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-reflection-"));
    const tokens = join(dir, "tokens.yaml");
    // A principal with no role at all: authenticated, allowed nothing.
    token = addStaticToken(tokens, { principal: "nobody", bindings: [] });
    // Tokens in plaintext are fine on loopback, which is where these listen.
    open = await startTestServer({ config: { authTokens: tokens } });
    closed = await startTestServer({ config: { authTokens: tokens, reflection: "authenticated" } });
  }, 60_000);

  afterAll(async () => {
    await open?.[Symbol.asyncDispose]();
    await closed?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  it("keeps health open to anyone", async () => {
    for (const server of [open, closed]) {
      const health = healthClient(server.address);
      expect(await health.check("")).toBe("SERVING");
      health.close();
    }
  });

  it("serves reflection to anyone by default, and only to authenticated callers when told", async () => {
    const anyone = reflectionClient(open.address);
    expect(await anyone.ask({ list_services: "" })).toHaveProperty("list_services_response");
    anyone.close();

    const anonymous = reflectionClient(closed.address);
    await expect(anonymous.ask({ list_services: "" })).rejects.toMatchObject({ code: Code.Unauthenticated });
    anonymous.close();
    const wrong = reflectionClient(closed.address, bearer("lh_not-a-token"));
    await expect(wrong.ask({ list_services: "" })).rejects.toMatchObject({ code: Code.Unauthenticated });
    wrong.close();
    // Any valid principal may read the schema, even one the policy allows nothing else.
    const known = reflectionClient(closed.address, bearer(token));
    expect(await known.ask({ list_services: "" })).toHaveProperty("list_services_response");
    known.close();
    const api = closed.client(ActionService);
    await expect(api.listActions({}, { metadata: bearer(token) })).rejects.toMatchObject({
      code: Code.PermissionDenied,
    });
  });
});
