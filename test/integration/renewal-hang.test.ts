import postgres from "postgres";
import { afterEach, describe, expect, it } from "vitest";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { startTestServer } from "../helpers/server.js";
import { silencingProxy } from "../helpers/silencing-proxy.js";
import { connectWorker } from "../helpers/worker.js";

/** Text of the renewal statement alone (store/queries/renew-sessions.ts), sent when a connection prepares it. */
const RENEWAL_MARKER = "greatest(s.last_heard_at, l.heard)";

/**
 * A renewal whose connection hangs (a SIGSTOPped backend, a middlebox that
 * forgot the connection) while the database itself answers on other
 * connections. It waited for ever: no log line until it ended, health
 * SERVING, acks that said the database answered, and the process's sessions
 * reaped by other processes while their agents stayed on a dead session.
 *
 * Here the proxy in front of PostgreSQL drops everything on the connections
 * that carry the renewal statement, both ways, without closing them: nothing
 * answers, as with a stopped backend; the connections of the pool and the
 * watch's checks go on working. Not covered: a backend that hangs holding row
 * locks on `sessions` (a fresh connection's renewal then skips those rows,
 * lease/renewal.ts), and the time TCP takes to notice a dead peer.
 */
describe.runIf(runsPostgresTests())("a renewal whose connection hangs", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  it("makes the process report its database lost and tell its agents, and renew again on fresh connections, whose first ack says it answers", async () => {
    const store = await freshPostgresDatabase();
    cleanups.push(() => store.drop());
    const url = new URL(store.url as string);
    const proxy = await silencingProxy(url.hostname, Number(url.port || 5432), RENEWAL_MARKER);
    cleanups.push(() => proxy.close());
    url.host = `127.0.0.1:${proxy.port}`;
    // A grace of three intervals, the least allowed: a statement unanswered for 0.75 s hangs.
    const t = await startTestServer({
      store: { ...store, url: url.toString() },
      config: { gracePeriod: "3s", heartbeatInterval: "1s", rebalanceInterval: "0s" },
    });
    cleanups.push(() => t.stop());
    const health = healthClient(t.address);
    cleanups.push(() => health.close());
    const w = await connectWorker(t.address, { workerId: "w1", cluster: "east", capacity: 1 });
    cleanups.push(() => w.drop());
    // The worker heartbeats all along, as an agent does: what the acks say is what it is told.
    let sequence = 1;
    const beat = async () => (await w.heartbeat(sequence++)).databaseUnreachable;
    const poll = { timeout: 25_000, interval: 100 };
    // The renewal's connection has prepared its statement.
    await expect
      .poll(async () => {
        await beat();
        return proxy.carriers();
      }, poll)
      .toBeGreaterThanOrEqual(1);

    proxy.silenceCarriers(true);
    await expect.poll(beat, poll).toBe(true);
    expect(await health.check("")).toBe("NOT_SERVING");
    const index = (start: string) => t.logs.findIndex((l) => String(l.msg).startsWith(start));
    const lost = index("database unreachable: a renewal got no answer");
    expect(lost).toBeGreaterThanOrEqual(0);
    // Not left waiting on the hung connection: each renewal tried again opens a fresh one.
    await expect.poll(async () => ((await beat()) ? proxy.carriers() : -1), poll).toBeGreaterThanOrEqual(3);

    // The renewal stored again answers the last heartbeat again (lease/renewal.ts, reack): that
    // first ack after the outage carries the deadline just stored, and says the database answers.
    const last = BigInt(sequence - 1);
    proxy.silenceCarriers(false);
    const reack = await w.next("heartbeatAck", (a) => a.sequence === last);
    expect(reack.databaseUnreachable).toBe(false);
    await expect.poll(beat, poll).toBe(false);
    expect(await health.check("")).toBe("SERVING");
    expect(index("database reachable again; serving")).toBeGreaterThan(lost);
    // The worker's session lived through it, renewed: no restart was needed.
    const admin = postgres(store.url as string, { max: 1, onnotice: () => {} });
    cleanups.push(() => admin.end());
    const [row] = await admin<{ live: boolean }[]>`
      select deadline > now() and ended_at is null as live from sessions where worker_id = 'w1'`;
    expect(row?.live).toBe(true);
  }, 90_000);
});
