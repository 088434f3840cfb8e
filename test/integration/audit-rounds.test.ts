import { sql } from "drizzle-orm";
import { describe, expect, it } from "vitest";
import { AUDIT_LEASES_PER_ROUND, createAudit } from "../../src/work/lease/audit.js";
import type { Hosted, HostedSessions } from "../../src/work/lease/hosted.js";
import { useFreshDatabase } from "../helpers/database.js";

/**
 * The audit compares what the hosted streams hold with the database. With
 * many leases each round checks a slice, those checked least recently first,
 * so that every lease is checked within a few rounds and no round sends them all.
 */
describe("lease audit rounds", () => {
  const database = useFreshDatabase();

  it("checks a bounded slice of the leases each round, least recently checked first", async () => {
    // Three sessions holding leases the database has never heard of: each is found ended when checked.
    const perSession = Math.ceil((AUDIT_LEASES_PER_ROUND * 2) / 3);
    const session = (id: string) => ({
      sessionId: id,
      workerId: `worker-${id}`,
      ended: false,
      draining: false,
      noticed: new Set<string>(),
      held: new Map(Array.from({ length: perSession }, (_, i) => [`${id}-action-${i}`, 1])),
      link: { send() {} },
    });
    const sessions = ["s1", "s2", "s3"].map(session);
    const hosted = {
      values: () => sessions.values(),
      get: (id: string) => sessions.find((s) => s.sessionId === id),
    } as unknown as HostedSessions & { values(): IterableIterator<Hosted> };
    const revoked: string[] = [];
    const audit = createAudit({
      db: database.current.db,
      hosted,
      revoke: (sessionId, token, reason, _message, ended) => {
        expect([reason, ended]).toEqual(["SUPERSEDED", true]);
        revoked.push(`${sessionId}/${token.actionId}`);
      },
      reporting: () => false,
    });
    const sessionsOf = (names: string[]) => [...new Set(names.map((n) => n.split("/")[0]))];

    await audit();
    // Whole sessions, until the round reached its bound: two of the three.
    expect(sessionsOf(revoked)).toEqual(["s1", "s2"]);
    expect(revoked.length).toBe(2 * perSession);
    revoked.length = 0;
    await audit();
    // Then the one never checked, then the first of those checked least recently.
    expect(sessionsOf(revoked)).toEqual(["s3", "s1"]);
    revoked.length = 0;
    await audit();
    // s2, then the first of the two checked in the last round.
    expect(sessionsOf(revoked)).toEqual(["s2", "s1"]);
    // Sessions come and go between rounds: a new one goes first, then the least recently checked.
    (sessions[1] as { ended: boolean }).ended = true;
    sessions.push(session("s4"));
    revoked.length = 0;
    await audit();
    expect(sessionsOf(revoked)).toEqual(["s4", "s3"]);
  });

  it("catches up on drains and undrains whose notice was lost, unless the stream's drain changed meanwhile", async () => {
    const { db } = database.current;
    await db.execute(sql`insert into workers (worker_id, cluster, capacity, draining, drain_reason) values
      ('drained', 'east', 1, true, 'maintenance'), ('undrained', 'east', 1, false, ''),
      ('changed', 'east', 1, false, '')`);
    const session = (workerId: string, draining: boolean) => ({
      sessionId: `session-${workerId}`,
      workerId,
      ended: false,
      draining,
      drainChanges: 0,
      noticed: new Set<string>(),
      held: new Map<string, number>(),
      link: { send() {} },
    });
    // Each one's notice was lost: the first was drained, the others undrained, elsewhere.
    const sessions = [session("drained", false), session("undrained", true), session("changed", true)];
    const calls: string[] = [];
    const hosted = {
      values: () => sessions.values(),
      get: (id: string) => sessions.find((s) => s.sessionId === id),
      drain: (s: Hosted, reason: string) => calls.push(`drain ${s.workerId}: ${reason}`),
      undrain: (s: Hosted) => calls.push(`undrain ${s.workerId}`),
    } as unknown as HostedSessions & { values(): IterableIterator<Hosted> };
    const audit = createAudit({ db, hosted, revoke: () => {}, reporting: () => false });
    const round = audit();
    // A drain of "changed" comes in while the audit's statement runs: newer than what it reads.
    (sessions[2] as { drainChanges: number }).drainChanges += 1;
    await round;
    expect(calls).toEqual(["drain drained: maintenance", "undrain undrained"]);
  });

  it("does not revoke a lease whose completion this process is applying: its commit is no end elsewhere", async () => {
    // Both actions are unknown to the database, as an action whose completion committed while
    // the audit's statement ran is ended there; the completion of a-1 is still being answered.
    const s = {
      sessionId: "s",
      workerId: "w",
      ended: false,
      draining: false,
      drainChanges: 0,
      noticed: new Set<string>(),
      held: new Map([
        ["a-1", 1],
        ["a-2", 1],
      ]),
      link: { send() {} },
    };
    const hosted = {
      values: () => [s].values(),
      get: (id: string) => (id === "s" ? s : undefined),
    } as unknown as HostedSessions & { values(): IterableIterator<Hosted> };
    const revoked: string[] = [];
    const audit = createAudit({
      db: database.current.db,
      hosted,
      revoke: (_sessionId, token) => revoked.push(token.actionId),
      reporting: (actionId) => actionId === "a-1",
    });
    await audit();
    expect(revoked).toEqual(["a-2"]);
  });

  it("tells a stream its lease expired (EXPIRED) when its session was reaped elsewhere, and SUPERSEDED when the lease ended otherwise", async () => {
    const { db } = database.current;
    // Both leases were this session's at epoch 1. expired-1 expired with the session (another
    // process reaped it while this one could not renew it) and is queued again; released-1 was
    // released and granted to another session at epoch 2.
    await db.execute(sql`insert into actions (id, cluster, max_attempts, initial_backoff_ms, backoff_multiplier,
        max_backoff_ms, max_system_retries, state, epoch) values
      ('expired-1', 'east', 3, 1000, 2, 60000, 3, 'QUEUED', 1),
      ('released-1', 'east', 3, 1000, 2, 60000, 3, 'LEASED', 2)`);
    await db.execute(sql`insert into attempts (action_id, epoch, worker_id, session_id, outcome) values
      ('expired-1', 1, 'a4', 'reaped-session', 'LEASE_EXPIRED'),
      ('released-1', 1, 'a4', 'reaped-session', 'RELEASED'),
      ('released-1', 2, 'other', 'other-session', 'RUNNING')`);
    const s = {
      sessionId: "reaped-session",
      workerId: "a4",
      ended: false,
      draining: false,
      drainChanges: 0,
      noticed: new Set<string>(),
      held: new Map([
        ["expired-1", 1],
        ["released-1", 1],
      ]),
      link: { send() {} },
    };
    const hosted = {
      values: () => [s].values(),
      get: (id: string) => (id === s.sessionId ? s : undefined),
    } as unknown as HostedSessions & { values(): IterableIterator<Hosted> };
    const revokes: string[] = [];
    const audit = createAudit({
      db,
      hosted,
      revoke: (_sessionId, token, reason, message, ended) =>
        revokes.push(`${token.actionId} ${reason} ${ended}: ${message}`),
      reporting: () => false,
    });
    await audit();
    expect(revokes.sort()).toEqual([
      "expired-1 EXPIRED true: this lease expired with its session, which was reaped (the action is QUEUED)",
      "released-1 SUPERSEDED true: this lease ended on the server (the action is LEASED)",
    ]);
  });
});
