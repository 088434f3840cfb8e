import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { exportJWK, generateKeyPair, SignJWT } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService, WorkerState } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { type CallFailure, failure, statusDetails } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

/**
 * Open streams follow the credentials in force: a token removed from the
 * token file, a binding removed from the policy, a JWT that expires end the
 * streams opened with them, on a real server that reloads its files.
 */
describe("open streams after a revocation", () => {
  let dir: string;
  let t: TestServer;
  let tokensFile: string;
  let policyFile: string;
  let signJwt: (sub: string, exp: number) => Promise<string>;
  const tokens: Record<string, string> = {};
  const POLICY = [
    "bindings:",
    "  - principals: [agent-b]",
    "    role: agent",
    "    clusters: [b]",
    "  - principals: [team-b]",
    "    role: submitter",
    "    clusters: [b]",
    "  - principals: [reader-b]",
    "    role: reader",
    "    clusters: [b, c]",
    "  - principals: [jwt-reader]",
    "    role: reader",
    "    clusters: [a]",
    "",
  ].join("\n");

  /** Replaces a file the way that is never read half-written: a new file renamed over it. */
  const replaceFile = (path: string, text: string) => {
    const temp = `${path}.${randomBytes(4).toString("hex")}`;
    writeFileSync(temp, text);
    renameSync(temp, path);
  };
  const metadataOf = (token: string) => {
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    return metadata;
  };
  const as = (who: string) => ({ metadata: metadataOf(tokens[who] as string) });
  /** How a stream ended: its status and ErrorInfo, once it has. */
  const ending = (stream: AsyncIterable<unknown>, onMessage: (m: unknown) => void = () => {}) =>
    failure(async () => {
      for await (const m of stream) onMessage(m);
    });
  const submit = async (cluster: string, who: string) =>
    (await t.client(ActionService).submitAction({ cluster, payload: { argv: ["true"] } }, as(who))).action
      ?.id as string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-revoke-"));
    tokensFile = join(dir, "tokens.yaml");
    for (const principal of ["agent-b", "team-b", "reader-b"])
      tokens[principal] = addStaticToken(tokensFile, { principal, bindings: [] });
    policyFile = join(dir, "policy.yaml");
    writeFileSync(policyFile, POLICY);
    const { publicKey, privateKey } = await generateKeyPair("ES256");
    const jwksFile = join(dir, "jwks.json");
    writeFileSync(
      jwksFile,
      JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256" }] }),
    );
    signJwt = (sub, exp) =>
      new SignJWT({})
        .setProtectedHeader({ alg: "ES256", kid: "k1" })
        .setSubject(sub)
        .setIssuer("https://issuer.test")
        .setAudience("leasehold")
        .setIssuedAt()
        .setExpirationTime(exp)
        .sign(privateKey);
    t = await startTestServer({
      config: {
        authTokens: tokensFile,
        authPolicy: policyFile,
        jwtJwks: jwksFile,
        jwtIssuer: "https://issuer.test",
        jwtAudience: "leasehold",
        jwtClockSkew: "0s",
        gracePeriod: "60s",
      },
    });
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  it("a worker stream whose token is removed ends UNAUTHENTICATED, gets no more grants, and its lease waits out the grace period", async () => {
    const worker = await connectWorker(
      t.address,
      { workerId: "wb-1", cluster: "b", capacity: 2 },
      { metadata: metadataOf(tokens["agent-b"] as string) },
    );
    const first = await submit("b", "team-b");
    const grant = await worker.next("grant", (g) => g.actionId === first);
    worker.send({
      message: { case: "grantAck", value: { reportId: 1n, actionId: first, epoch: grant.epoch } },
    });
    await worker.next("reportResult", (r) => r.actionId === first);

    const before = readFileSync(tokensFile, "utf8");
    // agent-b's entry is the first of the file: everything from its line to the next entry goes.
    replaceFile(tokensFile, before.replace(/ {2}- principal: agent-b\n( {4}.*\n)+/, ""));
    const ended = await worker.ended;
    const { reason, info } = statusDetails(ended.metadata);
    expect({ code: ended.code, reason }).toEqual({
      code: Code.Unauthenticated,
      reason: "CREDENTIALS_REVOKED",
    });
    expect(info.refused_as).toBe("TOKEN_UNKNOWN");
    expect(ended.details).toMatch(/open it again with a valid credential$/);

    // Ended as a lost stream: the session is in grace, its lease still its own, new work queued.
    const workers = t.client(ClusterService);
    const state = await workers.getWorker({ workerId: "wb-1" }, as("team-b"));
    expect(state.worker?.state).toBe(WorkerState.IN_GRACE);
    const second = await submit("b", "team-b");
    const actions = t.client(ActionService);
    expect((await actions.getAction({ actionId: first }, as("team-b"))).action?.state).toBe(
      ActionState.LEASED,
    );
    expect((await actions.getAction({ actionId: second }, as("team-b"))).action?.state).toBe(
      ActionState.QUEUED,
    );
    expect(worker.received.filter((m) => m.message.case === "grant").map((m) => m.message.value)).toEqual([
      expect.objectContaining({ actionId: first }),
    ]);
    // Coming back with the removed token is refused.
    const again = await failure(
      connectWorker(
        t.address,
        { workerId: "wb-1", cluster: "b", capacity: 2 },
        { metadata: metadataOf(tokens["agent-b"] as string) },
      ),
    );
    expect({ code: again.code, reason: again.reason }).toEqual({
      code: Code.Unauthenticated,
      reason: "TOKEN_UNKNOWN",
    });
  }, 30_000);

  it("a watch whose reader loses its binding ends PERMISSION_DENIED naming event.read; other watches go on", async () => {
    const events = t.client(EventService);
    // From the start of the log: a watch from now could begin after the submit below.
    const request = { cluster: "b", kind: EventKind.ACTION_SUBMITTED, afterSequence: 0n };
    const live = await submit("b", "team-b");
    let seenLive: () => void = () => {};
    const liveSeen = new Promise<void>((resolve) => {
      seenLive = resolve;
    });
    const revoked = ending(events.watchEvents(request, as("reader-b")), (m) => {
      if ((m as { event?: { actionId: string } }).event?.actionId === live) seenLive();
    });
    // A watch naming no cluster reads every cluster reader-b may read: b, until the binding goes.
    let seenEverywhere: () => void = () => {};
    const everywhereSeen = new Promise<void>((resolve) => {
      seenEverywhere = resolve;
    });
    const revokedEverywhere = ending(events.watchEvents({ ...request, cluster: "" }, as("reader-b")), (m) => {
      if ((m as { event?: { actionId: string } }).event?.actionId === live) seenEverywhere();
    });
    await everywhereSeen;
    const other = events.watchEvents(request, as("team-b"));
    const otherEvents = other[Symbol.asyncIterator]();
    await liveSeen;
    while ((await otherEvents.next()).value?.event?.actionId !== live);

    replaceFile(
      policyFile,
      // reader-b keeps cluster c: it still reads somewhere, but not b.
      POLICY.replace(
        "  - principals: [reader-b]\n    role: reader\n    clusters: [b, c]\n",
        "  - principals: [reader-b]\n    role: reader\n    clusters: [c]\n",
      ),
    );
    const end: CallFailure = await revoked;
    expect({ code: end.code, reason: end.reason, right: end.info.right, cluster: end.info.cluster }).toEqual({
      code: Code.PermissionDenied,
      reason: "PERMISSION_DENIED",
      right: "event.read",
      cluster: "b",
    });
    expect(end.message).toMatch(/"reader-b" lacks the right event\.read in cluster "b"/);
    const endEverywhere: CallFailure = await revokedEverywhere;
    expect({ code: endEverywhere.code, right: endEverywhere.info.right }).toEqual({
      code: Code.PermissionDenied,
      right: "event.read",
    });

    // The submitter's watch was checked too, and still holds its right.
    const after = await submit("b", "team-b");
    let next = await otherEvents.next();
    while (!next.done && next.value.event?.actionId !== after) next = await otherEvents.next();
    expect(next.value?.event?.actionId).toBe(after);
    await otherEvents.return?.();
    replaceFile(policyFile, POLICY);
  }, 30_000);

  it("a watch opened with a JWT ends UNAUTHENTICATED TOKEN_EXPIRED when the token expires", async () => {
    const exp = Math.floor(Date.now() / 1000) + 3;
    const token = await signJwt("jwt-reader", exp);
    const end = await ending(
      t.client(EventService).watchEvents({ cluster: "a" }, { metadata: metadataOf(token) }),
    );
    expect({ code: end.code, reason: end.reason }).toEqual({
      code: Code.Unauthenticated,
      reason: "TOKEN_EXPIRED",
    });
    expect(end.message).toMatch(/open it again with a valid credential$/);
    expect(Date.now()).toBeGreaterThanOrEqual(exp * 1000);
  }, 30_000);
});
