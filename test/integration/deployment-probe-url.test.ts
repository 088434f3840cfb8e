import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ActionContext } from "../../src/agent/agent.js";
import { createDeploymentHandler } from "../../src/agent/index.js";
import type { JsonObject } from "../../src/work/action.js";

/**
 * A deployment's readiness probe is the agent's own request (resource.proto,
 * ReadinessProbe.http_get): the agent GETs nothing but its own host, with no
 * user name or password, even when an older server let such a URL through,
 * and follows a redirect only to such a URL. The URLs refused here all lead
 * to this machine's loopback anyway, so an agent that did fetch them sends
 * nothing anywhere else.
 */
describe("a deployment's http_get readiness probe, on the agent", () => {
  let workDir: string;
  let web: Server;
  let port = 0;
  /** The paths the web server was asked for. */
  const asked: string[] = [];

  beforeAll(async () => {
    workDir = await mkdtemp(join(tmpdir(), "leasehold-probe-url-"));
    web = createServer((request, response) => {
      asked.push(request.url ?? "");
      if (request.url === "/same") response.writeHead(302, { location: "/ok" }).end();
      // The loopback again, but as a host a probe may not name.
      else if (request.url === "/away")
        response.writeHead(302, { location: `http://[::ffff:127.0.0.1]:${port}/ok-away` }).end();
      else response.writeHead(200).end("ok");
    });
    await new Promise<void>((resolve) => web.listen(0, "127.0.0.1", resolve));
    port = (web.address() as { port: number }).port;
  });
  afterAll(async () => {
    web.close();
    await rm(workDir, { recursive: true, force: true });
  });

  /** Runs a deployment of one container running `script` with this probe URL; its phases are kept. */
  const deploy = (url: string, script: string, id: string) => {
    const handler = createDeploymentHandler({ address: "127.0.0.1:1", workDir, stopGraceMs: 1000 });
    const phases: string[] = [];
    const stop = new AbortController();
    const spec = {
      containers: [{ name: "c", command: { argv: [process.execPath, "-e", script] } }],
      readinessProbe: { httpGet: url, period: "0.1s" },
    };
    const ctx: ActionContext = {
      actionId: id,
      epoch: 1,
      attempt: 1,
      payload: { deployment: { id, leaseId: "", spec } } as unknown as JsonObject,
      runId: id,
      checkpoint: undefined,
      signal: new AbortController().signal,
      stopRequested: stop.signal,
      progress: (phase) => {
        phases.push(phase);
        if (phase === "ready") stop.abort();
      },
    };
    return { result: handler(ctx), phases };
  };

  it.each([
    ["a user name and password", `http://user:pw@127.0.0.1:1/`, /must not carry a user name or password/],
    ["0.0.0.0", `http://0.0.0.0:1/`, /must be on the agent's own host .*not "0\.0\.0\.0"/],
    ["an IPv4-mapped address", `http://[::ffff:127.0.0.1]:1/`, /must be on the agent's own host/],
    ["another scheme", "ftp://127.0.0.1/", /must be an http:\/\/ or https:\/\/ URL/],
  ])("fails a deployment whose URL has %s, not retryable, before anything starts", async (_, url, why) => {
    const { result, phases } = deploy(url, "", "refused");
    await expect(result).rejects.toMatchObject({
      retryable: false,
      message: expect.stringMatching(new RegExp(`^readiness_probe\\.http_get .* refused: ${why.source}`)),
    });
    expect(phases).toEqual([]);
  });

  it("follows a redirect on its own host, and not one to another host", async () => {
    const same = deploy(`http://localhost:${port}/same`, "setInterval(() => {}, 1000)", "same");
    await same.result;
    expect(same.phases).toContain("ready");
    expect(asked).toContain("/ok");

    // Never ready: it ends when its container does.
    const away = deploy(`http://127.0.0.1:${port}/away`, "setTimeout(() => {}, 1500)", "away");
    await away.result;
    expect(away.phases).not.toContain("ready");
    expect(asked).toContain("/away");
    expect(asked).not.toContain("/ok-away");
  });
});
