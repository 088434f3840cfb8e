import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { Code as ConnectCode, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { BadRequestSchema, ErrorInfoSchema } from "../../src/gen/google/rpc/error_details_pb.js";
import { ActionService, ActionState, ActionView } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService, WorkerState } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { type Ca, type CertificateFiles, createCa, issueCertificate } from "../helpers/pki.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

/** A raw HTTP/1.1 request to the console, for what a Connect client would never send. */
function raw(
  port: number,
  options: { path: string; method?: string; headers?: Record<string, string>; body?: string },
): Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        host: "127.0.0.1",
        port,
        path: options.path,
        method: options.method ?? "GET",
        headers: options.headers,
      },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (chunk: string) => {
          body += chunk;
        });
        res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      },
    );
    req.on("error", reject);
    req.end(options.body);
  });
}

describe("the console's Connect API", () => {
  let t: TestServer;
  let port: number;
  let staticDir: string;
  const transport = () =>
    createConnectTransport({
      baseUrl: `http://127.0.0.1:${port}`,
      httpVersion: "1.1",
      useBinaryFormat: false,
    });

  beforeAll(async () => {
    staticDir = mkdtempSync(join(tmpdir(), "leasehold-console-"));
    writeFileSync(join(staticDir, "index.html"), "<!doctype html><title>Leasehold</title>");
    writeFileSync(join(staticDir, "app.js"), "export {};");
    t = await startTestServer({
      config: { consoleListen: "127.0.0.1:0" },
      overrides: { consoleStaticDir: staticDir },
    });
    port = t.server.consolePort as number;
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    rmSync(staticDir, { recursive: true, force: true });
  });

  it("serves the page with a policy that lets it load and call only its own origin", async () => {
    const page = await raw(port, { path: "/", headers: { host: `127.0.0.1:${port}` } });
    expect(page.status).toBe(200);
    expect(page.body).toContain("<title>Leasehold</title>");
    expect(page.headers["content-type"]).toBe("text/html; charset=utf-8");
    expect(page.headers["content-security-policy"]).toContain("connect-src 'self'");
    expect(page.headers["content-security-policy"]).toContain("frame-ancestors 'none'");
    const again = await raw(port, {
      path: "/",
      headers: { host: `localhost:${port}`, "if-none-match": String(page.headers.etag) },
    });
    expect(again.status).toBe(304);
    const script = await raw(port, { path: "/app.js", headers: { host: `[::1]:${port}` } });
    expect(script.headers["content-type"]).toBe("text/javascript; charset=utf-8");
    expect(script.body).toBe("export {};");
    const gzipped = await raw(port, {
      path: "/app.js",
      headers: { host: `127.0.0.1:${port}`, "accept-encoding": "gzip, br" },
    });
    expect(gzipped.headers["content-encoding"]).toBe("gzip");
  });

  it("answers unary calls in JSON from the same implementations as the gRPC port", async () => {
    const grpcActions = t.client(ActionService);
    const { action } = await grpcActions.submitAction({ cluster: "console-unary", payload: { n: 1 } });
    const actions = createClient(ActionService, transport());
    const listed = await actions.listActions({ cluster: "console-unary" });
    expect(listed.actions.map((a) => a.id)).toEqual([action?.id]);
    expect(listed.actions[0]?.state).toBe(ActionState.QUEUED);
    expect(listed.actions[0]?.payload).toEqual({ n: 1 });
    // The basic view's answer, which the gRPC port sends as the bytes its own encoder wrote.
    const { results } = await actions.submitActions({
      actions: [{ cluster: "console-unary", requestId: "basic-1" }],
      view: ActionView.BASIC,
    });
    expect(results.map((r) => [r.created, r.action?.requestId, r.action?.state])).toEqual([
      [true, "basic-1", ActionState.QUEUED],
    ]);
    expect(results[0]?.action?.createTime).toBeDefined();
  });

  it("filters actions by the worker they were granted to", async () => {
    const grpcActions = t.client(ActionService);
    const { action } = await grpcActions.submitAction({ cluster: "console-workers" });
    const worker = await connectWorker(t.address, {
      workerId: "console-w1",
      cluster: "console-workers",
      capacity: 1,
    });
    const grant = await worker.next("grant");
    expect(grant.actionId).toBe(action?.id);
    const actions = createClient(ActionService, transport());
    const mine = await actions.listActions({ workerId: "console-w1" });
    expect(mine.actions.map((a) => a.id)).toEqual([action?.id]);
    expect((await actions.listActions({ workerId: "nobody" })).actions).toEqual([]);
    const workers = await createClient(ClusterService, transport()).listWorkers({
      cluster: "console-workers",
    });
    expect(workers.workers.map((w) => [w.workerId, w.state, w.heldLeases.length])).toEqual([
      ["console-w1", WorkerState.CONNECTED, 1],
    ]);
    worker.goodbye();
    await worker.ended;
  });

  it("streams events live over HTTP/1.1", async () => {
    const events = createClient(EventService, transport());
    const abort = new AbortController();
    const { action: before } = await t.client(ActionService).submitAction({ cluster: "console-live" });
    // Replays from the start, then follows without a gap: no race with the submission below.
    const stream = events.watchEvents(
      { cluster: "console-live", kind: EventKind.ACTION_SUBMITTED, afterSequence: 0n },
      { signal: abort.signal },
    );
    const iterator = stream[Symbol.asyncIterator]();
    expect((await iterator.next()).value?.event?.actionId).toBe(before?.id);
    const { action: after } = await t.client(ActionService).submitAction({ cluster: "console-live" });
    expect((await iterator.next()).value?.event?.actionId).toBe(after?.id);
    abort.abort();
  });

  it("returns the gRPC port's statuses and details, field violations included", async () => {
    const actions = createClient(ActionService, transport());
    const missing = await actions
      .getAction({ actionId: "00000000-0000-0000-0000-000000000000" })
      .catch((e: unknown) => ConnectError.from(e));
    expect(missing).toBeInstanceOf(ConnectError);
    expect((missing as ConnectError).code).toBe(ConnectCode.NotFound);
    const info = (missing as ConnectError).findDetails(ErrorInfoSchema)[0];
    expect(info?.domain).toBe("leasehold.dev");

    const bad = ConnectError.from(await actions.listActions({ pageSize: -1 }).catch((e: unknown) => e));
    expect(bad.code).toBe(ConnectCode.InvalidArgument);
    expect(bad.rawMessage).toMatch(/^page_size: must not be negative/);

    const long = ConnectError.from(
      await actions.listActions({ cluster: "x".repeat(200) }).catch((e: unknown) => e),
    );
    expect(long.code).toBe(ConnectCode.InvalidArgument);
    expect(long.findDetails(BadRequestSchema)[0]?.fieldViolations[0]?.field).toBe("cluster");
  });

  it("refuses a host name that is not loopback (DNS rebinding), and Connect calls without the protocol header", async () => {
    const rebound = await raw(port, { path: "/", headers: { host: "attacker.example:80" } });
    expect(rebound.status).toBe(421);
    const api = await raw(port, {
      path: "/leasehold.v1.ClusterService/ListClusters",
      method: "POST",
      headers: { host: `127.0.0.1:${port}`, "content-type": "application/json" },
      body: "{}",
    });
    expect(api.status).toBe(400);
    expect(api.body).toMatch(/connect-protocol-version/i);
    const preflight = await raw(port, {
      path: "/leasehold.v1.ClusterService/ListClusters",
      method: "OPTIONS",
      headers: {
        host: `127.0.0.1:${port}`,
        origin: "https://attacker.example",
        "access-control-request-method": "POST",
      },
    });
    expect(preflight.headers["access-control-allow-origin"]).toBeUndefined();
  });

  it("does not serve the agents' stream", async () => {
    const response = await raw(port, {
      path: "/leasehold.v1.WorkerService/Connect",
      method: "POST",
      headers: {
        host: `127.0.0.1:${port}`,
        "content-type": "application/connect+json",
        "connect-protocol-version": "1",
      },
      body: "",
    });
    expect(response.status).toBe(404);
  });

  // Last in this block: it stops the server.
  it("ends open streams UNAVAILABLE when the server stops, so that pages reconnect elsewhere", async () => {
    const { action } = await t.client(ActionService).submitAction({ cluster: "console-stop" });
    const stream = createClient(EventService, transport()).watchEvents({
      cluster: "console-stop",
      afterSequence: 0n,
    });
    const iterator = stream[Symbol.asyncIterator]();
    expect((await iterator.next()).value?.event?.actionId).toBe(action?.id);
    const closed = t.server.close();
    const end = ConnectError.from(await iterator.next().catch((e: unknown) => e));
    expect(end.code).toBe(ConnectCode.Unavailable);
    expect(end.findDetails(ErrorInfoSchema)[0]?.reason).toBe("SHUTTING_DOWN");
    await closed;
  });
});

describe("the console with credentials configured", () => {
  let t: TestServer;
  let dir: string;
  let readerToken: string;
  let teamToken: string;
  let operatorToken: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-console-auth-"));
    const tokensFile = join(dir, "tokens.yaml");
    readerToken = addStaticToken(tokensFile, {
      principal: "console-reader",
      bindings: [{ role: "reader", clusters: ["*"], workerIds: "*" }],
    });
    teamToken = addStaticToken(tokensFile, {
      principal: "console-team-b",
      bindings: [{ role: "reader", clusters: ["team-b"], workerIds: "*" }],
    });
    operatorToken = addStaticToken(tokensFile, {
      principal: "console-operator",
      bindings: [{ role: "operator", clusters: ["*"], workerIds: "*" }],
    });
    t = await startTestServer({
      config: { consoleListen: "127.0.0.1:0", authTokens: tokensFile },
      overrides: { consoleStaticDir: dir },
    });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  const transportWith = (token: string) =>
    createConnectTransport({
      baseUrl: `http://127.0.0.1:${t.server.consolePort}`,
      httpVersion: "1.1",
      interceptors: [
        (next) => (request) => {
          request.header.set("authorization", `Bearer ${token}`);
          return next(request);
        },
      ],
    });
  const clusters = (token?: string) =>
    createClient(
      ClusterService,
      createConnectTransport({
        baseUrl: `http://127.0.0.1:${t.server.consolePort}`,
        httpVersion: "1.1",
        interceptors: token
          ? [
              (next) => (request) => {
                request.header.set("authorization", `Bearer ${token}`);
                return next(request);
              },
            ]
          : [],
      }),
    );

  it("refuses calls without a token, and those the token's roles do not allow, as the gRPC port does", async () => {
    const anonymous = ConnectError.from(
      await clusters()
        .listClusters({})
        .catch((e: unknown) => e),
    );
    expect(anonymous.code).toBe(ConnectCode.Unauthenticated);
    const unknown = ConnectError.from(
      await clusters("lh_not_a_token")
        .listClusters({})
        .catch((e: unknown) => e),
    );
    expect(unknown.code).toBe(ConnectCode.Unauthenticated);
    expect(unknown.findDetails(ErrorInfoSchema)[0]?.reason).toBe("TOKEN_UNKNOWN");
    // A reader may look, not resume expiries.
    expect((await clusters(readerToken).listClusters({})).clusters).toBeDefined();
    const resume = ConnectError.from(
      await clusters(readerToken)
        .resumeExpiries({ cluster: "any", reason: "test" })
        .catch((e: unknown) => e),
    );
    expect(resume.code).toBe(ConnectCode.PermissionDenied);
    // Logged as the gRPC port logs a refusal.
    expect(t.logs.some((l) => l.method === "leasehold.v1.ClusterService/ResumeExpiries")).toBe(true);
  });

  it("feeds the page of a token bound to some clusters the events of those clusters, live", async () => {
    const operator = createClient(ActionService, transportWith(operatorToken));
    const { action: before } = await operator.submitAction({ cluster: "team-b" });
    await operator.submitAction({ cluster: "team-c" });
    // The calls of the page's live feed (live.ts), which names no cluster: the latest events, then
    // a watch after the newest of them.
    const events = createClient(EventService, transportWith(teamToken));
    const latest = await events.listEvents({ pageSize: 500, newestFirst: true });
    expect(latest.events.map((e) => [e.cluster, e.actionId])).toEqual([["team-b", before?.id]]);
    const abort = new AbortController();
    const stream = events.watchEvents(
      { afterSequence: latest.events[0]?.sequence ?? 0n },
      { signal: abort.signal },
    );
    await operator.submitAction({ cluster: "team-c" });
    const { action: after } = await operator.submitAction({ cluster: "team-b" });
    // Another cluster's event is not sent; the next of team-b is.
    const next = await stream[Symbol.asyncIterator]().next();
    expect(next.value?.event).toMatchObject({ cluster: "team-b", actionId: after?.id });
    abort.abort();
  });
});

/**
 * Starts an API request that announces a body of `announced` bytes and sends only
 * `sent` of them; resolves with the answer the console gives while the rest never comes.
 */
function partialBody(
  port: number,
  options: { announced: number; sent: number; token?: string },
): Promise<{ status: number; body: string; connection: string | undefined }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest({
      host: "127.0.0.1",
      port,
      path: "/leasehold.v1.ClusterService/ListClusters",
      method: "POST",
      headers: {
        "content-type": "application/json",
        "connect-protocol-version": "1",
        "content-length": String(options.announced),
        ...(options.token ? { authorization: `Bearer ${options.token}` } : {}),
      },
    });
    req.on("response", (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => {
        body += chunk;
      });
      res.on("end", () => {
        resolve({ status: res.statusCode ?? 0, body, connection: res.headers.connection });
        req.destroy();
      });
    });
    req.on("error", reject);
    req.write(" ".repeat(options.sent));
  });
}

describe("the console's request bodies", () => {
  let t: TestServer;
  let dir: string;
  let token: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-console-bodies-"));
    const tokensFile = join(dir, "tokens.yaml");
    token = addStaticToken(tokensFile, {
      principal: "console-reader",
      bindings: [{ role: "reader", clusters: ["*"], workerIds: "*" }],
    });
    t = await startTestServer({
      config: { consoleListen: "127.0.0.1:0", authTokens: tokensFile },
      overrides: {
        consoleStaticDir: dir,
        limits: { maxPartialRequestBytes: 1024 * 1024, requestStallMs: 300 },
      },
    });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  it("answers a caller without credentials before reading its body, and closes the connection", async () => {
    const answer = await partialBody(t.server.consolePort ?? 0, { announced: 1024 * 1024, sent: 1024 });
    expect(answer).toMatchObject({ status: 401, connection: "close" });
    expect(JSON.parse(answer.body)).toMatchObject({ code: "unauthenticated" });
  });

  it("ends a body that stalls, as the gRPC port does", async () => {
    const answer = await partialBody(t.server.consolePort ?? 0, { announced: 512 * 1024, sent: 1024, token });
    expect(answer).toMatchObject({ status: 429, connection: "close" });
    expect(JSON.parse(answer.body)).toMatchObject({
      code: "resource_exhausted",
      details: [expect.objectContaining({ type: "google.rpc.ErrorInfo" })],
    });
    expect(t.logs.some((l) => l.reason === "REQUEST_STALLED")).toBe(true);
  });

  it("counts a body against the gRPC port's budget of requests still arriving", async () => {
    const answer = await partialBody(t.server.consolePort ?? 0, {
      announced: 2 * 1024 * 1024,
      sent: 1024,
      token,
    });
    expect(answer).toMatchObject({ status: 429, connection: "close" });
    expect(t.logs.some((l) => l.reason === "PARTIAL_REQUESTS_OVER_BUDGET")).toBe(true);
  });
});

describe("the console over TLS", () => {
  let t: TestServer;
  let dir: string;
  let ca: Ca;
  let caPem: Buffer;
  let operator: CertificateFiles;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-console-tls-"));
    ca = createCa(dir, "ca");
    caPem = readFileSync(ca.certFile);
    const server = issueCertificate(ca, { dir, name: "server", ips: ["127.0.0.1"] });
    operator = issueCertificate(ca, {
      dir,
      name: "operator",
      uris: ["spiffe://test/operator"],
      client: true,
    });
    const policyFile = join(dir, "policy.yaml");
    writeFileSync(
      policyFile,
      [
        "bindings:",
        "  - principals: [spiffe://test/operator]",
        "    role: operator",
        '    clusters: ["*"]',
        "",
      ].join("\n"),
    );
    t = await startTestServer({
      config: {
        consoleListen: "127.0.0.1:0",
        tlsCert: server.certFile,
        tlsKey: server.keyFile,
        tlsClientCa: ca.certFile,
        tlsClientAuth: "optional",
        authPolicy: policyFile,
      },
      overrides: { consoleStaticDir: dir },
    });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  const clusters = (client?: CertificateFiles) =>
    createClient(
      ClusterService,
      createConnectTransport({
        baseUrl: `https://127.0.0.1:${t.server.consolePort}`,
        httpVersion: "1.1",
        nodeOptions: {
          ca: caPem,
          ...(client ? { cert: readFileSync(client.certFile), key: readFileSync(client.keyFile) } : {}),
        },
      }),
    );

  /** The fingerprint of the certificate the console presents to a new connection. */
  const presented = () =>
    new Promise<string>((resolve, reject) => {
      const socket = tlsConnect(
        { host: "127.0.0.1", port: t.server.consolePort as number, ca: caPem },
        () => {
          resolve(socket.getPeerCertificate().fingerprint256);
          socket.end();
        },
      );
      socket.on("error", reject);
    });

  it("takes the gRPC port's certificates and client certificates as credentials", async () => {
    expect((await clusters(operator).listClusters({})).clusters).toBeDefined();
    const anonymous = ConnectError.from(
      await clusters()
        .listClusters({})
        .catch((e: unknown) => e),
    );
    expect(anonymous.code).toBe(ConnectCode.Unauthenticated);
  });

  it("follows a certificate rotation: new connections get the new certificate", async () => {
    const before = await presented();
    const next = issueCertificate(ca, { dir, name: "server", ips: ["127.0.0.1"] });
    expect(next.certFile).toBe(join(dir, "server.crt"));
    // Two looks in a row that find the files as they are apply them. The server's own
    // once-a-second look may do it first: then this finds them "unchanged". Either way the
    // certificate presented next must be the new one.
    await t.server.security.tls?.reload();
    expect(await t.server.security.tls?.reload()).not.toBe("rejected");
    const after = await presented();
    expect(after).not.toBe(before);
    expect((await clusters(operator).listClusters({})).clusters).toBeDefined();
  });
});
