import { createServer, type IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import * as grpc from "@grpc/grpc-js";
import { trace } from "@opentelemetry/api";
import {
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
  TracerProvider,
} from "@opentelemetry/sdk-trace";
import { afterAll, describe, expect, it, vi } from "vitest";
import { createAgent } from "../../src/agent/index.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { tracingWith } from "../../src/telemetry.js";
import { packageVersion } from "../../src/version.js";
import { runLeasehold } from "../helpers/process.js";
import { startTestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

const CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN = "00f067aa0ba902b7";

function traced(): grpc.Metadata {
  const metadata = new grpc.Metadata();
  metadata.set("traceparent", `00-${CLIENT_TRACE}-${CLIENT_SPAN}-01`);
  return metadata;
}

const parentOf = (s: ReadableSpan) => s.parentSpanContext?.spanId;

describe("tracing", () => {
  // The agent's spans go to the process's global provider, as an application's would.
  const agentSpans = new InMemorySpanExporter();
  trace.setGlobalTracerProvider(
    new TracerProvider({ spanProcessors: [new SimpleSpanProcessor({ exporter: agentSpans })] }),
  );
  afterAll(() => trace.disable());

  it("links submit, grant, the agent's handler and the completion in the caller's trace", async () => {
    const serverSpans = new InMemorySpanExporter();
    const provider = new TracerProvider({
      spanProcessors: [new SimpleSpanProcessor({ exporter: serverSpans })],
    });
    await using t = await startTestServer({ overrides: { tracing: tracingWith(provider) } });
    const seen: (string | undefined)[] = [];
    const agent = createAgent({
      address: t.address,
      cluster: "traced",
      workerId: "traced-1",
      handler: async (ctx) => {
        seen.push(ctx.traceParent);
        ctx.progress("working");
        // Progress and completion are committed separately: a completion that got there first
        // would leave the progress nothing to be accepted for. Finish once the phase is recorded.
        const api = t.client(ActionService);
        await vi.waitFor(async () =>
          expect((await api.getAction({ actionId: ctx.actionId })).action?.phase).toBe("working"),
        );
        return { ok: true };
      },
    });
    let id = "";
    try {
      const api = t.client(ActionService);
      const { action } = await api.submitAction({ cluster: "traced" }, { metadata: traced() });
      id = action?.id ?? "";
      for await (const { action: now } of api.watchAction({ actionId: id })) {
        if (now?.state === ActionState.SUCCEEDED) break;
      }
    } finally {
      await agent.close();
    }
    const byName = (name: string) => serverSpans.getFinishedSpans().find((s) => s.name === name);
    const submit = byName("leasehold.submit");
    const grant = byName("leasehold.grant");
    const report = byName("leasehold.report.completion");
    await vi.waitFor(() => expect(byName("leasehold.report.progress")).toBeDefined());
    const progress = byName("leasehold.report.progress");
    const handle = agentSpans.getFinishedSpans().find((s) => s.name === "leasehold.handle");
    for (const span of [submit, grant, report, progress, handle])
      expect(span?.spanContext().traceId).toBe(CLIENT_TRACE);
    expect(parentOf(submit as ReadableSpan)).toBe(CLIENT_SPAN);
    expect(parentOf(grant as ReadableSpan)).toBe(submit?.spanContext().spanId);
    expect(parentOf(handle as ReadableSpan)).toBe(grant?.spanContext().spanId);
    expect(parentOf(report as ReadableSpan)).toBe(handle?.spanContext().spanId);
    expect(parentOf(progress as ReadableSpan)).toBe(grant?.spanContext().spanId);
    expect(progress?.attributes).toMatchObject({ "leasehold.phase": "working", "leasehold.accepted": true });
    expect(grant?.attributes).toMatchObject({ "leasehold.epoch": 1, "leasehold.worker_id": "traced-1" });
    // The submit span names what it made (or found: created false for a request id used before) and who asked.
    expect(submit?.attributes).toMatchObject({
      "leasehold.cluster": "traced",
      "leasehold.action_id": id,
      "leasehold.created": true,
      "leasehold.principal": expect.any(String),
    });
    expect(report?.attributes).toMatchObject({ "leasehold.accepted": true, "leasehold.result": "SUCCEEDED" });
    expect(seen).toEqual([`00-${CLIENT_TRACE}-${handle?.spanContext().spanId}-01`]);
  });

  it("is off by default: a traced call leaves no trace context on the grant", async () => {
    await using t = await startTestServer();
    const w = await connectWorker(t.address, { workerId: "untraced-1", cluster: "untraced", capacity: 1 });
    const { action } = await t
      .client(ActionService)
      .submitAction({ cluster: "untraced" }, { metadata: traced() });
    const grant = await w.next("grant", (g) => g.actionId === action?.id);
    expect(grant.traceParent).toBe("");
    w.goodbye();
  });

  it("serve --otlp-endpoint exports the spans over OTLP/HTTP", async () => {
    const posts: { url: string; body: string }[] = [];
    let arrived: () => void = () => {};
    const received = new Promise<void>((resolve) => {
      arrived = resolve;
    });
    const collector = createServer((req: IncomingMessage, res) => {
      let body = "";
      req.on("data", (chunk: Buffer) => {
        body += chunk.toString("utf8");
      });
      req.on("end", () => {
        posts.push({ url: req.url ?? "", body });
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
        if (body.includes("leasehold.submit")) arrived();
      });
    });
    await new Promise<void>((resolve) => collector.listen(0, "127.0.0.1", resolve));
    // The collector's base URL, as OTEL_EXPORTER_OTLP_ENDPOINT has it: spans go to /v1/traces.
    const endpoint = `http://127.0.0.1:${(collector.address() as AddressInfo).port}`;
    const server = runLeasehold(
      [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--data-dir",
        "memory://",
        "--otlp-endpoint",
        endpoint,
      ],
      undefined,
    );
    try {
      const serving = await server.waitForLog((l) => l.msg === "leasehold serving");
      const api = createClient(ActionService, `127.0.0.1:${serving.port}`);
      await api.submitAction({ cluster: "exported" }, { metadata: traced() });
      api.close();
      // The batch goes out within the exporter's delay, or at the latest when the server stops.
      server.child.kill("SIGTERM");
      await received;
      const post = posts.find((p) => p.body.includes("leasehold.submit"));
      expect(post?.url).toBe("/v1/traces");
      expect(post?.body).toContain(CLIENT_TRACE);
      expect(post?.body).toContain('"leasehold"'); // service.name
      // The resource names the process (the serverId of its log lines) and its version.
      expect(post?.body).toContain(`"service.instance.id","value":{"stringValue":"${serving.serverId}"}`);
      expect(post?.body).toContain(`"service.version","value":{"stringValue":"${packageVersion()}"}`);
      expect(await server.exited).toBe(0);
    } finally {
      server.child.kill("SIGKILL");
      collector.close();
    }
  }, 60_000);
});
