import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
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
