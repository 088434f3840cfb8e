import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type CryptoKey, exportJWK, generateKeyPair, generateSecret, SignJWT } from "jose";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  createJwtVerifier,
  DEFAULT_JWT_MAX_LIFETIME_MS,
  type JwtOptions,
  type JwtVerifier,
  looksLikeJwt,
} from "../../src/auth/jwt.js";
import { Code, LeaseholdError } from "../../src/errors.js";

const ISSUER = "https://issuer.example.org";
const AUDIENCE = "leasehold";
const log = pino({ level: "silent" });
const dir = mkdtempSync(join(tmpdir(), "leasehold-jwt-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

let key: CryptoKey;
let publicKey: CryptoKey;
let otherKey: CryptoKey;
let jwksFile: string;
let verifier: JwtVerifier;

const nowS = () => Math.floor(Date.now() / 1000);

function sign(
  claims: Record<string, unknown> = {},
  options: { key?: CryptoKey | Uint8Array; alg?: string; kid?: string | null; exp?: number | null } = {},
) {
  const jwt = new SignJWT({
    sub: "user-1",
    iss: ISSUER,
    aud: AUDIENCE,
    iat: nowS() - 10,
    ...claims,
  }).setProtectedHeader({
    alg: options.alg ?? "ES256",
    ...(options.kid === null ? {} : { kid: options.kid ?? "k1" }),
  });
  if (options.exp !== null) jwt.setExpirationTime(options.exp ?? nowS() + 600);
  return jwt.sign(options.key ?? key);
}

const options = (overrides: Partial<JwtOptions> = {}): JwtOptions => ({
  jwks: jwksFile,
  issuer: ISSUER,
  audience: AUDIENCE,
  clockSkewMs: 30_000,
  principalClaim: "sub",
  maxLifetimeMs: DEFAULT_JWT_MAX_LIFETIME_MS,
  ...overrides,
});

async function rejection(promise: Promise<unknown>): Promise<LeaseholdError> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(LeaseholdError);
    return error as LeaseholdError;
  }
  throw new Error("the token was accepted");
}

async function refused(token: string, reason: string, message: RegExp, v = verifier) {
  const error = await rejection(v.verify(token));
  expect(error.code).toBe(Code.Unauthenticated);
  expect(error.reason).toBe(reason);
  expect(error.message).toMatch(message);
}

beforeAll(async () => {
  ({ privateKey: key, publicKey } = await generateKeyPair("ES256"));
  ({ privateKey: otherKey } = await generateKeyPair("ES256"));
  const unrelated = await generateKeyPair("RS256");
  // The key tokens are signed with, under kid "k1", next to unrelated ones.
  jwksFile = join(dir, "jwks.json");
  writeFileSync(
    jwksFile,
    JSON.stringify({
      keys: [
        { ...(await exportJWK(publicKey)), kid: "k1", alg: "ES256", use: "sig" },
        { ...(await exportJWK(unrelated.publicKey)), kid: "k2" },
      ],
    }),
  );
  verifier = createJwtVerifier(options(), log, { pollMs: 0 });
});
afterAll(() => verifier.close());

describe("JWT verifier", () => {
  it("accept a valid token: the principal from sub, accepted until exp plus the clock skew", async () => {
    const exp = nowS() + 600;
    expect(await verifier.verify(await sign({}, { exp }))).toEqual({
      principal: "user-1",
      via: "jwt",
      expiresAtMs: exp * 1000 + 30_000,
    });
  });

  it("take the principal from the configured claim", async () => {
    const v = createJwtVerifier(options({ principalClaim: "email" }), log, { pollMs: 0 });
    try {
      expect((await v.verify(await sign({ email: "me@example.org" }))).principal).toBe("me@example.org");
      await refused(await sign(), "TOKEN_INVALID", /no "email" claim/, v);
    } finally {
      v.close();
    }
  });

  it("refuse the reserved principal anonymous, and names with surrounding spaces or control characters", async () => {
    await refused(
      await sign({ sub: "anonymous" }),
      "TOKEN_INVALID",
      /^the token's "sub" claim "anonymous" is reserved/,
    );
    await refused(await sign({ sub: "op " }), "TOKEN_INVALID", /"op " has leading or trailing whitespace/);
    await refused(await sign({ sub: "o\u0000p" }), "TOKEN_INVALID", /"o\\u0000p" holds a control character/);
  });

  it("refuse a token valid for longer than --jwt-max-lifetime, counted from iat or, without one, from now", async () => {
    const day = 24 * 3600;
    // 25 h from its iat: too long, even though 24 h of it are left.
    await refused(
      await sign({ iat: nowS() - 3600 }, { exp: nowS() + day }),
      "TOKEN_LIFETIME_TOO_LONG",
      /^the token is valid for 25 h \(iat .* to exp .*\), longer than the server accepts \(--jwt-max-lifetime 24 h\)/,
    );
    // A year, without iat: what is left of it counts.
    await refused(
      await sign({ iat: undefined }, { exp: nowS() + 365 * day }),
      "TOKEN_LIFETIME_TOO_LONG",
      /^the token is valid for 8760 h \(from now to exp/,
    );
    // Exactly the maximum, within the skew, and a shorter one are accepted.
    expect((await verifier.verify(await sign({ iat: nowS() }, { exp: nowS() + day + 10 }))).principal).toBe(
      "user-1",
    );
    expect((await verifier.verify(await sign({ iat: undefined }, { exp: nowS() + 3600 }))).principal).toBe(
      "user-1",
    );
    // The limit is the server's to set.
    const v = createJwtVerifier(options({ maxLifetimeMs: 6 * 60_000 }), log, { pollMs: 0 });
    try {
      await refused(await sign(), "TOKEN_LIFETIME_TOO_LONG", /--jwt-max-lifetime 0\.1 h/, v);
    } finally {
      v.close();
    }
  });

  it("refuse an expired token beyond the skew, accept one within it", async () => {
    await refused(
      await sign({}, { exp: nowS() - 60 }),
      "TOKEN_EXPIRED",
      /^the token expired at .*clock skew 30 s/,
    );
    expect((await verifier.verify(await sign({}, { exp: nowS() - 10 }))).principal).toBe("user-1");
  });

  it("refuse a token not valid yet", async () => {
    await refused(await sign({ nbf: nowS() + 300 }), "TOKEN_NOT_YET_VALID", /not valid before/);
  });

  it("refuse a token issued in the future beyond the skew, saying to check the clocks; accept one within it", async () => {
    await refused(
      await sign({ iat: nowS() + 3600 }),
      "TOKEN_NOT_YET_VALID",
      /^the token was issued in the future \(iat .*clock skew 30 s\); check the clocks$/,
    );
    expect((await verifier.verify(await sign({ iat: nowS() + 10 }))).principal).toBe("user-1");
  });

  it("refuse a wrong audience or issuer", async () => {
    await refused(
      await sign({ aud: "another-service" }),
      "TOKEN_WRONG_AUDIENCE",
      /for audience "another-service", not "leasehold"/,
    );
    await refused(
      await sign({ iss: "https://evil.example" }),
      "TOKEN_WRONG_ISSUER",
      /issued by "https:\/\/evil\.example", not/,
    );
  });

  it("refuse a token signed with another key, with or without a known kid", async () => {
    await refused(await sign({}, { key: otherKey }), "TOKEN_BAD_SIGNATURE", /signature does not verify/);
    await refused(
      await sign({}, { key: otherKey, kid: "nobody" }),
      "TOKEN_BAD_SIGNATURE",
      /no key of the JWKS matches/,
    );
  });

  it("try each key that fits a token without kid", async () => {
    const path = join(dir, "no-kids.json");
    const a = await generateKeyPair("ES256");
    const b = await generateKeyPair("ES256");
    writeFileSync(
      path,
      JSON.stringify({ keys: [await exportJWK(a.publicKey), await exportJWK(b.publicKey)] }),
    );
    const v = createJwtVerifier(options({ jwks: path }), log, { pollMs: 0 });
    try {
      expect((await v.verify(await sign({}, { key: b.privateKey, kid: null }))).principal).toBe("user-1");
      await refused(await sign({}, { key: otherKey, kid: null }), "TOKEN_BAD_SIGNATURE", /signature/, v);
    } finally {
      v.close();
    }
  });

  it("refuse a token without exp", async () => {
    await refused(await sign({}, { exp: null }), "TOKEN_INVALID", /no exp claim: only tokens that expire/);
  });

  it("refuse HS256 even when the JWKS is known to the signer", async () => {
    const secret = await generateSecret("HS256");
    await refused(
      await sign({}, { key: secret, alg: "HS256" }),
      "TOKEN_INVALID",
      /signed with "HS256", an algorithm that is not accepted; only asymmetric/,
    );
  });

  it("refuse an unsigned token (alg none), saying it is unsigned", async () => {
    const part = (o: object) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const claims = { sub: "mallory", iss: ISSUER, aud: AUDIENCE, exp: Math.floor(Date.now() / 1000) + 600 };
    const unsigned = `${part({ alg: "none", typ: "JWT" })}.${part(claims)}.`;
    // Taken for a JWT (the authenticator hands it to the verifier), its signature empty as it is.
    expect(looksLikeJwt(unsigned)).toBe(true);
    await refused(unsigned, "TOKEN_INVALID", /not signed \(alg "none"\); only asymmetric/);
  });

  it("refuse what is not a JWT", async () => {
    await refused("not-a-jwt", "TOKEN_INVALID", /not a valid JWT/);
    await refused("e30.e30.e30", "TOKEN_INVALID", /not a valid JWT/);
    expect(looksLikeJwt(await sign())).toBe(true);
    expect(looksLikeJwt("lh_abcdef")).toBe(false);
    expect(looksLikeJwt("a.b")).toBe(false);
  });

  it("refuse bad options and JWKS files at start, naming the flag", async () => {
    const bad = (name: string, content: string) => {
      const path = join(dir, name);
      writeFileSync(path, content);
      return path;
    };
    const attempt = (o: Partial<JwtOptions>) => {
      try {
        createJwtVerifier(options(o), log, { pollMs: 0 }).close();
      } catch (error) {
        expect((error as LeaseholdError).code).toBe(Code.InvalidArgument);
        return (error as Error).message;
      }
      throw new Error("accepted");
    };
    expect(attempt({ jwks: join(dir, "missing.json") })).toMatch(/^--jwt-jwks: cannot read/);
    expect(attempt({ jwks: bad("text.json", "nope") })).toMatch(/^--jwt-jwks: .*text\.json: not JSON/);
    expect(attempt({ jwks: bad("empty.json", '{"keys": []}') })).toMatch(/at least one key/);
    const secret = await exportJWK(await generateSecret("HS256", { extractable: true }));
    expect(attempt({ jwks: bad("oct.json", JSON.stringify({ keys: [secret] })) })).toMatch(
      /keys\[0\]: kty "oct" is not accepted/,
    );
    const priv = await exportJWK((await generateKeyPair("ES256", { extractable: true })).privateKey);
    expect(attempt({ jwks: bad("private.json", JSON.stringify({ keys: [priv] })) })).toMatch(
      /keys\[0\]: holds a private key/,
    );
    expect(attempt({ clockSkewMs: 10 * 60_000 })).toMatch(/^--jwt-clock-skew: must be between 0 and 300 s/);
  });

  it("use the keys of a changed JWKS file after reload, and keep them when the file turns bad", async () => {
    const path = join(dir, "rotating.json");
    const first = await generateKeyPair("ES256");
    const second = await generateKeyPair("ES256");
    const write = async (pub: CryptoKey) =>
      writeFileSync(path, JSON.stringify({ keys: [{ ...(await exportJWK(pub)), kid: "k1" }] }));
    await write(first.publicKey);
    const v = createJwtVerifier(options({ jwks: path }), log, { pollMs: 0 });
    try {
      const before = await sign({}, { key: first.privateKey });
      const after = await sign({}, { key: second.privateKey });
      await refused(after, "TOKEN_BAD_SIGNATURE", /signature/, v);
      writeFileSync(path, '{"keys": [');
      expect(await v.reload()).toBe("pending");
      expect(await v.reload()).toBe("rejected");
      expect((await v.verify(before)).principal).toBe("user-1");
      await write(second.publicKey);
      expect(await v.reload()).toBe("pending");
      expect(await v.reload()).toBe("applied");
      expect((await v.verify(after)).principal).toBe("user-1");
      await refused(before, "TOKEN_BAD_SIGNATURE", /signature/, v);
    } finally {
      v.close();
    }
  });
});

describe("JWT verifier with a JWKS URL", () => {
  let server: Server;
  let url: string;
  let fetches = 0;
  beforeAll(async () => {
    const body = JSON.stringify({ keys: [{ ...(await exportJWK(publicKey)), kid: "k1" }] });
    server = createServer((_req, res) => {
      fetches += 1;
      res.writeHead(200, { "content-type": "application/json" }).end(body);
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const address = server.address();
    url = `http://127.0.0.1:${typeof address === "object" && address ? address.port : 0}/jwks.json`;
  });
  afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

  it("verify with keys fetched from the URL, and cache them", async () => {
    const v = createJwtVerifier(options({ jwks: url }), log);
    expect((await v.verify(await sign())).principal).toBe("user-1");
    expect((await v.verify(await sign({ sub: "user-2" }))).principal).toBe("user-2");
    expect(fetches).toBe(1);
    await refused(await sign({}, { key: otherKey }), "TOKEN_BAD_SIGNATURE", /signature does not verify/, v);
    v.close();
  });

  it("say UNAVAILABLE when the JWKS cannot be fetched", async () => {
    const v = createJwtVerifier(options({ jwks: "http://127.0.0.1:1/jwks.json" }), log);
    const error = await rejection(v.verify(await sign()));
    expect(error.code).toBe(Code.Unavailable);
    expect(error.reason).toBe("JWKS_UNAVAILABLE");
    expect(error.message).toMatch(/^cannot get the JWKS from http:\/\/127\.0\.0\.1:1\/jwks\.json/);
  });

  it("fetch at most every 5 s while fetches fail, however many tokens come", async () => {
    let failing = 0;
    const down = createServer((_req, res) => {
      failing += 1;
      res.writeHead(503).end();
    });
    await new Promise<void>((resolve) => down.listen(0, "127.0.0.1", resolve));
    const port = (down.address() as AddressInfo).port;
    let nowMs = Date.now();
    const v = createJwtVerifier(options({ jwks: `http://127.0.0.1:${port}/jwks.json` }), log, {
      now: () => nowMs,
    });
    try {
      for (let i = 0; i < 20; i++) {
        const error = await rejection(v.verify(await sign({}, { kid: `unknown-${i}` })));
        expect(error.reason).toBe("JWKS_UNAVAILABLE");
      }
      expect(failing).toBe(1);
      nowMs += 5_000;
      await rejection(v.verify(await sign()));
      expect(failing).toBe(2);
    } finally {
      v.close();
      down.close();
    }
  });

  it("refuse a JWKS URL in plain http beyond this machine", () => {
    expect(() => createJwtVerifier(options({ jwks: "http://idp.example/jwks.json" }), log)).toThrow(
      /^--jwt-jwks: must be https:\/\/ \(or http:\/\/ to this machine\)/,
    );
  });
});
