import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Event, EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { DeploymentPhase, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { createCa, issueCertificate } from "../helpers/pki.js";
import { freePort } from "../helpers/ports.js";
import { type LeaseholdProcess, runReferenceAgent } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

const CLUSTER = "secured";
const AGENT = "spiffe://leasehold.test/agent/a1";
const SUBMITTER = "spiffe://leasehold.test/ci/submitter";
const WORKER_ID = "secured-agent-1";

/** The clients the submitter uses, on one mTLS channel each. */
function clientsOf(address: string, credentials: grpc.ChannelCredentials) {
  const leases = createClient(LeaseService, address, credentials);
  const resources = createClient(ResourceService, address, credentials);
  const events = createClient(EventService, address, credentials);
  return {
    leases,
    resources,
    events,
    close() {
      for (const c of [leases, resources, events]) c.close();
    },
  };
}

/**
 * A deployment run for real under mTLS and a deny-by-default policy: a real
 * `leasehold agent` process with its own certificate downloads the input the
 * submitter uploaded (`file.download.input`) and uploads the output the
 * deployment wrote (`file.upload`), and each event names the principal whose
 * call caused it.
 */
describe("deployments under mTLS and a policy", () => {
  let dir: string;
  let workDir: string;
  let t: TestServer;
  let agent: LeaseholdProcess | undefined;
  let submitter: ReturnType<typeof clientsOf>;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-secured-pki-"));
    workDir = mkdtempSync(join(tmpdir(), "leasehold-secured-agent-"));
    const ca = createCa(dir, "ca");
    const serverCert = issueCertificate(ca, { dir, name: "server", ips: ["127.0.0.1"] });
    const agentCert = issueCertificate(ca, { dir, name: "agent", uris: [AGENT], client: true });
    const submitterCert = issueCertificate(ca, { dir, name: "submitter", uris: [SUBMITTER], client: true });
    const policy = join(dir, "policy.yaml");
    writeFileSync(
      policy,
      [
        "bindings:",
        `  - principals: ["${AGENT}"]`,
        "    role: agent",
        `    clusters: [${CLUSTER}]`,
        '    worker_ids: "secured-agent-*"',
        `  - principals: ["${SUBMITTER}"]`,
        "    role: submitter",
        `    clusters: [${CLUSTER}]`,
        "",
      ].join("\n"),
    );
    t = await startTestServer({
      config: {
        tlsCert: serverCert.certFile,
        tlsKey: serverCert.keyFile,
        tlsClientCa: ca.certFile,
        authPolicy: policy,
      },
    });

    submitter = clientsOf(
      t.address,
      grpc.credentials.createSsl(
        readFileSync(ca.certFile),
        readFileSync(submitterCert.keyFile),
        readFileSync(submitterCert.certFile),
      ),
    );

    agent = await runReferenceAgent({
      server: t.address,
      cluster: CLUSTER,
      workerId: WORKER_ID,
      workDir,
      clientFlags: [
        "--tls-ca",
        ca.certFile,
        "--tls-cert",
        agentCert.certFile,
        "--tls-key",
        agentCert.keyFile,
      ],
      // Exactly what the deployment below runs, and the variables it sets.
      allow: [
        "--allow-command",
        `${process.execPath} -e *`,
        "--allow-env",
        "PORT",
        "--allow-env",
        "RESULT_SUFFIX",
      ],
    });
  }, 120_000);

  afterAll(async () => {
    agent?.child.kill("SIGKILL");
    submitter?.close();
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
    rmSync(workDir, { recursive: true, force: true });
  });

  /** Every event of the cluster, oldest first, as the submitter sees them. */
  async function clusterEvents(): Promise<Event[]> {
    const all: Event[] = [];
    let pageToken = "";
    do {
      const page = await submitter.events.listEvents({ cluster: CLUSTER, pageSize: 1000, pageToken });
      all.push(...page.events);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return all;
  }

  it("runs a deployment that reads its input and writes an output, each event naming its principal", async () => {
    const { leases, resources } = submitter;
    const { lease } = await leases.createLease({ runtime: CLUSTER, ttl: { seconds: 600n } });
    const leaseId = lease?.id ?? "";
    expect(lease?.createdBy).toBe(SUBMITTER);
    const input = await resources.createFile({
      leaseId,
      name: "input.txt",
      content: new TextEncoder().encode("measured under mtls"),
    });
    const inputId = input.resource?.id ?? "";

    // Reads its input, writes a result derived from it, and only then listens: ready means the output exists.
    // The probe hangs up at once; a reset connection must not crash the server (unhandled socket error).
    const port = await freePort();
    const script =
      'const fs = require("node:fs"); ' +
      'const text = fs.readFileSync("in/input.txt", "utf8"); ' +
      'fs.writeFileSync("out/result.txt", text.toUpperCase() + process.env.RESULT_SUFFIX); ' +
      'require("node:net").createServer((s) => s.on("error", () => {}).end())' +
      '.listen(Number(process.env.PORT), "127.0.0.1");';
    const { resource: deployment } = await resources.createDeployment({
      leaseId,
      spec: {
        containers: [
          {
            name: "transform",
            command: {
              argv: [process.execPath, "-e", script],
              env: { PORT: String(port), RESULT_SUFFIX: "!" },
            },
          },
        ],
        readinessProbe: { check: { case: "tcpPort", value: port }, period: { nanos: 100_000_000 } },
        outputsDir: "out",
        inputs: [{ fileId: inputId, path: "in/input.txt" }],
      },
    });
    const deploymentId = deployment?.id ?? "";
    const actionId = deployment?.body.case === "deployment" ? deployment.body.value.actionId : "";

    const updates = [];
    for await (const u of leases.waitLease({ leaseId, timeout: { seconds: 120n } })) updates.push(u);
    const last = updates.at(-1);
    expect(last).toMatchObject({ done: true, timedOut: false });
    expect(last?.deployment?.phase, last?.deployment?.message).toBe(DeploymentPhase.READY);

    const { fileIds } = await leases.collectOutputs({ leaseId, timeout: { seconds: 120n } });
    expect(fileIds).toHaveLength(1);
    const outputId = fileIds[0] ?? "";
    const { resource: output } = await resources.getResource({ resourceId: outputId });
    expect(output).toMatchObject({ kind: "file", leaseId });
    expect(output?.body.case === "file" && output.body.value.name).toBe("result.txt");
    const chunks: Uint8Array[] = [];
    for await (const part of resources.downloadFile({ resourceId: outputId })) chunks.push(part.chunk);
    expect(Buffer.concat(chunks).toString("utf8")).toBe("MEASURED UNDER MTLS!");

    const rolled = await leases.rollbackLease({ leaseId });
    expect(rolled.destroyedResources).toBe(3); // input, deployment, output
    expect((await leases.getLease({ leaseId })).lease?.state).toBe(LeaseState.ROLLED_BACK);

    const seen = await clusterEvents();
    const actorOf = (kind: EventKind, test: (e: Event) => boolean = () => true) => {
      const found = seen.filter((e) => e.kind === kind && test(e));
      expect(found, `one ${EventKind[kind]} event`).toHaveLength(1);
      return found[0]?.actor;
    };
    const about = (id: string) => (e: Event) => e.details?.resource_id === id;
    const ofLease = (e: Event) => e.leaseId === leaseId;
    const ofAction = (e: Event) => e.actionId === actionId;
    // The submitter's calls.
    expect(actorOf(EventKind.SCOPE_LEASE_CREATED, ofLease)).toBe(SUBMITTER);
    expect(actorOf(EventKind.RESOURCE_CREATED, about(inputId))).toBe(SUBMITTER);
    expect(actorOf(EventKind.DEPLOYMENT_CREATED, about(deploymentId))).toBe(SUBMITTER);
    expect(actorOf(EventKind.ACTION_SUBMITTED, ofAction)).toBe(SUBMITTER);
    expect(actorOf(EventKind.OUTPUTS_REQUESTED, ofAction)).toBe(SUBMITTER);
    expect(actorOf(EventKind.SCOPE_LEASE_ROLLED_BACK, ofLease)).toBe(SUBMITTER);
    // The agent's: its session, the output it uploaded, and its report of the deployment's action.
    expect(actorOf(EventKind.SESSION_STARTED, (e) => e.workerId === WORKER_ID)).toBe(AGENT);
    expect(actorOf(EventKind.RESOURCE_CREATED, about(outputId))).toBe(AGENT);
    expect(actorOf(EventKind.ACTION_SUCCEEDED, ofAction)).toBe(AGENT);
    // The grant is the server's own decision: no principal caused it.
    expect(actorOf(EventKind.LEASE_GRANTED, (e) => ofAction(e) && e.workerId === WORKER_ID)).toBe("");

    // Nobody was refused: the agent downloaded its input and uploaded its output with its own rights.
    expect(t.logs.filter((l) => String(l.msg).startsWith("refused"))).toEqual([]);
  }, 300_000);
});
