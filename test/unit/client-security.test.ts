import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { type AddressInfo, createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code, LeaseholdError } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { createServiceDefinition } from "../../src/rpc/adapter.js";
import { createClient } from "../../src/rpc/client.js";
import { type ClientSecurity, clientChannel } from "../../src/rpc/client-security.js";

const dir = mkdtempSync(join(tmpdir(), "leasehold-client-security-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The INVALID_ARGUMENT `clientChannel` throws (fails the test when it does not throw). */
function refusal(
  security: ClientSecurity,
  addresses: readonly string[] = ["127.0.0.1:50051"],
): LeaseholdError {
  try {
    clientChannel(security, addresses);
  } catch (error) {
    expect(error).toBeInstanceOf(LeaseholdError);
    expect((error as LeaseholdError).code).toBe(Code.InvalidArgument);
    return error as LeaseholdError;
  }
  throw new Error("expected clientChannel to refuse");
}

/**
 * A grpc-js server on 127.0.0.1:0 whose GetAction records the authorization
 * header of each call; `credentials` insecure unless given.
 */
async function recordingServer(credentials = grpc.ServerCredentials.createInsecure()) {
  const seen: string[][] = [];
  const server = new grpc.Server();
  server.addService(createServiceDefinition(ActionService), {
    getAction(call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) {
      seen.push(call.metadata.get("authorization").map(String));
      callback(null, create(ActionService.method.getAction.output, {}));
    },
  });
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", credentials, (error, p) => (error ? reject(error) : resolve(p))),
  );
  return { seen, port, close: () => server.forceShutdown() };
}

/** Calls GetAction once over the channel `security` gives for `address`. */
async function callOnce(security: ClientSecurity, address: string): Promise<void> {
  const channel = clientChannel(security, [address]);
  const client = createClient(
    ActionService,
    address,
    channel.credentials,
    channel.options,
    channel.interceptors,
  );
  try {
    await client.getAction({ actionId: "a" }, { deadline: new Date(Date.now() + 10_000) });
  } finally {
    client.close();
  }
}

describe("client security: combinations", () => {
  it("refuses a token in plaintext to a host beyond loopback, naming the host", () => {
    const e = refusal({ token: "secret" }, ["127.0.0.1:50051", "10.0.0.7:50051"]);
    expect(e.message).toBe(
      "--token: refusing to send a token in plaintext to 10.0.0.7; use TLS (--tls-ca) or a loopback address",
    );
    expect(refusal({ token: "secret" }, ["leasehold.example.com:50051"]).message).toMatch(
      /plaintext to leasehold\.example\.com;/,
    );
  });

  it("refuses a token file in plaintext to a host beyond loopback too", () => {
    const file = join(dir, "remote-token");
    writeFileSync(file, "secret\n");
    expect(refusal({ tokenFile: file }, ["[2001:db8::1]:50051"]).message).toMatch(
      /^--token: refusing to send a token in plaintext to 2001:db8::1;/,
    );
  });

  it("allows a token in plaintext to loopback addresses: 127.x, ::1 and localhost", () => {
    const channel = clientChannel({ token: "secret" }, [
      "127.0.0.2:1",
      "[::1]:2",
      "localhost:3",
      "LOCALHOST:4",
    ]);
    expect(channel.interceptors).toHaveLength(1);
  });

  it("refuses a client certificate without its key, and a key without its certificate", () => {
    expect(refusal({ tlsCert: "/tmp/c.pem" }).message).toMatch(/^--tls-cert: needs --tls-key/);
    expect(refusal({ tlsKey: "/tmp/k.pem" }).message).toMatch(/^--tls-key: needs --tls-cert/);
  });

  it("refuses --token with --token-file", () => {
    expect(refusal({ token: "a", tokenFile: "/tmp/t" }).message).toMatch(
      /^--token: give either --token or --token-file/,
    );
  });

  it("refuses a server name without TLS", () => {
    expect(refusal({ serverName: "leasehold.test" }).message).toMatch(
      /^--tls-server-name: applies only to TLS/,
    );
  });

  it("names the flag of a file it cannot read", () => {
    const missing = join(dir, "missing.pem");
    expect(refusal({ tlsCa: missing }).message).toMatch(/^--tls-ca: cannot read ".*missing\.pem": ENOENT/);
    expect(refusal({ tlsCert: missing, tlsKey: missing }).message).toMatch(/^--tls-cert: cannot read/);
    expect(refusal({ token: undefined, tokenFile: missing }).message).toMatch(/^--token-file: cannot read/);
  });

  it("names the flag of a file that is not what it should be", () => {
    const junk = join(dir, "junk.pem");
    writeFileSync(junk, "not a certificate");
    expect(refusal({ tlsCa: junk }).message).toMatch(/^--tls-ca: is not a PEM certificate/);
    const empty = join(dir, "empty-token");
    writeFileSync(empty, "\n");
    expect(refusal({ tokenFile: empty }).message).toMatch(/^--token-file: .* must hold one token/);
    expect(refusal({ token: "two words" }).message).toMatch(/^--token: must be printable ASCII/);
  });

  it("is plaintext without credentials when nothing is set, and TLS with --tls alone", () => {
    expect(clientChannel({}, ["10.0.0.7:50051"]).credentials._isSecure()).toBe(false);
    const tls = clientChannel({ tls: true, serverName: "leasehold.test" }, ["10.0.0.7:50051"]);
    expect(tls.credentials._isSecure()).toBe(true);
    expect(tls.options).toEqual({
      "grpc.ssl_target_name_override": "leasehold.test",
      "grpc.default_authority": "leasehold.test",
    });
  });
});

describe("client security: tokens on the wire", () => {
  let server: Awaited<ReturnType<typeof recordingServer>>;
  beforeAll(async () => {
    server = await recordingServer();
  });
  afterAll(() => server.close());

  it("adds `authorization: Bearer <token>` to every call in plaintext to 127.0.0.1", async () => {
    const before = server.seen.length;
    await callOnce({ token: "abc.def" }, `127.0.0.1:${server.port}`);
    await callOnce({}, `127.0.0.1:${server.port}`);
    expect(server.seen.slice(before)).toEqual([["Bearer abc.def"], []]);
  });

  it("never sends a plaintext token through the proxy the environment names", async () => {
    // A proxy that only counts who came: grpc-js would send it CONNECT, then the token.
    let proxied = 0;
    const proxy = createNetServer((socket) => {
      proxied += 1;
      socket.destroy();
    });
    await new Promise<void>((resolve) => proxy.listen(0, "127.0.0.1", resolve));
    const saved = process.env.http_proxy;
    process.env.http_proxy = `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`;
    try {
      const before = server.seen.length;
      await callOnce({ token: "abc.def" }, `localhost:${server.port}`);
      expect(server.seen.slice(before)).toEqual([["Bearer abc.def"]]);
      expect(proxied).toBe(0);
    } finally {
      if (saved === undefined) delete process.env.http_proxy;
      else process.env.http_proxy = saved;
      proxy.close();
    }
  });

  it("reads a token file again after it changes, whether rewritten or replaced", async () => {
    const file = join(dir, "token");
    writeFileSync(file, "first-token\n");
    const address = `127.0.0.1:${server.port}`;
    const channel = clientChannel({ tokenFile: file }, [address]);
    const client = createClient(
      ActionService,
      address,
      channel.credentials,
      channel.options,
      channel.interceptors,
    );
    const before = server.seen.length;
    try {
      await client.getAction({ actionId: "a" });
      writeFileSync(file, "second-token-rotated\n"); // rewritten in place
      await client.getAction({ actionId: "a" });
      writeFileSync(`${file}.new`, "third\n");
      renameSync(`${file}.new`, file); // replaced, as a symlink swap of a projected token does
      await client.getAction({ actionId: "a" });
      writeFileSync(file, ""); // mid-rotation: the last token stays in use
      await client.getAction({ actionId: "a" });
    } finally {
      client.close();
    }
    expect(server.seen.slice(before)).toEqual([
      ["Bearer first-token"],
      ["Bearer second-token-rotated"],
      ["Bearer third"],
      ["Bearer third"],
    ]);
  });
});

describe("client security: TLS and mTLS", () => {
  const pki = join(dir, "pki");
  const path = (name: string) => join(pki, name);
  let server: Awaited<ReturnType<typeof recordingServer>>;

  beforeAll(async () => {
    execFileSync("mkdir", ["-p", pki]);
    const openssl = (...args: string[]) => execFileSync("openssl", args, { cwd: pki, stdio: "pipe" });
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
      "req",
      "-x509",
      ...ec,
      "-keyout",
      "ca.key",
      "-out",
      "ca.pem",
      "-days",
      "1",
      "-subj",
      "/CN=test-ca",
    );
    for (const [name, san] of [
      ["server", "DNS:leasehold.test"],
      ["client", "DNS:agent-1"],
    ] as const) {
      openssl("req", ...ec, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${name}`);
      writeFileSync(path(`${name}.ext`), `subjectAltName=${san}\n`);
      openssl(
        "x509",
        "-req",
        "-in",
        `${name}.csr`,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        `${name}.ext`,
        "-out",
        `${name}.pem`,
      );
    }
    server = await recordingServer(
      grpc.ServerCredentials.createSsl(
        readFileSync(path("ca.pem")),
        [{ private_key: readFileSync(path("server.key")), cert_chain: readFileSync(path("server.pem")) }],
        true, // mTLS: a client without a certificate signed by the CA is turned away
      ),
    );
  });
  afterAll(() => server?.close());

  it("sends the token as call credentials over mTLS, checking the server's name instead of the address", async () => {
    const before = server.seen.length;
    await callOnce(
      {
        tlsCa: path("ca.pem"),
        tlsCert: path("client.pem"),
        tlsKey: path("client.key"),
        serverName: "leasehold.test",
        token: "over-tls",
      },
      `127.0.0.1:${server.port}`,
    );
    expect(server.seen.slice(before)).toEqual([["Bearer over-tls"]]);
  });

  it("allows a token over TLS to any host, without an interceptor", () => {
    const channel = clientChannel({ tlsCa: path("ca.pem"), token: "t" }, ["10.0.0.7:50051"]);
    expect(channel.interceptors).toEqual([]);
    expect(channel.credentials._isSecure()).toBe(true);
  });

  it("fails the call when the server's certificate does not carry the expected name", async () => {
    await expect(
      callOnce(
        {
          tlsCa: path("ca.pem"),
          tlsCert: path("client.pem"),
          tlsKey: path("client.key"),
          serverName: "other.test",
        },
        `127.0.0.1:${server.port}`,
      ),
    ).rejects.toMatchObject({ code: grpc.status.UNAVAILABLE });
  });

  it("refuses a certificate with another certificate's key, naming --tls-cert", () => {
    expect(refusal({ tlsCert: path("client.pem"), tlsKey: path("server.key") }).message).toMatch(
      /^--tls-cert: and --tls-key are not a matching PEM certificate/,
    );
  });
});
