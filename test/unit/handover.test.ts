import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { createHandover } from "../../src/work/lease/handover.js";
import type { Hosted, HostedSessions } from "../../src/work/lease/hosted.js";
import type { WorkerMessage } from "../../src/work/worker-messages.js";

type Sent = { type: string; sequence?: bigint; remainingMs?: number };

/** A hosted stream as the handover sees it: what it was sent, and a stored deadline `leftMs` away. */
function stream(leftMs: number) {
  const sent: Sent[] = [];
  const s = {
    ended: false,
    deadlineMs: performance.now() + leftMs,
    dbOffsetMs: 0,
    link: { send: (m: WorkerMessage | Sent) => sent.push(m as Sent) },
  } as unknown as Hosted;
  return { s, sent };
}

function handover(streams: Hosted[], renewNow: (streams: readonly Hosted[]) => Promise<void>) {
  return createHandover({
    log: pino({ level: "silent" }),
    hosted: { values: () => streams.values() } as unknown as HostedSessions,
    renewal: { renewNow },
    databaseUnreachable: () => false,
    heartbeatAckSeconds: { observe: () => {} },
  });
}

const GRACE_MS = 10_000;
/** A renewal that stores last heard + grace for every stream, after `ms`. */
const renewAfter = (ms: number) => async (streams: readonly Hosted[]) => {
  await new Promise((resolve) => setTimeout(resolve, ms));
  for (const s of streams) s.deadlineMs = performance.now() + GRACE_MS;
};

describe("the handover of a closing process", () => {
  it("answers each stream's next heartbeat after its renewal, with the deadline stored afresh", async () => {
    const a = stream(3_000);
    const b = stream(3_000);
    const h = handover([a.s, b.s], renewAfter(5));
    const done = h.run(60_000);
    expect(h.active()).toBe(true);
    h.heartbeat(a.s, 1n);
    h.heartbeat(b.s, 7n);
    expect(await done).toEqual({ handedOver: 2, streams: 2 });
    expect(h.active()).toBe(false);
    for (const [sent, sequence] of [
      [a.sent, 1n],
      [b.sent, 7n],
    ] as const) {
      expect(sent).toHaveLength(1);
      expect(sent[0]).toMatchObject({ type: "heartbeat_ack", sequence });
      expect(sent[0]?.remainingMs).toBeGreaterThan(GRACE_MS - 1_000);
    }
  });

  it("ends its wait when every stream it waits for has ended, answered or not", async () => {
    const a = stream(3_000);
    const b = stream(3_000);
    const h = handover([a.s, b.s], renewAfter(5));
    const done = h.run(60_000);
    h.heartbeat(a.s, 1n);
    (b.s as { ended: boolean }).ended = true;
    h.ended(b.s);
    expect(await done).toEqual({ handedOver: 1, streams: 2 });
  });

  it("returns while heartbeats keep coming, each answered once, and the later ones as usual", async () => {
    const streams = Array.from({ length: 50 }, () => stream(3_000));
    const h = handover(
      streams.map((x) => x.s),
      renewAfter(2),
    );
    let sequence = 0n;
    // A heartbeat every millisecond, before and after the wait ends, as 10,000 agents would send.
    const beat = setInterval(() => {
      sequence++;
      const x = streams[Number(sequence % 50n)];
      if (x && h.active()) h.heartbeat(x.s, sequence);
    }, 1);
    try {
      const result = await h.run(200);
      expect(result.streams).toBe(50);
    } finally {
      clearInterval(beat);
    }
    const acked = streams.flatMap((x) => x.sent.map((m) => m.sequence));
    expect(new Set(acked).size).toBe(acked.length);
  });

  it("answers the heartbeats it holds with the stored deadline when the renewal does not come back", async () => {
    const a = stream(3_000);
    const h = handover([a.s], () => new Promise<void>(() => {}));
    const done = h.run(300);
    h.heartbeat(a.s, 4n);
    expect(await done).toEqual({ handedOver: 1, streams: 1 });
    expect(a.sent).toHaveLength(1);
    expect(a.sent[0]).toMatchObject({ type: "heartbeat_ack", sequence: 4n });
    expect(a.sent[0]?.remainingMs).toBeLessThanOrEqual(3_000);
  });

  it("hands nothing over without streams or without a wait", async () => {
    const a = stream(3_000);
    expect(await handover([], renewAfter(1)).run(1_000)).toEqual({ handedOver: 0, streams: 0 });
    const h = handover([a.s], renewAfter(1));
    expect(await h.run(0)).toEqual({ handedOver: 0, streams: 1 });
    expect(h.active()).toBe(false);
  });
});
