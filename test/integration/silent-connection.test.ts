import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Database, openDatabase } from "../../src/store/database.js";
import { checkOnce } from "../../src/store/database-watch.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { type SilencingProxy, silencingProxy } from "../helpers/silencing-proxy.js";

/**
 * A connection that goes silent (a hung backend, a middlebox that forgot it)
 * while new connections work: the database watch must not wait behind it.
 */
describe.runIf(runsPostgresTests())("the database check after its connection went silent", () => {
  let store: TestStore;
  let proxy: SilencingProxy;
  let database: Database;

  beforeAll(async () => {
    store = await freshPostgresDatabase();
    const target = new URL(store.url as string);
    proxy = await silencingProxy(target.hostname, Number(target.port || 5432));
    target.host = `127.0.0.1:${proxy.port}`;
    database = await openDatabase({ url: target.toString(), dataDir: "" });
  });
  afterAll(async () => {
    proxy?.close();
    await database?.close();
    await store?.drop();
  });

  it("checks on a fresh connection once a check went unanswered", async () => {
    const ping = database.ping as () => Promise<void>;
    expect(await checkOnce(ping, 5000).result).toEqual({ ok: true });
    proxy.silenceOpenConnections();
    // Nothing comes back on the connection the check used.
    expect(await checkOnce(ping, 300).result).toMatchObject({ ok: false, kind: "timeout" });
    // The next check does not queue behind that one: a new connection answers.
    expect(await checkOnce(ping, 5000).result).toEqual({ ok: true });
  });
});
