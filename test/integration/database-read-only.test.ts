import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { startTestServer, type TestServer, waitForLog } from "../helpers/server.js";
import { failure } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

/**
 * A database that answers but refuses writes (SQLSTATE 25006: a hot standby,
 * a primary demoted under the servers, `default_transaction_read_only` on) is
 * a database this server has lost (SPEC §5): calls are refused UNAVAILABLE
 * with reason DATABASE_UNREACHABLE (nothing was done, another server may
 * take them), health is NOT_SERVING, `leasehold_database_up` 0, and heartbeat
 * acks say database_unreachable, so agents move to another server. It was
 * INTERNAL, SERVING and 1. PostgreSQL only: PGlite is never read-only.
 *
 * The database is made read-only for new connections (`alter database … set
 * default_transaction_read_only`) and the server's connections are ended, so
 * that the pool, the renewal and the watch reconnect to a read-only database.
 */
describe.runIf(runsPostgresTests())("a database that refuses writes", () => {
  let store: TestStore;
  let t: TestServer;
  let admin: postgres.Sql;
  let name: string;
  let w: TestWorker | undefined;
  const setReadOnly = async (on: boolean) => {
    await admin.unsafe(
      on
        ? `alter database ${name} set default_transaction_read_only = on`
        : `alter database ${name} reset default_transaction_read_only`,
    );
    await admin.unsafe(
      `select pg_terminate_backend(pid) from pg_stat_activity where datname = '${name}' and pid <> pg_backend_pid()`,
    );
  };
  const scrape = async () =>
    (await (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text()).match(
      /^leasehold_database_up (\d)$/m,
    )?.[1];

  beforeAll(async () => {
    store = await freshPostgresDatabase();
    t = await startTestServer({ store, config: { gracePeriod: "10s", heartbeatInterval: "500ms" } });
    admin = postgres(inject("postgresAdminUrl"), { max: 1, onnotice: () => {} });
    name = new URL(store.url as string).pathname.slice(1);
  });
  afterAll(async () => {
    w?.drop();
    await admin?.unsafe(`alter database ${name} reset default_transaction_read_only`);
    await admin?.end();
    await t?.[Symbol.asyncDispose]();
    await store?.drop();
  });

  it("is answered UNAVAILABLE DATABASE_UNREACHABLE, NOT_SERVING, database_up 0 and unreachable acks, until it takes writes again", async () => {
    const api = t.client(ActionService);
    const health = healthClient(t.address);
    try {
      await api.submitAction({ cluster: "east", requestId: "before" });
      w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
      expect((await w.heartbeat(1)).databaseUnreachable).toBe(false);
      expect(await scrape()).toBe("1");

      await setReadOnly(true);
      // The pool's connections ended first (CONNECTION_ENDED), then the new ones refuse writes.
      const seen: { code: number; reason: string | undefined; message: string }[] = [];
      while (!seen.some((f) => f.reason === "DATABASE_UNREACHABLE") && seen.length < 50) {
        const { code, reason, message } = await failure(
          api.submitAction({ cluster: "east", requestId: `ro-${seen.length}` }),
        );
        seen.push({ code, reason, message });
      }
      expect(seen.filter((f) => f.code !== Code.Unavailable)).toEqual([]);
      expect(seen.at(-1)).toMatchObject({ code: Code.Unavailable, reason: "DATABASE_UNREACHABLE" });
      expect(seen.at(-1)?.message).toMatch(/refuses writes/);

      // The watch sees it too: the database answers its checks, but cannot write.
      await waitForLog(t.logs, (l) => String(l.msg).startsWith("database unreachable"));
      expect(await health.check("")).toBe("NOT_SERVING");
      expect(await scrape()).toBe("0");
      let sequence = 2;
      let ack = await w.heartbeat(sequence++);
      // An ack between the watch's verdict and the first renewal failed after it may say otherwise.
      while (!ack.databaseUnreachable && sequence < 100) ack = await w.heartbeat(sequence++);
      expect(ack.databaseUnreachable).toBe(true);

      await setReadOnly(false);
      await expect.poll(() => health.check(""), { timeout: 20_000 }).toBe("SERVING");
      await expect.poll(scrape, { timeout: 20_000 }).toBe("1");
      const after = await api.submitAction({ cluster: "east", requestId: "after" });
      expect(after.action?.id).toBeTruthy();
    } finally {
      health.close();
    }
  });
});
