import { copyFileSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type AgentEvent, createAgent } from "../../src/agent/agent.js";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { type CertificateFiles, createCa, issueCertificate } from "../helpers/pki.js";
import { runCli } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/** No connection sharing between test clients: each one shows what a new connection sees. */
const OWN_CONNECTION = { "grpc.use_local_subchannel_pool": 1 };

describe.runIf(runsDriverNeutralTests())("TLS and mTLS on a live server", () => {
  let dir: string;
  let server: TestServer;
  let serverCa1: CertificateFiles;
  let serverCa2: CertificateFiles;
  let clientCa: CertificateFiles;
  let foreignCa: CertificateFiles;
  let serverCert2: CertificateFiles;
  let operator: CertificateFiles;
  let agentCert: CertificateFiles;
  const tlsFiles = { certFile: "", keyFile: "" };
  const closers: (() => unknown)[] = [];

  const pem = (f: string) => readFileSync(f);
  function credentialsFor(trust: readonly CertificateFiles[], client: CertificateFiles | undefined) {
    const roots = Buffer.concat(trust.map((c) => pem(c.certFile)));
    return client
      ? grpc.credentials.createSsl(roots, pem(client.keyFile), pem(client.certFile))
      : grpc.credentials.createSsl(roots);
  }
  function clusters(trust: readonly CertificateFiles[], client: CertificateFiles | undefined) {
    const c = createClient(ClusterService, server.address, credentialsFor(trust, client), OWN_CONNECTION);
    closers.push(() => c.close());
    return c;
  }
  /** Replaces a file the way an operator should: write aside, then rename into place. */
  function replace(target: string, source: string) {
    const aside = `${target}.new`;
    copyFileSync(source, aside);
    renameSync(aside, target);
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-tls-"));
    serverCa1 = createCa(dir, "server-ca-1");
    serverCa2 = createCa(dir, "server-ca-2");
    clientCa = createCa(dir, "client-ca");
    foreignCa = createCa(dir, "foreign-ca");
    const serverCert1 = issueCertificate(serverCa1, { dir, name: "server-1", ips: ["127.0.0.1"] });
    serverCert2 = issueCertificate(serverCa2, { dir, name: "server-2", ips: ["127.0.0.1"] });
    operator = issueCertificate(clientCa, { dir, name: "op", uris: ["spiffe://t/op"], client: true });
    agentCert = issueCertificate(clientCa, { dir, name: "agent", uris: ["spiffe://t/agent"], client: true });
    tlsFiles.certFile = join(dir, "server.crt");
    tlsFiles.keyFile = join(dir, "server.key");
    copyFileSync(serverCert1.certFile, tlsFiles.certFile);
    copyFileSync(serverCert1.keyFile, tlsFiles.keyFile);
    const policy = join(dir, "policy.yaml");
    writeFileSync(
      policy,
      "bindings:\n  - principals: [spiffe://t/agent]\n    role: agent\n    clusters: [tls]\n" +
        '  - principals: [spiffe://t/op]\n    role: operator\n    clusters: ["*"]\n',
    );
    server = await startTestServer({
      config: {
        tlsCert: tlsFiles.certFile,
        tlsKey: tlsFiles.keyFile,
        tlsClientCa: clientCa.certFile,
        authPolicy: policy,
      },
    });
  }, 60_000);

  afterAll(async () => {
    // The agents too: under isolate: false their timers would outlive this file.
    await Promise.all(closers.map((close) => close()));
    await server?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  it("refuses a client certificate from another CA, and a client without one", async () => {
    const impostor = issueCertificate(foreignCa, {
      dir,
      name: "impostor",
      uris: ["spiffe://t/op"],
      client: true,
    });
    const refused = (trust: CertificateFiles[], client: CertificateFiles | undefined) =>
      clusters(trust, client)
        .listClusters({}, { deadline: new Date(Date.now() + 30_000) })
        .then(
          () => Code.Unknown + 100,
          (e: grpc.ServiceError) => e.code,
        );
    // The handshake fails: no call reaches a handler.
    expect(await refused([serverCa1], impostor)).toBe(Code.Unavailable);
    expect(await refused([serverCa1], undefined)).toBe(Code.Unavailable);
    expect((await clusters([serverCa1], operator).listClusters({})).clusters).toBeDefined();
  });

  it("tells a command line user without TLS options that the server may want them", async () => {
    const plaintext = await runCli(["--server", server.address, "clusters", "list"]);
    expect(plaintext.code).toBe(3);
    expect(plaintext.stderr).toMatch(/if it serves TLS, pass --tls-ca <ca\.pem>/);
  });

  it("tells a command line user whose TLS options do not trust the server's certificate which ones to pass", async () => {
    const port = server.address.split(":")[1];
    const client = ["--tls-cert", operator.certFile, "--tls-key", operator.keyFile];
    const list = async (args: string[]) => runCli([...args, "clusters", "list"]);
    // Only the system's CAs, or the wrong private CA: the certificate's issuer is unknown.
    for (const trust of [["--tls"], ["--tls-ca", serverCa2.certFile, ...client]]) {
      const r = await list(["--server", server.address, ...trust]);
      expect(r.code).toBe(3);
      expect(r.stderr).toBe(
        `leasehold: the server at ${server.address} answered, but its certificate was not trusted ` +
          "(unable to verify the first certificate): pass --tls-ca <ca.pem> with the CA that signed it " +
          "(--tls alone trusts only the system's CAs), and --tls-server-name <name> if it was issued for " +
          "another name than the host of --server\n",
      );
    }
    // The right CA, but a name the certificate does not hold (it names 127.0.0.1 only).
    const byName = await list(["--server", `localhost:${port}`, "--tls-ca", serverCa1.certFile, ...client]);
    expect(byName.code).toBe(3);
    expect(byName.stderr).toMatch(
      /^leasehold: the server at localhost:\d+ answered, but its certificate was not trusted \(Hostname\/IP does not match certificate's altnames: [^)]*\): it does not name the host of --server; connect by a name it holds, or pass --tls-server-name <name> with one/,
    );
    expect(
      await list([
        "--server",
        `localhost:${port}`,
        "--tls-server-name",
        "127.0.0.1",
        "--tls-ca",
        serverCa1.certFile,
        ...client,
      ]),
    ).toMatchObject({ code: 0 });
    // The server's certificate is trusted, but the server wants the client's.
    const noClientCert = await list(["--server", server.address, "--tls-ca", serverCa1.certFile]);
    expect(noClientCert).toMatchObject({
      code: 3,
      stderr:
        `leasehold: the server at ${server.address} refused the TLS connection (tlsv13 alert certificate ` +
        "required): it wants a client certificate it trusts; pass --tls-cert <cert.pem> and --tls-key " +
        "<key.pem> with one its client CA signed\n",
    });
  });

  it("rotates the server certificate under a connected agent: its stream survives, new connections see the new one", async () => {
    const events: AgentEvent[] = [];
    let connected: () => void = () => {};
    const firstConnect = new Promise<void>((resolve) => {
      connected = resolve;
    });
    const finished = new Map<string, () => void>();
    const agent = createAgent({
      address: server.address,
      cluster: "tls",
      workerId: "tls-agent",
      capacity: 1,
      // Trusts both server CAs, as a fleet does during a CA rotation.
      credentials: credentialsFor([serverCa1, serverCa2], agentCert),
      handler: async () => ({ ok: true }),
      onEvent: (e) => {
        events.push(e);
        if (e.type === "connected") connected();
        if (e.type === "finished") finished.get(e.actionId)?.();
      },
    });
    closers.push(() => agent.close());
    await firstConnect;
    const runOne = async (trust: CertificateFiles[]) => {
      const actions = createClient(
        ActionService,
        server.address,
        credentialsFor(trust, operator),
        OWN_CONNECTION,
      );
      closers.push(() => actions.close());
      const { action } = await actions.submitAction({ cluster: "tls", payload: {} });
      const id = action?.id ?? "";
      await new Promise<void>((resolve) => finished.set(id, resolve));
      const { action: done } = await actions.getAction({ actionId: id });
      return done;
    };
    expect((await runOne([serverCa1]))?.state).toBe(ActionState.SUCCEEDED);
    const before = await clusters([serverCa1], operator).getWorker({ workerId: "tls-agent" });

    replace(tlsFiles.keyFile, serverCert2.keyFile);
    replace(tlsFiles.certFile, serverCert2.certFile);
    // Two looks in a row that find the files as they are apply them. The server's own
    // once-a-second look may do it first ("unchanged" here); what follows checks that the new
    // certificate is the one in force.
    await server.server.security.tls?.reload();
    expect(await server.server.security.tls?.reload()).not.toBe("rejected");

    // A new connection that trusts only the old CA is refused; one that trusts the new CA gets in.
    await expect(clusters([serverCa1], operator).listClusters({})).rejects.toMatchObject({
      code: Code.Unavailable,
    });
    const after = await clusters([serverCa2], operator).getWorker({ workerId: "tls-agent" });
    // The agent's stream rode through: same session, and it still takes and finishes work.
    expect(before.worker?.session?.sessionId).toBeTruthy();
    expect(after.worker?.session?.sessionId).toBe(before.worker?.session?.sessionId);
    const done = await runOne([serverCa2]);
    expect(done?.state).toBe(ActionState.SUCCEEDED);
    expect(events.filter((e) => e.type === "connected")).toHaveLength(1);
    expect(events.filter((e) => e.type === "disconnected")).toHaveLength(0);
  });

  it("closes the connections whose client certificate the new client CA does not verify, once it changes", async () => {
    const caFile = join(dir, "rotating-client-ca.crt");
    copyFileSync(clientCa.certFile, caFile);
    const nextCa = createCa(dir, "next-client-ca");
    const nextOperator = issueCertificate(nextCa, {
      dir,
      name: "next-op",
      uris: ["spiffe://t/op"],
      client: true,
    });
    const other = await startTestServer({
      config: {
        tlsCert: serverCert2.certFile,
        tlsKey: serverCert2.keyFile,
        tlsClientCa: caFile,
        authPolicy: join(dir, "policy.yaml"),
      },
    });
    closers.push(() => other[Symbol.asyncDispose]());
    const on = (client: CertificateFiles) => {
      const c = createClient(
        ClusterService,
        other.address,
        credentialsFor([serverCa2], client),
        OWN_CONNECTION,
      );
      closers.push(() => c.close());
      return c;
    };
    const old = on(operator);
    expect((await old.listClusters({})).clusters).toBeDefined();
    // A watch opened under the old CA, on a connection of its own.
    const watcher = createClient(
      EventService,
      other.address,
      credentialsFor([serverCa2], operator),
      OWN_CONNECTION,
    );
    closers.push(() => watcher.close());
    const watch = watcher.watchEvents({ kind: EventKind.ACTION_SUBMITTED })[Symbol.asyncIterator]();
    await watcher.listEvents({});

    replace(caFile, nextCa.certFile);
    await other.server.security.tls?.reload();
    expect(await other.server.security.tls?.reload()).not.toBe("rejected");
    // The connections the old CA verified carry no new call: the client must connect again, and
    // the new CA refuses its certificate.
    await expect(old.listClusters({})).rejects.toMatchObject({ code: Code.Unavailable });
    expect(other.logs.map((l) => l.msg)).toContain(
      "closed 2 connections whose client certificate does not chain to the new --tls-client-ca; their open streams go on",
    );
    const actions = createClient(
      ActionService,
      other.address,
      credentialsFor([serverCa2], nextOperator),
      OWN_CONNECTION,
    );
    closers.push(() => actions.close());
    const { action } = await actions.submitAction({ cluster: "tls", payload: {} });
    // The open watch goes on to its end, as open streams do over any rotation.
    let seen = await watch.next();
    while (!seen.done && seen.value.event?.actionId !== action?.id) seen = await watch.next();
    expect(seen.done).toBe(false);
    await watch.return?.();
  });

  it("verifies the name an agent was given, not the IPs it resolves to", async () => {
    // A certificate for the name only: dialing 127.0.0.1 must still check "localhost".
    const named = issueCertificate(serverCa1, { dir, name: "named", dns: ["localhost"] });
    const policy = join(dir, "policy-named.yaml");
    writeFileSync(
      policy,
      'bindings:\n  - principals: [spiffe://t/agent]\n    role: agent\n    clusters: ["*"]\n',
    );
    await using other = await startTestServer({
      config: {
        tlsCert: named.certFile,
        tlsKey: named.keyFile,
        tlsClientCa: clientCa.certFile,
        authPolicy: policy,
      },
    });
    const port = other.address.split(":")[1];
    const connected = new Promise<string>((resolve, reject) => {
      const agent = createAgent({
        address: `localhost:${port}`,
        cluster: "named",
        workerId: "named-agent",
        capacity: 1,
        security: { tlsCa: serverCa1.certFile, tlsCert: agentCert.certFile, tlsKey: agentCert.keyFile },
        handler: async () => ({}),
        onEvent: (e) => {
          if (e.type === "connected") resolve(e.address);
          if (e.type === "disconnected") reject(new Error(e.error));
        },
      });
      closers.push(() => agent.close());
    });
    expect(await connected).toMatch(/^(127\.0\.0\.1|\[::1\]):/);
  });
});
