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
});
