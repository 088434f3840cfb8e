import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { PeerCertificate } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import pino from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import {
  createReloadingServerCredentials,
  parseSubjectAltNames,
  principalOfCertificate,
  type ServerTlsFiles,
} from "../../src/rpc/tls.js";
import { type Ca, type CertificateFiles, createCa, issueCertificate } from "../helpers/pki.js";

const bytes = (b: Buffer) => b;
const text = (s: string) => Buffer.from(s);

/**
 * A probe service on raw bytes: `Whoami` answers the principal of the
 * caller's verified client certificate ("-" without one); `Follow` is a
 * server stream that sends what the test pushes.
 */
const probeService: grpc.ServiceDefinition = {
  whoami: {
    path: "/test.Probe/Whoami",
    requestStream: false,
    responseStream: false,
    requestSerialize: bytes,
    requestDeserialize: bytes,
    responseSerialize: bytes,
    responseDeserialize: bytes,
  },
  follow: {
    path: "/test.Probe/Follow",
    requestStream: false,
    responseStream: true,
    requestSerialize: bytes,
    requestDeserialize: bytes,
    responseSerialize: bytes,
    responseDeserialize: bytes,
  },
};

interface Logged {
  level: number;
  msg: string;
}

let dir: string;
let caA: Ca;
let caB: Ca;
let other: Ca;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "leasehold-tls-"));
  caA = createCa(dir, "ca-a");
  caB = createCa(dir, "ca-b");
  other = createCa(dir, "ca-other");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0).reverse()) cleanup();
});

function serverCert(ca: CertificateFiles, name: string) {
  return issueCertificate(ca, { dir, name, dns: ["localhost"], ips: ["127.0.0.1"] });
}

/** The files the server reads: copies, so that tests can rotate them in place. */
function liveFiles(from: CertificateFiles, name: string) {
  const certFile = join(dir, `${name}-live.crt`);
  const keyFile = join(dir, `${name}-live.key`);
  copyFileSync(from.certFile, certFile);
  copyFileSync(from.keyFile, keyFile);
  return { certFile, keyFile };
}

async function startServer(files: ServerTlsFiles) {
  const logged: Logged[] = [];
  const log = pino({ level: "info" }, { write: (line: string) => logged.push(JSON.parse(line)) });
  const tls = createReloadingServerCredentials(files, log, { pollMs: 0 });
  const server = new grpc.Server();
  const followers = new Set<grpc.ServerWritableStream<Buffer, Buffer>>();
  server.addService(probeService, {
    whoami(call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) {
      const cert = call.getAuthContext().sslPeerCertificate;
      callback(null, text(cert ? (principalOfCertificate(cert) ?? "(none)") : "-"));
    },
    follow(call: grpc.ServerWritableStream<Buffer, Buffer>) {
      followers.add(call);
      call.on("cancelled", () => followers.delete(call));
      call.write(text("hello"));
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", tls.credentials, (error, p) => (error ? reject(error) : resolve(p))),
  );
  cleanups.push(() => {
    tls.close();
    server.forceShutdown();
  });
  const push = (message: string) => {
    for (const call of followers) call.write(text(message));
  };
  return { tls, address: `127.0.0.1:${port}`, logged, push, followers };
}

function client(
  address: string,
  trust: CertificateFiles,
  identity?: CertificateFiles,
): { whoami(): Promise<string>; follow(): grpc.ClientReadableStream<Buffer>; close(): void } {
  const credentials = grpc.credentials.createSsl(
    readFileSync(trust.certFile),
    identity ? readFileSync(identity.keyFile) : null,
    identity ? readFileSync(identity.certFile) : null,
  );
  const c = new grpc.Client(address, credentials, {
    // A pool of its own: each client makes its own connection (its own handshake).
    "grpc.use_local_subchannel_pool": 1,
    // Check the certificate's DNS name (TLS sends no IP address as server name).
    "grpc.ssl_target_name_override": "localhost",
  });
  cleanups.push(() => c.close());
  return {
    whoami: () =>
      new Promise((resolve, reject) =>
        c.makeUnaryRequest(
          "/test.Probe/Whoami",
          bytes,
          bytes,
          Buffer.alloc(0),
          { deadline: Date.now() + 10_000 },
          (error, response) => (error ? reject(error) : resolve(response?.toString() ?? "")),
        ),
      ),
    follow() {
      const call = c.makeServerStreamRequest("/test.Probe/Follow", bytes, bytes, Buffer.alloc(0), {
        deadline: Date.now() + 30_000,
      });
      // Ends with CANCELLED when the test is over; nextMessage reports errors before that.
      call.on("error", () => {});
      cleanups.push(() => call.cancel());
      return call;
    },
    close: () => c.close(),
  };
}

const nextMessage = (call: grpc.ClientReadableStream<Buffer>) =>
  new Promise<string>((resolve, reject) => {
    const onData = (m: Buffer) => {
      call.off("error", onError);
      resolve(m.toString());
    };
    const onError = (e: Error) => {
      call.off("data", onData);
      reject(e);
    };
    call.once("data", onData);
    call.once("error", onError);
  });

const failure = (promise: Promise<unknown>) =>
  promise.then(
    () => {
      throw new Error("the call succeeded");
    },
    (error: grpc.ServiceError) => error,
  );

describe("TLS server credentials", () => {
  it("serve a client that trusts the CA, and refuse one that trusts another CA", async () => {
    const server = await startServer({ ...serverCert(caA, "plain"), clientAuth: "optional" });
    expect(await client(server.address, caA).whoami()).toBe("-");
    const refused = await failure(client(server.address, other).whoami());
    expect(refused.code).toBe(grpc.status.UNAVAILABLE);
  });

  it("with clientAuth require, need a client certificate from the client CA and name its principal", async () => {
    const server = await startServer({
      ...serverCert(caA, "mtls-server"),
      clientCaFile: caB.certFile,
      clientAuth: "require",
    });
    const agent = issueCertificate(caB, {
      dir,
      name: "agent-a1",
      client: true,
      dns: ["agent-a1.example.org"],
      uris: ["spiffe://example.org/agent/a1"],
    });
    expect(await client(server.address, caA, agent).whoami()).toBe("spiffe://example.org/agent/a1");

    const dnsOnly = issueCertificate(caB, { dir, name: "dns-only", client: true, dns: ["ci.example.org"] });
    expect(await client(server.address, caA, dnsOnly).whoami()).toBe("ci.example.org");

    const noCert = await failure(client(server.address, caA).whoami());
    expect(noCert.code).toBe(grpc.status.UNAVAILABLE);

    const foreign = issueCertificate(other, { dir, name: "foreign", client: true, dns: ["x.example.org"] });
    const wrongCa = await failure(client(server.address, caA, foreign).whoami());
    expect(wrongCa.code).toBe(grpc.status.UNAVAILABLE);
  });

  it("with clientAuth optional, let clients in without a certificate and give no principal for a foreign one", async () => {
    const server = await startServer({
      ...serverCert(caA, "optional-server"),
      clientCaFile: caB.certFile,
      clientAuth: "optional",
    });
    const agent = issueCertificate(caB, { dir, name: "opt-agent", client: true, uris: ["spiffe://x/a"] });
    expect(await client(server.address, caA, agent).whoami()).toBe("spiffe://x/a");
    expect(await client(server.address, caA).whoami()).toBe("-");
    const foreign = issueCertificate(other, {
      dir,
      name: "opt-foreign",
      client: true,
      dns: ["x.example.org"],
    });
    expect(await client(server.address, caA, foreign).whoami()).toBe("-");
  });

  it("rotate to a certificate from a new CA: open streams go on, new handshakes get the new certificate", async () => {
    const live = liveFiles(serverCert(caA, "rotate-old"), "rotate");
    const server = await startServer({ ...live, clientAuth: "optional" });
    const before = client(server.address, caA);
    const stream = before.follow();
    expect(await nextMessage(stream)).toBe("hello");

    const next = serverCert(caB, "rotate-new");
    copyFileSync(next.certFile, live.certFile);
    // Only the certificate so far: it does not match the key, so nothing changes.
    expect(await server.tls.reload()).toBe("pending");
    expect(await server.tls.reload()).toBe("rejected");
    expect(await client(server.address, caA).whoami()).toBe("-");
    copyFileSync(next.keyFile, live.keyFile);
    expect(await server.tls.reload()).toBe("pending");
    expect(await server.tls.reload()).toBe("applied");
    expect(await server.tls.reload()).toBe("unchanged");

    server.push("after rotation");
    expect(await nextMessage(stream)).toBe("after rotation");
    const oldTrust = await failure(client(server.address, caA).whoami());
    expect(oldTrust.code).toBe(grpc.status.UNAVAILABLE);
    expect(await client(server.address, caB).whoami()).toBe("-");

    const messages = server.logged.map((l) => l.msg);
    expect(messages).toContain("TLS certificate rotated: new connections get the new one");
    expect(server.logged.find((l) => l.level === 40)?.msg).toMatch(/does not belong to the certificate/);
  });

  it("keep the old certificate when the key file is half-written", async () => {
    const live = liveFiles(serverCert(caA, "half-old"), "half");
    const server = await startServer({ ...live, clientAuth: "optional" });
    const next = serverCert(caA, "half-new");
    copyFileSync(next.certFile, live.certFile);
    const key = readFileSync(next.keyFile);
    writeFileSync(live.keyFile, key.subarray(0, Math.floor(key.length / 2)));
    expect(await server.tls.reload()).toBe("pending");
    expect(await server.tls.reload()).toBe("rejected");
    const warning = server.logged.find((l) => l.level === 40);
    expect(warning?.msg).toContain(live.keyFile);
    expect(warning?.msg).toContain("still being written");
    // The old certificate still serves new connections.
    expect(await client(server.address, caA).whoami()).toBe("-");
    // The same broken state is not judged again; the completed file is applied.
    expect(await server.tls.reload()).toBe("unchanged");
    writeFileSync(live.keyFile, key);
    expect(await server.tls.reload()).toBe("pending");
    expect(await server.tls.reload()).toBe("applied");
    expect(await client(server.address, caA).whoami()).toBe("-");
  });

  it("rotate the client CA: certificates of the new CA are accepted, those of the old one refused", async () => {
    const caFile = join(dir, "client-ca-live.crt");
    copyFileSync(caA.certFile, caFile);
    const server = await startServer({
      ...serverCert(caA, "ca-rot-server"),
      clientCaFile: caFile,
      clientAuth: "require",
    });
    const fromA = issueCertificate(caA, { dir, name: "ca-rot-a", client: true, dns: ["a.example.org"] });
    const fromB = issueCertificate(caB, { dir, name: "ca-rot-b", client: true, dns: ["b.example.org"] });
    expect(await client(server.address, caA, fromA).whoami()).toBe("a.example.org");
    copyFileSync(caB.certFile, caFile);
    expect(await server.tls.reload()).toBe("pending");
    expect(await server.tls.reload()).toBe("applied");
    expect(await client(server.address, caA, fromB).whoami()).toBe("b.example.org");
    expect((await failure(client(server.address, caA, fromA).whoami())).code).toBe(grpc.status.UNAVAILABLE);
  });

  it("refuse bad files at start with the flag and path in the message", () => {
    const log = pino({ level: "silent" });
    const good = serverCert(caA, "start-good");
    const otherKey = serverCert(caA, "start-other");
    const garbage = join(dir, "garbage.pem");
    writeFileSync(garbage, "not a pem\n");
    const attempt = (files: Partial<ServerTlsFiles>) => {
      try {
        createReloadingServerCredentials({ ...good, clientAuth: "require", ...files }, log).close();
      } catch (error) {
        return error as LeaseholdError;
      }
      throw new Error("accepted");
    };
    const missing = attempt({ certFile: join(dir, "missing.crt") });
    expect(missing).toBeInstanceOf(LeaseholdError);
    expect(missing.code).toBe(Code.InvalidArgument);
    expect(missing.message).toMatch(/^--tls-cert: cannot read .*missing\.crt/);
    expect(attempt({ certFile: garbage }).message).toMatch(
      /^--tls-cert: .*garbage\.pem holds no PEM certificate/,
    );
    expect(attempt({ keyFile: garbage }).message).toMatch(
      /^--tls-key: .*garbage\.pem holds no usable private key/,
    );
    expect(attempt({ keyFile: otherKey.keyFile }).message).toMatch(
      /^--tls-key: the key in .*start-other\.key does not belong to the certificate in .*start-good\.crt/,
    );
    expect(attempt({ clientCaFile: garbage }).message).toMatch(
      /^--tls-client-ca: .*garbage\.pem holds no PEM/,
    );
    const expired = issueCertificate(caA, { dir, name: "start-expired", dns: ["localhost"], days: 1 });
    const later = Date.now() + 2 * 86_400_000;
    expect(() =>
      createReloadingServerCredentials({ ...expired, clientAuth: "optional" }, log, { now: () => later }),
    ).toThrow(/^--tls-cert: the certificate in .*start-expired\.crt expired at/);
  });
});

describe("principalOfCertificate", () => {
  const of = (subjectaltname: string | undefined) =>
    principalOfCertificate({ subjectaltname, subject: { CN: "ignored" } } as unknown as PeerCertificate);

  it("take the first URI, else the first DNS name, never the CN", () => {
    expect(of("DNS:a.example.org, URI:spiffe://example.org/agent/a1, URI:spiffe://x/2")).toBe(
      "spiffe://example.org/agent/a1",
    );
    expect(of("IP Address:10.0.0.1, DNS:first.example.org, DNS:second.example.org")).toBe(
      "first.example.org",
    );
    expect(of("IP Address:10.0.0.1, email:me@example.org")).toBeUndefined();
    expect(of(undefined)).toBeUndefined();
    expect(of("")).toBeUndefined();
  });

  it("read values that Node quotes because they hold commas or quotes", () => {
    expect(of('DNS:a.example.org, URI:"spiffe://x/a\\u002cb", URI:plain')).toBe("spiffe://x/a,b");
    expect(parseSubjectAltNames('URI:"x\\"y", DNS:"p\\u002cq", IP Address:1.2.3.4')).toEqual([
      { type: "URI", value: 'x"y' },
      { type: "DNS", value: "p,q" },
      { type: "IP Address", value: "1.2.3.4" },
    ]);
  });

  it("read the quoting of a real certificate", async () => {
    const server = await startServer({
      ...serverCert(caA, "quoted-server"),
      clientCaFile: caB.certFile,
      clientAuth: "require",
    });
    const quoted = issueCertificate(caB, { dir, name: "quoted", client: true, uris: ["spiffe://x/a,b"] });
    expect(await client(server.address, caA, quoted).whoami()).toBe("spiffe://x/a,b");
  });
});
