import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it, onTestFinished } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import type { ServerOverrides } from "../../src/server.js";
import { cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { failure } from "../helpers/status.js";

/**
 * A database that refuses new connections (an operator's `allow_connections
 * false`, a database being dropped) fails them with FATAL 55000: an outage,
 * answered UNAVAILABLE, as the health check already took it. It was INTERNAL,
 * and the CLI's watch and follow gave up instead of riding through.
 */
describe.runIf(runsPostgresTests())("a database that refuses connections", () => {
  let store: TestStore;
  let t: TestServer;
  let admin: postgres.Sql;
  let name: string;
  beforeAll(async () => {
    store = await freshPostgresDatabase();
    t = await startTestServer({ store });
    admin = postgres(inject("postgresAdminUrl"), { max: 1, onnotice: () => {} });
    name = new URL(store.url as string).pathname.slice(1);
  });
  afterAll(async () => {
    await admin?.unsafe(`alter database ${name} allow_connections true`);
    await admin?.end();
    await t?.[Symbol.asyncDispose]();
    await store?.drop();
  });

  it("answers calls UNAVAILABLE while it refuses, and serves them again after", async () => {
    const api = t.client(ActionService);
    const id = (await api.submitAction({ cluster: "east" })).action?.id ?? "";
    await admin.unsafe(`alter database ${name} allow_connections false`);
    await admin.unsafe(
      `select pg_terminate_backend(pid) from pg_stat_activity where datname = '${name}' and pid <> pg_backend_pid()`,
    );
    // The pool's connections ended first (CONNECTION_ENDED), then every new one is refused.
    const seen: { code: number; reason: string | undefined }[] = [];
    while (!seen.some((f) => f.reason === "SQLSTATE_55000") && seen.length < 20) {
      const { code, reason } = await failure(api.getAction({ actionId: id }));
      seen.push({ code, reason });
    }
    expect(seen.at(-1)).toEqual({ code: Code.Unavailable, reason: "SQLSTATE_55000" });
    expect(seen.filter((f) => f.code !== Code.Unavailable)).toEqual([]);
    await admin.unsafe(`alter database ${name} allow_connections true`);
    await expect
      .poll(async () => (await api.getAction({ actionId: id }).catch(() => undefined))?.action?.id)
      .toBe(id);
  });
});

/**
 * A database that hangs (a stopped process, a stalled disk) answers nothing:
 * once the health watch has found it unreachable, calls fail at once with
 * UNAVAILABLE instead of waiting for the whole hang, as they do when it
 * refuses connections, and so do the calls it was serving then.
 */
/** A server whose database is behind a proxy that can freeze it; everything is undone when the test ends. */
async function serverBehindProxy(overrides: ServerOverrides = {}) {
  const store = await freshPostgresDatabase();
  const url = new URL(store.url as string);
  const proxy = await cuttableProxy(url.hostname, Number(url.port || 5432));
  url.host = `127.0.0.1:${proxy.port}`;
  const t = await startTestServer({
    store: { ...store, url: url.toString() },
    config: { gracePeriod: "3s", heartbeatInterval: "500ms" },
    overrides,
  });
  const health = healthClient(t.address);
  onTestFinished(async () => {
    health.close();
    proxy.thaw();
    await t[Symbol.asyncDispose]();
    proxy.close();
    await store.drop();
  });
  return { api: t.client(ActionService), health, proxy, t };
}

describe.runIf(runsPostgresTests())("a database that hangs", () => {
  it("answers new calls UNAVAILABLE at once once it is found unreachable, and serves them after", async () => {
    const { api, health, proxy } = await serverBehindProxy();
    const id = (await api.submitAction({ cluster: "east" })).action?.id ?? "";
    proxy.freeze();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("NOT_SERVING");
    const { code, reason } = await failure(
      api.getAction({ actionId: id }, { deadline: new Date(Date.now() + 10_000) }),
    );
    expect({ code, reason }).toEqual({ code: Code.Unavailable, reason: "DATABASE_UNREACHABLE" });
    proxy.thaw();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("SERVING");
    expect((await api.getAction({ actionId: id })).action?.id).toBe(id);
  });

  it("names the latest check's cause in its refusals, not the one it was found unreachable by", async () => {
    const errors: string[] = [];
    let sawError: (() => void) | undefined;
    const { api, health, proxy } = await serverBehindProxy({
      onDatabaseCheck: (check) => {
        if (check.ok || check.kind !== "error") return;
        errors.push(check.cause.message);
        sawError?.();
      },
    });
    const id = (await api.submitAction({ cluster: "east" })).action?.id ?? "";
    proxy.freeze();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("NOT_SERVING");
    const hung = await failure(api.getAction({ actionId: id }, { deadline: new Date(Date.now() + 10_000) }));
    expect(hung.message).toMatch(/^the database cannot be reached \(no answer within /);
    // Then it is gone for good: its connections end and new ones are refused.
    const failedOtherwise = new Promise<void>((resolve) => {
      sawError = resolve;
    });
    proxy.cut();
    await failedOtherwise;
    const gone = await failure(api.getAction({ actionId: id }, { deadline: new Date(Date.now() + 10_000) }));
    expect({ code: gone.code, reason: gone.reason }).toEqual({
      code: Code.Unavailable,
      reason: "DATABASE_UNREACHABLE",
    });
    // What a check since the cut met (another may have run before the call).
    const named = /^the database cannot be reached \((.*)\); retry later$/.exec(gone.message)?.[1];
    expect(errors).toContain(named);
    proxy.thaw();
    proxy.restore();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("SERVING");
  });

  it("answers a call it was serving when the database hangs at once, and a retry finds one action", async () => {
    const { api, health, proxy } = await serverBehindProxy();
    await api.submitAction({ cluster: "east", requestId: "warm" });
    proxy.freeze();
    // Sent at once, it is served before the two failed checks (about a second) find the
    // database unreachable, and waits for the database; the deadline outlasts any test. On a
    // machine slow enough for the checks to come first, it is refused as new calls are.
    const answer = await failure(
      api.submitAction({ cluster: "east", requestId: "r-1" }, { deadline: new Date(Date.now() + 120_000) }),
    );
    expect(answer.code).toBe(Code.Unavailable);
    expect(["OUTCOME_UNKNOWN", "DATABASE_UNREACHABLE"]).toContain(answer.reason);
    expect(await health.check("")).toBe("NOT_SERVING");
    proxy.thaw();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("SERVING");
    // Whether or not the first try committed, the retry leaves one action for the request.
    const retried = (await api.submitAction({ cluster: "east", requestId: "r-1" })).action?.id ?? "";
    const again = (await api.submitAction({ cluster: "east", requestId: "r-1" })).action?.id;
    expect(again).toBe(retried);
    const listed = await api.listActions({ cluster: "east" });
    expect(listed.actions.filter((a) => a.requestId === "r-1").map((a) => a.id)).toEqual([retried]);
  });

  it("serves /metrics while it hangs, the gauges read from it NaN and database_up 0", async () => {
    const { api, health, proxy, t } = await serverBehindProxy();
    await api.submitAction({ cluster: "east" });
    const scrape = async () => {
      const response = await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`);
      return { status: response.status, text: await response.text() };
    };
    expect((await scrape()).text).toMatch(/^leasehold_actions\{cluster="east",state="QUEUED"\} 1$/m);
    expect((await scrape()).text).toMatch(/^leasehold_database_up 1$/m);
    proxy.freeze();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("NOT_SERVING");
    const during = await scrape();
    expect(during.status).toBe(200);
    expect(during.text).toMatch(/^leasehold_sessions_in_grace nan$/im);
    expect(during.text).toMatch(/^leasehold_clusters_expiries_paused nan$/im);
    expect(during.text).not.toMatch(/^leasehold_actions\{/m);
    expect(during.text).toMatch(/^leasehold_connected_workers 0$/m);
    expect(during.text).toMatch(/^leasehold_database_up 0$/m);
    expect(during.text).toMatch(/^grpc_server_started_total\{/m);
    proxy.thaw();
    await expect
      .poll(async () => (await scrape()).text, { timeout: 15_000 })
      .toMatch(/^leasehold_sessions_in_grace 0$/m);
    await expect
      .poll(async () => (await scrape()).text, { timeout: 15_000 })
      .toMatch(/^leasehold_database_up 1$/m);
  });
});
