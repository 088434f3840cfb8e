import { sql } from "drizzle-orm";
import { describe, expect, it } from "vitest";
import { databaseClock as clock } from "../../src/store/clock.js";
import { reapSessions } from "../../src/store/queries/reap-sessions.js";
import { queryRows } from "../../src/store/rows.js";
import { useSessionsDatabase } from "../helpers/sessions.js";

/**
 * A session whose deadline passed while its stream was on a server process
 * that had stopped marking itself alive (it lost its database, hung or died)
 * is reaped all the same, but its events say its server went silent, not the
 * worker: cause server_silent, with the server and when its mark ran out.
 */
describe("reaping the session of a silent server process", () => {
  const database = useSessionsDatabase();

  /** A LEASED action held by session `id` (of worker w-<id>) at epoch 1. */
  const lease = async (id: string) => {
    await database.db.execute(sql`insert into actions (id, cluster, max_attempts, initial_backoff_ms,
        backoff_multiplier, max_backoff_ms, max_system_retries, state, epoch, session_id, worker_id)
      values (${`a-${id}`}, 'east', 3, 1000, 2, 60000, 3, 'LEASED', 1, ${id}, ${`w-${id}`})`);
    await database.db.execute(sql`insert into attempts (action_id, epoch, worker_id, session_id, outcome)
      values (${`a-${id}`}, 1, ${`w-${id}`}, ${id}, 'RUNNING')`);
  };
  const detailsOf = async (kind: string, sessionId: string) =>
    (
      await queryRows<{ details: Record<string, unknown>; message: string }>(
        database.db,
        sql`select details, message from events where kind = ${kind} and session_id = ${sessionId}`,
      )
    )[0];

  it("records cause server_silent for a session whose server's mark ran out, and deadline for the others", async () => {
    const { db } = database;
    // this-server (every helper session's) last marked itself alive long enough ago that its
    // mark ran out 2 s ago; other-server's mark is current.
    await db.execute(sql`insert into server_processes (id, application_name, alive_until) values
      ('this-server', 'leasehold-this', now() - interval '2 seconds'),
      ('other-server', 'leasehold-other', now() + interval '5 seconds')`);
    await database.session("on-silent", -1);
    await database.session("on-live", -1);
    await database.session("lost-stream", -1);
    await db.execute(sql`update sessions set server_id = 'other-server' where id = 'on-live'`);
    // A stream recorded lost: the worker left its server, whatever became of that server.
    await db.execute(
      sql`update sessions set stream_lost_at = now() - interval '5 seconds' where id = 'lost-stream'`,
    );
    for (const id of ["on-silent", "on-live", "lost-stream"]) await lease(id);

    const result = await reapSessions(db, clock, { limit: 10, partitionShare: 1, maxSilenceMs: 600_000 });

    const silent = result.expired.find((e) => e.sessionId === "on-silent");
    expect(silent?.silentServer?.serverId).toBe("this-server");
    expect(result.sessions.find((s) => s.sessionId === "on-silent")?.silentServer?.serverId).toBe(
      "this-server",
    );
    for (const id of ["on-live", "lost-stream"]) {
      expect(result.expired.find((e) => e.sessionId === id)?.silentServer).toBeUndefined();
      expect((await detailsOf("session_reaped", id))?.details).toEqual({ cause: "deadline" });
      expect((await detailsOf("lease_expired", id))?.details).toEqual({ cause: "deadline", state: "QUEUED" });
    }
    const reaped = await detailsOf("session_reaped", "on-silent");
    expect(reaped?.details).toMatchObject({ cause: "server_silent", server_id: "this-server" });
    const until = new Date(String(reaped?.details.server_alive_until));
    expect(until.getTime()).toBe(silent?.silentServer?.aliveUntil.getTime());
    expect(reaped?.message).toBe(
      `session of worker w-on-silent reaped at its deadline: its server process this-server stopped renewing it (its liveness mark ran out at ${until.toISOString()}: it lost its database, hung or died) while the worker was connected to it`,
    );
    const expired = await detailsOf("lease_expired", "on-silent");
    expect(expired?.details).toMatchObject({
      cause: "server_silent",
      server_id: "this-server",
      state: "QUEUED",
    });
    // The documented line stays as it was.
    expect(expired?.message).toBe(
      "lease expired for action a-on-silent (worker w-on-silent, cluster east, epoch 1)",
    );
  });
});
