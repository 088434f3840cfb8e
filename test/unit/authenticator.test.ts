import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { PeerCertificate } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import { type CryptoKey, exportJWK, generateKeyPair, SignJWT } from "jose";
import { pino } from "pino";
import { describe, expect, it } from "vitest";
import type { Identity } from "../../src/auth/access.js";
import { createJwtVerifier, DEFAULT_JWT_MAX_LIFETIME_MS } from "../../src/auth/jwt.js";
import { loadReloadingPolicy, parsePolicy } from "../../src/auth/policy.js";
import type { StaticTokens } from "../../src/auth/static-tokens.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { createAuthenticator } from "../../src/rpc/authenticator.js";

const policy = parsePolicy(`
bindings:
  - principals: ["spiffe://demo/operator"]
    role: operator
    clusters: ["*"]
  - principals: [ci-bot]
    role: submitter
    clusters: [demo]
`);
const staticTokens: StaticTokens = {
  verify: (token: string): Identity | undefined =>
    token === "lh_good" ? { principal: "ci-bot", via: "static-token" } : undefined,
  reload: async () => "unchanged",
  version: 0,
  onReload: () => () => {},
  close: () => {},
};
const operatorCertificate = {
  subjectaltname: "URI:spiffe://demo/operator",
  fingerprint256: "AA:BB:CC",
  valid_to: "Jan  1 00:00:00 2099 GMT",
} as unknown as PeerCertificate;

function call(headers: Record<string, string>, certificate?: PeerCertificate) {
  const metadata = new grpc.Metadata();
  for (const [k, v] of Object.entries(headers)) metadata.add(k, v);
  return { metadata, getAuthContext: () => (certificate ? { sslPeerCertificate: certificate } : {}) };
}

async function refusal(fn: () => unknown): Promise<LeaseholdError> {
  try {
    await fn();
  } catch (error) {
    if (error instanceof LeaseholdError) return error;
    throw error;
  }
  throw new Error("expected a refusal");
}

describe("authenticator", () => {
  const authenticator = () => createAuthenticator({ policy, staticTokens, log: pino({ level: "silent" }) });

  it("takes a client certificate's URI SAN as the principal", async () => {
    const access = await authenticator().authenticate(call({}, operatorCertificate));
    expect(access.actor).toBe("spiffe://demo/operator");
    expect(access.can("lease.delete", "any")).toBe(true);
  });

  it("never lets a bearer token reach a certificate's cached access", async () => {
    const auth = authenticator();
    await auth.authenticate(call({}, operatorCertificate));
    for (const token of ["AA:BB:CC", "cert:AA:BB:CC"]) {
      const error = await refusal(() => auth.authenticate(call({ authorization: `Bearer ${token}` })));
      expect(error.code).toBe(Code.Unauthenticated);
    }
  });

  it("judges a call by its token even when a certificate came with it", async () => {
    const auth = authenticator();
    const access = await auth.authenticate(call({ authorization: "Bearer lh_good" }, operatorCertificate));
    expect(access.actor).toBe("ci-bot");
    const error = await refusal(() =>
      auth.authenticate(call({ authorization: "Bearer lh_bad" }, operatorCertificate)),
    );
    expect({ code: error.code, reason: error.reason }).toEqual({
      code: Code.Unauthenticated,
      reason: "TOKEN_UNKNOWN",
    });
  });

  it("refuses a client certificate once it expired, on a connection verified before", async () => {
    let clock = Date.parse("2030-01-01T00:00:00Z");
    const auth = createAuthenticator({ policy, log: pino({ level: "silent" }), now: () => clock });
    const expiring = {
      ...operatorCertificate,
      fingerprint256: "DD:EE:FF",
      valid_to: "Jan  1 00:00:40 2030 GMT",
    } as PeerCertificate;
    // grpc-js reports the certificate verified for every call of a connection whose handshake was.
    expect((await auth.authenticate(call({}, expiring))).actor).toBe("spiffe://demo/operator");
    clock += 30_000;
    expect((await auth.authenticate(call({}, expiring))).actor).toBe("spiffe://demo/operator");
    clock += 10_000;
    for (const _ of [1, 2]) {
      const error = await refusal(() => auth.authenticate(call({}, expiring)));
      expect({ code: error.code, reason: error.reason, message: error.message }).toEqual({
        code: Code.Unauthenticated,
        reason: "CERT_EXPIRED",
        message: "the client certificate expired at 2030-01-01T00:00:40.000Z; connect again with a valid one",
      });
    }
  });

  it("refuses a client certificate whose principal is anonymous, or has surrounding spaces", async () => {
    const auth = authenticator();
    for (const [san, problem] of [
      ["DNS:anonymous", '"anonymous" is reserved'],
      ['URI:" spiffe://demo/operator"', '" spiffe://demo/operator" has leading or trailing whitespace'],
    ]) {
      const certificate = {
        ...operatorCertificate,
        subjectaltname: san,
        fingerprint256: san,
      } as PeerCertificate;
      const error = await refusal(() => auth.authenticate(call({}, certificate)));
      expect([error.code, error.reason]).toEqual([Code.Unauthenticated, "CERT_INVALID_PRINCIPAL"]);
      expect(error.message).toContain(problem);
    }
  });

  it("says what is missing or malformed", async () => {
    const auth = authenticator();
    expect((await refusal(() => auth.authenticate(call({})))).message).toMatch(/needs credentials/);
    expect((await refusal(() => auth.authenticate(call({ authorization: "Basic abc" })))).reason).toBe(
      "BAD_AUTHORIZATION",
    );
    const noSan = { ...operatorCertificate, subjectaltname: "", fingerprint256: "DD" } as PeerCertificate;
    expect((await refusal(() => auth.authenticate(call({}, noSan)))).reason).toBe("CERT_NO_SAN");
  });
});

describe("policy reload", () => {
  it("judges calls after a policy change by the new policy, and keeps the old one over a broken edit", async () => {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-policy-"));
    const file = join(dir, "policy.yaml");
    writeFileSync(file, "bindings: []\n");
    const log = pino({ level: "silent" });
    const reloading = loadReloadingPolicy(file, log, { pollMs: 0 });
    const auth = createAuthenticator({ policy: reloading, staticTokens, log });
    const withToken = call({ authorization: "Bearer lh_good" });
    expect((await auth.authenticate(withToken)).holdsAnywhere("action.read")).toBe(false);

    writeFileSync(file, "bindings:\n  - principals: [ci-bot]\n    role: reader\n    clusters: [demo]\n");
    expect(await reloading.reload()).toBe("pending");
    expect(await reloading.reload()).toBe("applied");
    // The cached access of the same token is stale once the policy changed.
    expect((await auth.authenticate(withToken)).can("action.read", "demo")).toBe(true);

    writeFileSync(file, "bindings:\n  - principals: [ci-bot]\n    role: admin\n    clusters: [demo]\n");
    expect(await reloading.reload()).toBe("pending");
    expect(await reloading.reload()).toBe("rejected");
    expect((await auth.authenticate(withToken)).can("action.read", "demo")).toBe(true);
    reloading.close();
    rmSync(dir, { recursive: true, force: true });
  });
});

describe("JWT bearer tokens", () => {
  it("says an unsigned token (alg none, an empty signature) is unsigned, not that it is unknown", async () => {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-jwks-"));
    const file = join(dir, "jwks.json");
    const { publicKey } = await generateKeyPair("ES256");
    writeFileSync(file, JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: "k" }] }));
    const log = pino({ level: "silent" });
    const jwt = createJwtVerifier(
      {
        jwks: file,
        issuer: "https://issuer.test",
        audience: "leasehold",
        clockSkewMs: 0,
        principalClaim: "sub",
        maxLifetimeMs: DEFAULT_JWT_MAX_LIFETIME_MS,
      },
      log,
      { pollMs: 0 },
    );
    try {
      const auth = createAuthenticator({ policy, staticTokens, jwt, log });
      const part = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
      const claims = { sub: "ci-bot", iss: "https://issuer.test", aud: "leasehold", exp: 4_102_444_800 };
      const error = await refusal(() =>
        auth.authenticate(call({ authorization: `Bearer ${part({ alg: "none" })}.${part(claims)}.` })),
      );
      expect({ code: error.code, reason: error.reason }).toEqual({
        code: Code.Unauthenticated,
        reason: "TOKEN_INVALID",
      });
      expect(error.message).toMatch(/^the token is not signed \(alg "none"\)/);
    } finally {
      jwt.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("JWKS reload", () => {
  it("refuses a cached JWT once its signing key is gone from the reloaded JWKS", async () => {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-jwks-"));
    const file = join(dir, "jwks.json");
    const [old, next] = [await generateKeyPair("ES256"), await generateKeyPair("ES256")];
    const jwks = async (...keys: [CryptoKey, string][]) =>
      JSON.stringify({
        keys: await Promise.all(keys.map(async ([k, kid]) => ({ ...(await exportJWK(k)), kid }))),
      });
    writeFileSync(file, await jwks([old.publicKey, "old"], [next.publicKey, "next"]));
    const log = pino({ level: "silent" });
    const jwt = createJwtVerifier(
      {
        jwks: file,
        issuer: "https://issuer.test",
        audience: "leasehold",
        clockSkewMs: 0,
        principalClaim: "sub",
        maxLifetimeMs: DEFAULT_JWT_MAX_LIFETIME_MS,
      },
      log,
      { pollMs: 0 },
    );
    const auth = createAuthenticator({ policy, jwt, log });
    const sign = (key: CryptoKey, kid: string) =>
      new SignJWT({})
        .setProtectedHeader({ alg: "ES256", kid })
        .setSubject("ci-bot")
        .setIssuer("https://issuer.test")
        .setAudience("leasehold")
        .setExpirationTime("1h")
        .sign(key);
    const withOld = call({ authorization: `Bearer ${await sign(old.privateKey, "old")}` });
    const withNext = call({ authorization: `Bearer ${await sign(next.privateKey, "next")}` });
    expect((await auth.authenticate(withOld)).actor).toBe("ci-bot");
    expect((await auth.authenticate(withNext)).actor).toBe("ci-bot");

    // The old key is withdrawn: its token, verified and cached a moment ago, is refused at once.
    writeFileSync(file, await jwks([next.publicKey, "next"]));
    expect(await jwt.reload()).toBe("pending");
    expect(await jwt.reload()).toBe("applied");
    const refused = await refusal(() => auth.authenticate(withOld));
    expect(refused.code).toBe(Code.Unauthenticated);
    // A token of a key still there is verified again, and still accepted.
    expect((await auth.authenticate(withNext)).actor).toBe("ci-bot");
    jwt.close();
    rmSync(dir, { recursive: true, force: true });
  });
});
