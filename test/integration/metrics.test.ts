import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { createFakeClock } from "../../src/store/clock.js";
import { buildCommit, packageVersion } from "../../src/version.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

/**
 * What an operator sees: in Prometheus: the calls by method and code, the
 * submissions, the reports and their answers, and the queue by cluster; in
 * the log at debug level, every grant, report answer and revoke.
 */
describe("the metrics", () => {
  let t: TestServer;
  let workers: TestWorker[];

  beforeEach(async () => {
    workers = [];
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s" },
      overrides: { clock: createFakeClock(), timers: false },
    });
  });
  afterEach(async () => {
    for (const w of workers) w.drop();
    await t[Symbol.asyncDispose]();
  });

  const scrape = async () => (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();
  /** The value of one sample, by its name and labels as Prometheus prints them; undefined when absent. */
  const sample = (text: string, series: string) => {
    const line = text.split("\n").find((l) => l.startsWith(`${series} `));
    return line === undefined ? undefined : Number(line.slice(series.length + 1));
  };
  const api = () => t.client(ActionService);
  const worker = async (workerId: string, capacity: number) => {
    const w = await connectWorker(t.address, { workerId, cluster: "east", capacity });
    workers.push(w);
    return w;
  };

  it("says which build runs: leasehold_build_info and the serving line, with the commit it was built from", async () => {
    // From src/ (vitest) the commit is the checkout's: its short hash, -dirty with local changes.
    const commit = buildCommit();
    expect(commit).toMatch(/^[0-9a-f]{7,}(-dirty)?$/);
    expect(
      sample(await scrape(), `leasehold_build_info{version="${packageVersion()}",commit="${commit}"}`),
    ).toBe(1);
    expect(t.logs.find((l) => l.msg === "leasehold serving")).toMatchObject({
      version: packageVersion(),
      commit,
    });
  });

  it("counts calls by method and status code, and unary calls' durations", async () => {
    await api().submitAction({ cluster: "east" });
    await expectStatus(api().getAction({ actionId: "no-such-action" }), Code.NotFound, /no-such-action/);
    await expectStatus(api().submitAction({ cluster: "" }), Code.InvalidArgument, /cluster/);
    const w = await worker("w1", 1);
    w.drop();
    await w.ended;
    const labels = (method: string, type = "unary") =>
      `grpc_type="${type}",grpc_service="leasehold.v1.${method.includes("Connect") ? "WorkerService" : "ActionService"}",grpc_method="${method}"`;
    // The stream's end is counted when its handler returns, a moment after the client saw it
    // (the test's timeout bounds the wait).
    const streamEnded = `grpc_server_handled_total{${labels("Connect", "bidi_stream")},grpc_code="Canceled"} 1`;
    let text = await scrape();
    while (!text.includes(streamEnded)) text = await scrape();
    expect(sample(text, `grpc_server_started_total{${labels("SubmitAction")}}`)).toBe(2);
    expect(sample(text, `grpc_server_handled_total{${labels("SubmitAction")},grpc_code="OK"}`)).toBe(1);
    expect(
      sample(text, `grpc_server_handled_total{${labels("SubmitAction")},grpc_code="InvalidArgument"}`),
    ).toBe(1);
    expect(sample(text, `grpc_server_handled_total{${labels("GetAction")},grpc_code="NotFound"}`)).toBe(1);
    expect(sample(text, `grpc_server_handling_seconds_count{${labels("SubmitAction")}}`)).toBe(2);
    expect(sample(text, `grpc_server_started_total{${labels("Connect", "bidi_stream")}}`)).toBe(1);
    expect(
      sample(text, `grpc_server_handled_total{${labels("Connect", "bidi_stream")},grpc_code="Canceled"}`),
    ).toBe(1);
    // Streams have no duration histogram: a stream's lifetime is not a latency.
    expect(text).not.toContain('grpc_server_handling_seconds_count{grpc_type="bidi_stream"');
  });

  it("counts submissions, reports by kind and answer, and the queue by cluster", async () => {
    await api().submitAction({ cluster: "east", requestId: "r1" });
    await api().submitAction({ cluster: "east", requestId: "r1" });
    await api().submitActions({
      actions: [
        { cluster: "east", requestId: "r1" },
        { cluster: "east", requestId: "r2" },
        { cluster: "west", requestId: "r3" },
      ],
    });
    let text = await scrape();
    expect(sample(text, 'leasehold_actions_submitted_total{result="created"}')).toBe(3);
    expect(sample(text, 'leasehold_actions_submitted_total{result="existing"}')).toBe(2);
    expect(sample(text, 'leasehold_actions{cluster="east",state="QUEUED"}')).toBe(2);
    expect(sample(text, 'leasehold_actions{cluster="west",state="QUEUED"}')).toBe(1);
    expect(sample(text, 'leasehold_actions{cluster="east",state="LEASED"}')).toBe(0);

    const w = await worker("w1", 2);
    await t.server.leases.tick.dispatch();
    const first = await w.next("grant");
    const second = await w.next("grant");
    text = await scrape();
    expect(sample(text, 'leasehold_actions{cluster="east",state="QUEUED"}')).toBe(0);
    expect(sample(text, 'leasehold_actions{cluster="east",state="LEASED"}')).toBe(2);

    expect((await w.complete(first, { output: {} })).accepted).toBe(true);
    expect((await w.complete(second, { error: "disk full", retryable: false })).accepted).toBe(true);
    // Fenced: the lease is over.
    expect((await w.release(first)).accepted).toBe(false);
    text = await scrape();
    expect(sample(text, 'leasehold_reports_total{kind="succeeded",result="accepted"}')).toBe(1);
    expect(sample(text, 'leasehold_reports_total{kind="failed",result="accepted"}')).toBe(1);
    expect(sample(text, 'leasehold_reports_total{kind="released",result="fenced"}')).toBe(1);
    // A cluster with nothing queued or leased is not listed.
    expect(sample(text, 'leasehold_actions{cluster="east",state="QUEUED"}')).toBeUndefined();
    expect(sample(text, 'leasehold_actions{cluster="west",state="QUEUED"}')).toBe(1);
  });

  it("logs every grant, report answer and revoke at debug level", async () => {
    await t[Symbol.asyncDispose]();
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s", logLevel: "debug" },
      overrides: { clock: createFakeClock(), timers: false },
    });
    const id = (await api().submitAction({ cluster: "east" })).action?.id ?? "";
    const cancelled = (await api().submitAction({ cluster: "east" })).action?.id ?? "";
    const w = await worker("w1", 2);
    await t.server.leases.tick.dispatch();
    const grant = await w.next("grant", (g) => g.actionId === id);
    await w.next("grant", (g) => g.actionId === cancelled);
    await api().cancelAction({ actionId: cancelled, reason: "not needed" });
    await w.next("revoke");
    await w.complete(grant, { output: {} });
    await w.release(grant);
    const lines = t.logs.filter((l) => l.level === 20);
    expect(lines).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ msg: "lease granted", actionId: id, epoch: 1, attempt: 1, workerId: "w1" }),
        expect.objectContaining({
          msg: "report accepted: action is now SUCCEEDED",
          actionId: id,
          workerId: "w1",
        }),
        expect.objectContaining({
          msg: expect.stringMatching(/^report fenced: release for action/),
          actionId: id,
        }),
        expect.objectContaining({
          msg: expect.stringMatching(/^revoke sent: .*not needed/),
          actionId: cancelled,
          reason: "CANCELLED",
        }),
      ]),
    );
  });
});
