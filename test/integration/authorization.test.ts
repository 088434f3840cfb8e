import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import {
  ConnectRequestSchema,
  type ConnectResponse,
  WorkerService,
} from "../../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { createCa, issueCertificate } from "../helpers/pki.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { failure, statusDetails } from "../helpers/status.js";

/**
 * Every RPC of every leasehold.v1 service × every kind of caller → the
 * status it gets. The methods are read from the descriptors: a new RPC
 * without a row fails "every RPC has a row".
 *
 * `ok` means neither UNAUTHENTICATED nor PERMISSION_DENIED (an allowed call
 * may still fail for its own reasons, e.g. FAILED_PRECONDITION on a lease
 * already committed by an earlier row); `deny` is PERMISSION_DENIED with
 * ErrorInfo reason PERMISSION_DENIED (or SESSION_OWNED_BY_OTHER); `unauth` is
 * UNAUTHENTICATED.
 */
/** gRPC OK, which the domain code enum leaves out. */
const OK = 0;
type Outcome = "ok" | "deny" | "unauth" | "hidden";
const CALLERS = [
  "anonymous",
  "expiredJwt",
  "wrongAudienceJwt",
  "unknownStaticToken",
  "agentA",
  "agentB",
  "submitterA",
  "reader",
  "operator",
] as const;
type Caller = (typeof CALLERS)[number];

const U: Outcome = "unauth";
const D: Outcome = "deny";
const K: Outcome = "ok";
/** Refused as for an id that does not exist (NOT_FOUND): ids of other clusters are no oracle. */
const H: Outcome = "hidden";
/** The four callers without valid credentials always get UNAUTHENTICATED. */
const UNAUTH4 = [U, U, U, U] as const;

interface Fixtures {
  actionId: string;
  leaseId: string;
  fileId: string;
  spareLeaseId: string;
  workerId: string;
}

interface Row {
  /** The request (built from the fixtures); Connect rows give the hello. */
  readonly request: (f: Fixtures, caller: Caller) => Record<string, unknown>;
  /** agentA, agentB, submitterA, reader, operator. */
  readonly expect: readonly [Outcome, Outcome, Outcome, Outcome, Outcome];
}

/** Rows run in this order: the ones that change or delete fixtures come late. */
const MATRIX: Record<string, Row> = {
  "ActionService/SubmitAction": { request: () => ({ cluster: "a", payload: {} }), expect: [D, D, K, D, K] },
  "ActionService/SubmitActions": {
    request: () => ({ actions: [{ cluster: "a", payload: {} }, { cluster: "a" }] }),
    expect: [D, D, K, D, K],
  },
  "ActionService/GetAction": { request: (f) => ({ actionId: f.actionId }), expect: [D, D, K, K, K] },
  "ActionService/ExplainAction": { request: (f) => ({ actionId: f.actionId }), expect: [D, D, K, K, K] },
  "ActionService/ListActions": { request: () => ({ cluster: "a" }), expect: [D, D, K, K, K] },
  "ActionService/WatchAction": { request: (f) => ({ actionId: f.actionId }), expect: [D, D, K, K, K] },
  "ClusterService/ListClusters": { request: () => ({}), expect: [D, D, K, K, K] },
  "ClusterService/ListWorkers": { request: () => ({ cluster: "a" }), expect: [D, D, K, K, K] },
  "ClusterService/GetWorker": { request: (f) => ({ workerId: f.workerId }), expect: [D, D, K, K, K] },
  "EventService/ListEvents": { request: () => ({ cluster: "a" }), expect: [D, D, K, K, K] },
  "EventService/WatchEvents": {
    request: () => ({ cluster: "a", afterSequence: 0n }),
    expect: [D, D, K, K, K],
  },
  "LeaseService/CreateLease": { request: () => ({ runtime: "a" }), expect: [D, D, K, D, K] },
  "LeaseService/GetLease": { request: (f) => ({ leaseId: f.leaseId }), expect: [D, D, K, K, K] },
  "LeaseService/ListLeases": { request: () => ({ runtime: "a" }), expect: [D, D, K, K, K] },
  "LeaseService/WaitLease": {
    request: (f) => ({ leaseId: f.leaseId, timeout: durationFromMs(1) }),
    expect: [D, D, K, K, K],
  },
  "LeaseService/DebugLease": { request: (f) => ({ leaseId: f.leaseId }), expect: [D, D, D, D, K] },
  "ResourceService/CreateFile": {
    request: (f, caller) => ({ leaseId: f.leaseId, name: `from-${caller}.txt`, content: Buffer.from("x") }),
    // agentA adds files only as the outputs of a run its session holds, naming it in output_of
    // (authorization-scope.test.ts); without output_of, as here, it is refused. To agentB, whose
    // cluster is another, the lease is one that does not exist.
    expect: [D, H, K, D, K],
  },
  "ResourceService/CreateObject": {
    request: (f) => ({ leaseId: f.leaseId, kind: "note", body: { a: 1 } }),
    expect: [D, D, K, D, K],
  },
  "ResourceService/CreateDeployment": {
    request: (f) => ({ leaseId: f.leaseId, spec: { containers: [{ name: "c", argv: ["true"] }] } }),
    expect: [D, D, K, D, K],
  },
  "ResourceService/GetResource": { request: (f) => ({ resourceId: f.fileId }), expect: [D, D, K, K, K] },
  "ResourceService/ListResources": { request: (f) => ({ leaseId: f.leaseId }), expect: [D, D, K, K, K] },
  // Agents hold file.download.input, not resource.read: the fixture file is no input of a deployment
  // they hold (authorization-scope.test.ts shows one that is).
  "ResourceService/DownloadFile": { request: (f) => ({ resourceId: f.fileId }), expect: [D, D, K, K, K] },
  "LeaseService/SetResult": {
    request: (f) => ({ leaseId: f.leaseId, result: { ok: true } }),
    expect: [D, D, K, D, K],
  },
  "LeaseService/PromoteResource": {
    request: (f) => ({ leaseId: f.leaseId, kind: "file", resourceId: f.fileId }),
    expect: [D, D, K, D, K],
  },
  "LeaseService/CollectOutputs": {
    request: (f) => ({ leaseId: f.leaseId, timeout: durationFromMs(1) }),
    expect: [D, D, K, D, K],
  },
  "LeaseService/RenewLease": { request: (f) => ({ leaseId: f.leaseId }), expect: [D, D, K, D, K] },
  "LeaseService/CommitLease": { request: (f) => ({ leaseId: f.leaseId }), expect: [D, D, K, D, K] },
  "LeaseService/RollbackLease": { request: (f) => ({ leaseId: f.leaseId }), expect: [D, D, K, D, K] },
  "ResourceService/DeleteResource": { request: (f) => ({ resourceId: f.fileId }), expect: [D, D, K, D, K] },
  // The action was submitted by the operator: a submitter cancels only its own.
  "ActionService/CancelAction": { request: (f) => ({ actionId: f.actionId }), expect: [D, D, D, D, K] },
  // A submitter's bulk cancel matches only its own actions: allowed, and it leaves the operator's be.
  "ActionService/CancelActions": {
    request: (f) => ({ cluster: "a", actionIds: [f.actionId] }),
    expect: [D, D, K, D, K],
  },
  "ClusterService/DrainWorker": { request: (f) => ({ workerId: f.workerId }), expect: [D, D, D, D, K] },
  "ClusterService/UndrainWorker": { request: (f) => ({ workerId: f.workerId }), expect: [D, D, D, D, K] },
  // The fixture worker is connected: the operator's call is FAILED_PRECONDITION, past the check.
  "ClusterService/ForgetWorker": { request: (f) => ({ workerId: f.workerId }), expect: [D, D, D, D, K] },
  "ClusterService/ResumeExpiries": { request: () => ({ cluster: "a" }), expect: [D, D, D, D, K] },
  "LeaseService/DeleteLease": { request: (f) => ({ leaseId: f.spareLeaseId }), expect: [D, D, D, D, K] },
  "LeaseService/DeleteLeases": { request: () => ({ runtime: "a" }), expect: [D, D, D, D, K] },
  // agentB's token binds it to cluster b; operators may run workers too.
  "WorkerService/Connect": {
    request: (_f, caller) => ({
      workerId: caller === "operator" ? "op-1" : `a-${caller}`,
      cluster: "a",
      capacity: 1,
    }),
    expect: [K, D, D, D, K],
  },
};

const SERVICES = [
  ActionService,
  ClusterService,
  EventService,
  LeaseService,
  ResourceService,
  WorkerService,
] as unknown as readonly GenService<GenServiceMethods>[];

describe("authorization", () => {
  let dir: string;
  let server: TestServer;
  const credentials = new Map<Caller, { channel: grpc.ChannelCredentials; token?: string }>();
  const fixtures = {} as Fixtures;
  /** Another principal the policy lets run workers in cluster a. */
  let secondAgent: grpc.ChannelCredentials;
  const closers: (() => void)[] = [];

  function client<S extends GenServiceMethods>(service: GenService<S>, caller: Caller) {
    const c = credentials.get(caller);
    if (!c) throw new Error(`no credentials for ${caller}`);
    const made = createClient(service, server.address, c.channel);
    closers.push(() => made.close());
    return made;
  }
  function metadataOf(caller: Caller): grpc.Metadata {
    const metadata = new grpc.Metadata();
    const token = credentials.get(caller)?.token;
    if (token) metadata.set("authorization", `Bearer ${token}`);
    return metadata;
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-authz-"));
    const ca = createCa(dir, "ca");
    const serverCert = issueCertificate(ca, { dir, name: "server", dns: ["localhost"], ips: ["127.0.0.1"] });
    const agentA = issueCertificate(ca, {
      dir,
      name: "agent-a",
      uris: ["spiffe://test/agent/a"],
      client: true,
    });
    const operator = issueCertificate(ca, {
      dir,
      name: "operator",
      uris: ["spiffe://test/operator"],
      client: true,
    });

    const { publicKey, privateKey } = await generateKeyPair("ES256");
    const jwksFile = join(dir, "jwks.json");
    writeFileSync(
      jwksFile,
      JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256" }] }),
    );
    const now = Math.floor(Date.now() / 1000);
    const jwt = (sub: string, audience: string, exp: number) =>
      new SignJWT({})
        .setProtectedHeader({ alg: "ES256", kid: "k1" })
        .setSubject(sub)
        .setIssuer("https://issuer.test")
        .setAudience(audience)
        .setIssuedAt(now - 3600)
        .setExpirationTime(exp)
        .sign(privateKey);

    const tokensFile = join(dir, "tokens.yaml");
    const readerToken = addStaticToken(tokensFile, { principal: "reader-bot", bindings: [] });
    const agentBToken = addStaticToken(tokensFile, {
      principal: "agent-b",
      bindings: [{ role: "agent", clusters: ["b"], workerIds: "*" }],
    });
    const policyFile = join(dir, "policy.yaml");
    writeFileSync(
      policyFile,
      [
        "bindings:",
        '  - principals: ["spiffe://test/agent/*"]',
        "    role: agent",
        "    clusters: [a]",
        '    worker_ids: "a-*"',
        "  - principals: [submitter-a]",
        "    role: submitter",
        "    clusters: [a]",
        "  - principals: [reader-bot]",
        "    role: reader",
        '    clusters: ["*"]',
        "  - principals: [spiffe://test/operator]",
        "    role: operator",
        '    clusters: ["*"]',
        "",
      ].join("\n"),
    );
    server = await startTestServer({
      config: {
        tlsCert: serverCert.certFile,
        tlsKey: serverCert.keyFile,
        tlsClientCa: ca.certFile,
        tlsClientAuth: "optional",
        authTokens: tokensFile,
        authPolicy: policyFile,
        jwtJwks: jwksFile,
        jwtIssuer: "https://issuer.test",
        jwtAudience: "leasehold",
      },
    });
    const { readFileSync } = await import("node:fs");
    const caPem = readFileSync(ca.certFile);
    const tlsOnly = grpc.credentials.createSsl(caPem);
    const withCert = (pair: { certFile: string; keyFile: string }) =>
      grpc.credentials.createSsl(caPem, readFileSync(pair.keyFile), readFileSync(pair.certFile));
    credentials.set("anonymous", { channel: tlsOnly });
    credentials.set("expiredJwt", {
      channel: tlsOnly,
      token: await jwt("submitter-a", "leasehold", now - 600),
    });
    credentials.set("wrongAudienceJwt", {
      channel: tlsOnly,
      token: await jwt("submitter-a", "other", now + 600),
    });
    credentials.set("unknownStaticToken", {
      channel: tlsOnly,
      token: `lh_${randomBytes(32).toString("base64url")}`,
    });
    credentials.set("agentA", { channel: withCert(agentA) });
    secondAgent = withCert(
      issueCertificate(ca, { dir, name: "agent-a2", uris: ["spiffe://test/agent/a2"], client: true }),
    );
    credentials.set("agentB", { channel: tlsOnly, token: agentBToken });
    credentials.set("submitterA", {
      channel: tlsOnly,
      token: await jwt("submitter-a", "leasehold", now + 600),
    });
    credentials.set("reader", { channel: tlsOnly, token: readerToken });
    credentials.set("operator", { channel: withCert(operator) });

    // Fixtures: an action the operator submitted, leases and a file of submitter-a, a live worker.
    const opMeta = metadataOf("operator");
    const subMeta = metadataOf("submitterA");
    const submitted = await client(ActionService, "operator").submitAction(
      { cluster: "a", payload: {} },
      { metadata: opMeta },
    );
    fixtures.actionId = submitted.action?.id ?? "";
    const leases = client(LeaseService, "submitterA");
    fixtures.leaseId = (await leases.createLease({ runtime: "a" }, { metadata: subMeta })).lease?.id ?? "";
    fixtures.spareLeaseId =
      (await leases.createLease({ runtime: "a" }, { metadata: subMeta })).lease?.id ?? "";
    const file = await client(ResourceService, "submitterA").createFile(
      { leaseId: fixtures.leaseId, name: "f.txt", content: Buffer.from("hello") },
      { metadata: subMeta },
    );
    fixtures.fileId = file.resource?.id ?? "";
    fixtures.workerId = "a-fixture";
    const outcome = await connect("agentA", { workerId: fixtures.workerId, cluster: "a", capacity: 1 }, true);
    expect(outcome).toEqual({ code: OK });
  }, 60_000);

  afterAll(async () => {
    for (const close of closers) close();
    await server?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Opens Connect as `caller`, sends the hello, and returns OK at the welcome or the stream's status. */
  function connect(caller: Caller, hello: Record<string, unknown>, keepOpen = false) {
    const api = client(WorkerService, caller);
    const call = api.connect({ metadata: metadataOf(caller) }) as grpc.ClientDuplexStream<
      unknown,
      ConnectResponse
    >;
    return new Promise<{ code: number; reason?: string | undefined }>((resolve) => {
      call.on("data", (m: ConnectResponse) => {
        if (m.message.case !== "welcome") return;
        resolve({ code: OK });
        if (!keepOpen) call.cancel();
      });
      call.on("error", (e: grpc.ServiceError) =>
        resolve({ code: e.code, reason: statusDetails(e.metadata).reason }),
      );
      call.write(create(ConnectRequestSchema, { message: { case: "hello", value: hello as never } }));
    });
  }

  /** Calls one method as `caller`: OK, or the failure's code and ErrorInfo reason. */
  async function outcomeOf(
    service: GenService<GenServiceMethods>,
    methodName: string,
    caller: Caller,
    row: Row,
  ): Promise<{ code: number; reason?: string | undefined }> {
    const method = service.methods.find((m) => m.name === methodName);
    if (!method) throw new Error(`no method ${methodName}`);
    const request = row.request(fixtures, caller);
    if (method.methodKind === "bidi_streaming") return connect(caller, request);
    const api = client(service, caller) as unknown as Record<
      string,
      (r: unknown, o: { metadata: grpc.Metadata }) => Promise<unknown> | AsyncIterable<unknown>
    >;
    const invoke = api[method.localName] as (typeof api)[string];
    try {
      const result = invoke(request, { metadata: metadataOf(caller) });
      if (method.methodKind === "server_streaming") {
        // The first message (or the end) is enough: authorization happens before either.
        for await (const _ of result as AsyncIterable<unknown>) break;
      } else await result;
      return { code: OK };
    } catch (e) {
      const error = e as grpc.ServiceError;
      return { code: error.code, reason: statusDetails(error.metadata).reason };
    }
  }

  it("every RPC has a row", () => {
    const methods = SERVICES.flatMap((s) => s.methods.map((m) => `${s.name}/${m.name}`)).sort();
    expect(methods).toEqual(Object.keys(MATRIX).sort());
  });

  it("each caller gets the status its row expects", { timeout: 120_000 }, async () => {
    const seen: Record<string, Record<Caller, string>> = {};
    const wanted: Record<string, Record<Caller, string>> = {};
    for (const [key, row] of Object.entries(MATRIX)) {
      const [serviceName, methodName] = key.split("/") as [string, string];
      const service = SERVICES.find((s) => s.name === serviceName);
      if (!service) throw new Error(`no service ${serviceName}`);
      const expected = [...UNAUTH4, ...row.expect];
      seen[key] = {} as Record<Caller, string>;
      wanted[key] = {} as Record<Caller, string>;
      for (const [i, caller] of CALLERS.entries()) {
        const { code, reason } = await outcomeOf(service, methodName, caller, row);
        const got: Outcome =
          code === Code.Unauthenticated
            ? "unauth"
            : code === Code.PermissionDenied
              ? "deny"
              : code === Code.NotFound && expected[i] === "hidden"
                ? "hidden"
                : "ok";
        // An allowed call may fail for its own reasons, never for a server fault.
        expect([Code.Internal, Code.Unknown], `${key} as ${caller}`).not.toContain(code);
        // A refusal always says why, for programs as well as people.
        if (got === "deny")
          expect(reason, `${key} as ${caller}`).toMatch(/PERMISSION_DENIED|SESSION_OWNED_BY_OTHER/);
        if (got === "unauth")
          expect(reason, `${key} as ${caller}`).toMatch(/^(UNAUTHENTICATED|TOKEN_[A-Z_]+)$/);
        seen[key][caller] = got === "ok" ? `ok(${Code[code] ?? code})` : got;
        wanted[key][caller] =
          expected[i] === "ok"
            ? seen[key][caller].startsWith("ok")
              ? seen[key][caller]
              : "ok"
            : (expected[i] as string);
      }
    }
    expect(seen).toEqual(wanted);
  });

  it("says why a client certificate it ignored was not accepted", async () => {
    const { readFileSync } = await import("node:fs");
    const ca = { certFile: join(dir, "ca.crt"), keyFile: join(dir, "ca.key") };
    const operator = { uris: ["spiffe://test/operator"], dir };
    const unaccepted = [
      issueCertificate(createCa(dir, "other-ca"), { ...operator, name: "other-ca-op", client: true }),
      // A server certificate: its extended key usage says it may not be a client's.
      issueCertificate(ca, { ...operator, name: "server-only-op" }),
    ];
    const messages: string[] = [];
    for (const pair of unaccepted) {
      const channel = grpc.credentials.createSsl(
        readFileSync(ca.certFile),
        readFileSync(pair.keyFile),
        readFileSync(pair.certFile),
      );
      const api = createClient(ClusterService, server.address, channel);
      closers.push(() => api.close());
      const refused = await failure(api.listClusters({}));
      expect([refused.code, refused.reason]).toEqual([Code.Unauthenticated, "UNAUTHENTICATED"]);
      messages.push(refused.message);
    }
    const advice =
      "send `authorization: Bearer <token>` or connect with a client certificate the server's client CA verifies";
    expect(messages).toEqual([
      `the client certificate was not accepted (UNABLE_TO_VERIFY_LEAF_SIGNATURE); ${advice}`,
      `the client certificate was not accepted (INVALID_PURPOSE); ${advice}`,
    ]);
  });

  it("a refused call is logged with principal, method and reason", () => {
    const line = server.logs.find(
      (l) => l.principal === "reader-bot" && l.method === "leasehold.v1.ActionService/SubmitAction",
    );
    expect(line).toMatchObject({ code: "PERMISSION_DENIED", reason: "PERMISSION_DENIED" });
  });

  it("lets only the principal that opened a session take it over", async () => {
    const open = (channel: grpc.ChannelCredentials) => {
      const api = createClient(WorkerService, server.address, channel, {
        "grpc.use_local_subchannel_pool": 1,
      });
      closers.push(() => api.close());
      const call = api.connect() as grpc.ClientDuplexStream<unknown, ConnectResponse>;
      const received: ConnectResponse[] = [];
      const waiters: (() => void)[] = [];
      let status: { code: number; reason: string | undefined } | undefined;
      call.on("data", (m: ConnectResponse) => {
        received.push(m);
        for (const w of waiters.splice(0)) w();
      });
      call.on("error", (e: grpc.ServiceError) => {
        status = { code: e.code, reason: statusDetails(e.metadata).reason };
        for (const w of waiters.splice(0)) w();
      });
      const until = (test: () => boolean) =>
        new Promise<void>((resolve) => {
          const look = () => (test() ? resolve() : waiters.push(look));
          look();
        });
      const send = (message: Record<string, unknown>) =>
        call.write(create(ConnectRequestSchema, { message: message as never }));
      send({ case: "hello", value: { workerId: "a-owned", cluster: "a", capacity: 1 } });
      return { received, send, until, status: () => status, cancel: () => call.cancel() };
    };
    const welcomed = (s: ReturnType<typeof open>) =>
      s.until(() => s.received.some((m) => m.message.case === "welcome") || s.status() !== undefined);

    const owner = open(credentials.get("agentA")?.channel as grpc.ChannelCredentials);
    await welcomed(owner);
    expect(owner.status()).toBeUndefined();

    // Another principal, allowed to run workers in cluster a, tries the same worker id.
    const impostor = open(secondAgent);
    await welcomed(impostor);
    expect(impostor.status()).toEqual({ code: Code.PermissionDenied, reason: "SESSION_OWNED_BY_OTHER" });
    // The owner's stream is untouched: still open and still acknowledged.
    owner.send({ case: "heartbeat", value: { sequence: 7n, heldLeases: [] } });
    await owner.until(
      () =>
        owner.received.some((m) => m.message.case === "heartbeatAck" && m.message.value.sequence === 7n) ||
        owner.status() !== undefined,
    );
    expect(owner.status()).toBeUndefined();

    // The same principal (a restarted agent) takes its session over; the old stream is closed.
    const restarted = open(credentials.get("agentA")?.channel as grpc.ChannelCredentials);
    await welcomed(restarted);
    expect(restarted.status()).toBeUndefined();
    await owner.until(() => owner.status() !== undefined);
    expect(owner.status()?.code).not.toBe(Code.PermissionDenied);
    restarted.cancel();
  });
});
