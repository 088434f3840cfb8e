import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { RevokeReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { type OwnPostgres, startOwnPostgres } from "../embedded-postgres.js";
import { freshPostgresDatabase, runsPostgresTests, type TestStore } from "../helpers/database.js";
import { type AgentProcess, type LeaseholdProcess, runLeasehold, runSdkAgent } from "../helpers/process.js";
import { connectWorker } from "../helpers/worker.js";

/** Starts `leasehold serve` processes on one PostgreSQL database and waits until each serves. */
async function startServers(
  databaseUrl: string,
  count: number,
  extra: string[] = [],
): Promise<{ processes: LeaseholdProcess[]; addresses: string[] }> {
  const processes: LeaseholdProcess[] = [];
  // Port 0, read back from the serving line: a port found free beforehand could be taken by a
  // process of another test file before the server listened on it (EADDRINUSE, seen on CI).
  for (let i = 0; i < count; i++) {
    const args = ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", ...extra];
    processes.push(runLeasehold(args, databaseUrl));
  }
  const ready = await Promise.all(processes.map((p) => p.waitForLog((l) => l.msg === "leasehold serving")));
  return { processes, addresses: ready.map((l) => `127.0.0.1:${l.port}`) };
}

const TIMING = ["--grace-period", "6s", "--heartbeat-interval", "1s"];

/** Lines an SDK agent printed about accepted completions, by action id. */
function acceptedCompletions(agents: readonly AgentProcess[]): Map<string, number> {
  const counts = new Map<string, number>();
  for (const agent of agents) {
    for (const line of agent.lines) {
      if (line.type === "finished" && line.outcome === "succeeded" && line.accepted === true) {
        const id = line.actionId as string;
        counts.set(id, (counts.get(id) ?? 0) + 1);
      }
    }
  }
  return counts;
}

/** Where an agent is connected now, from its last connected or disconnected line. */
function where(agent: AgentProcess): string | undefined {
  let at: string | undefined;
  for (const l of agent.lines) {
    if (l.type === "connected") at = l.address as string;
    else if (l.type === "disconnected") at = undefined;
  }
  return at;
}

/** `url` with an `application_name` of its own, as DBAs set to tell clients apart. */
const withApplicationName = (url: string) => `${url}${url.includes("?") ? "&" : "?"}application_name=dba-tag`;

/**
 * Resolves once `test` holds, checked after every line any of the agents
 * prints; after `limitMs` fails saying what it waited for and what the
 * agents said last (the test's own timeout says nothing).
 */
function until(
  agents: readonly AgentProcess[],
  test: () => boolean,
  what: string,
  limitMs = 60_000,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const stop = () => {
      clearTimeout(timer);
      for (const agent of agents) agent.child.stdout?.off("data", later);
    };
    const check = () => {
      if (!test()) return;
      stop();
      resolve();
    };
    // After the line reader's own listener has parsed the chunk.
    const later = () => setImmediate(check);
    const timer = setTimeout(() => {
      stop();
      const recent = agents.map((a) => a.lines.filter((l) => l.type !== "finished").slice(-4));
      reject(
        new Error(
          `still waiting for ${what} after ${limitMs}ms; agents' last events: ${JSON.stringify(recent)}`,
        ),
      );
    }, limitMs);
    for (const agent of agents) agent.child.stdout?.on("data", later);
    check();
  });
}

/** Resolves once every action in `ids` has an accepted completion; fails saying which have none. */
async function allCompleted(
  agents: readonly AgentProcess[],
  ids: readonly string[],
  server: string,
): Promise<void> {
  try {
    await until(
      agents,
      () => {
        const done = acceptedCompletions(agents);
        return ids.every((id) => done.has(id));
      },
      "every action's accepted completion",
    );
  } catch (error) {
    const done = acceptedCompletions(agents);
    const missing = ids.filter((id) => !done.has(id));
    const client = createClient(ActionService, server);
    const states = await Promise.all(
      missing.slice(0, 5).map(async (id) => (await client.getAction({ actionId: id })).action),
    );
    const summary = states.map((a) => ({
      id: a?.id,
      state: a?.state,
      worker: a?.lease?.workerId,
      epoch: String(a?.epoch),
    }));
    throw new Error(
      `${missing.length} actions unfinished, first ones: ${JSON.stringify(summary)}; ${(error as Error).message}`,
    );
  }
}

// Real PostgreSQL, real `leasehold serve` processes; clients and workers talk to different ones.
describe.runIf(runsPostgresTests())("several server processes on one PostgreSQL", () => {
  describe("wake-ups and notices between processes", () => {
    let store: TestStore;
    let servers: Awaited<ReturnType<typeof startServers>>;
    beforeAll(async () => {
      store = await freshPostgresDatabase();
      // A minute between fallback polls: whatever happens within a test came over LISTEN/NOTIFY.
      servers = await startServers(store.url as string, 2, [...TIMING, "--dispatch-poll", "60s"]);
    }, 60_000);
    afterAll(async () => {
      for (const p of servers?.processes ?? []) p.child.kill("SIGKILL");
      await store?.drop();
    });
    const [a, b] = [0, 1];
    const actionsOn = (i: number) => createClient(ActionService, servers.addresses[i] as string);

    it("grants on process B an action submitted on process A at once", async () => {
      const worker = await connectWorker(servers.addresses[b] as string, {
        workerId: "wake-b",
        cluster: "wake",
        capacity: 1,
      });
      const { action } = await actionsOn(a).submitAction({ cluster: "wake", payload: { n: 1 } });
      const grant = await worker.next("grant");
      expect(grant.actionId).toBe(action?.id);
      await worker.complete(grant, { output: {} });
      worker.goodbye();
    });

    it("revokes on B's stream an action cancelled on A", async () => {
      const worker = await connectWorker(servers.addresses[b] as string, {
        workerId: "cancel-b",
        cluster: "cancel",
        capacity: 1,
      });
      const { action } = await actionsOn(a).submitAction({ cluster: "cancel" });
      const grant = await worker.next("grant");
      await actionsOn(a).cancelAction({ actionId: action?.id ?? "", reason: "not needed" });
      const revoke = await worker.next("revoke");
      expect(revoke).toMatchObject({
        actionId: grant.actionId,
        epoch: grant.epoch,
        reason: RevokeReason.CANCELLED,
      });
      await worker.release(grant, "cancelled");
      const { action: after } = await actionsOn(a).getAction({ actionId: grant.actionId });
      expect(after?.state).toBe(ActionState.CANCELLED);
      worker.goodbye();
    });

    it("closes the old stream on A when the worker takes its session over on B", async () => {
      const first = await connectWorker(servers.addresses[a] as string, {
        workerId: "mover",
        cluster: "t",
        capacity: 1,
      });
      const second = await connectWorker(servers.addresses[b] as string, {
        workerId: "mover",
        cluster: "t",
        capacity: 1,
      });
      expect(second.welcome.sessionId).toBe(first.welcome.sessionId);
      const ended = await first.ended;
      // The notice, not the renewal tick's fallback ("... (seen by this process's renewal)"), closed it.
      expect(ended.details).not.toMatch(/seen by this process's renewal/);
      expect(ended).toMatchObject({
        code: Code.Aborted,
        details: expect.stringMatching(/^a newer stream of this worker id took the session over; /),
      });
      second.goodbye();
    });

    it("grants on A at once an action whose lease expired, whichever process reaped it", async () => {
      const holder = await connectWorker(servers.addresses[b] as string, {
        workerId: "expire-b",
        cluster: "expire",
        capacity: 1,
      });
      const { action } = await actionsOn(a).submitAction({ cluster: "expire" });
      const first = await holder.next("grant");
      const taker = await connectWorker(servers.addresses[a] as string, {
        workerId: "expire-a",
        cluster: "expire",
        capacity: 1,
      });
      // The taker stays alive as an agent would; alone, its deadline could pass with the holder's
      // and the safety valve would (rightly) pause both expiries.
      let sequence = 0;
      const beating = setInterval(() => {
        sequence += 1;
        taker.heartbeat(sequence).catch(() => {});
      }, 500);
      try {
        holder.drop();
        // Both reapers wake at the deadline; the one that wins wakes every dispatcher.
        const regrant = await taker.next("grant");
        expect(regrant).toMatchObject({ actionId: action?.id, epoch: first.epoch + 1n });
        await taker.complete(regrant, { output: {} });
      } finally {
        clearInterval(beating);
      }
      taker.goodbye();
    });

    it("drains on B a worker drained through A", async () => {
      const worker = await connectWorker(servers.addresses[b] as string, {
        workerId: "drained",
        cluster: "d",
        capacity: 1,
      });
      await createClient(ClusterService, servers.addresses[a] as string).drainWorker({
        workerId: "drained",
        reason: "maintenance",
      });
      expect(await worker.next("drain")).toMatchObject({ reason: "maintenance" });
      worker.goodbye();
    });

    it("grants on B at once to a worker undrained through A", async () => {
      const worker = await connectWorker(servers.addresses[b] as string, {
        workerId: "undrained",
        cluster: "u",
        capacity: 1,
      });
      const clusters = createClient(ClusterService, servers.addresses[a] as string);
      await clusters.drainWorker({ workerId: "undrained", reason: "maintenance" });
      await worker.next("drain");
      const { action } = await actionsOn(a).submitAction({ cluster: "u" });
      // Drained on B: the action waits.
      await worker.heartbeat(1);
      expect((await actionsOn(a).getAction({ actionId: action?.id ?? "" })).action?.state).toBe(
        ActionState.QUEUED,
      );
      expect(await clusters.undrainWorker({ workerId: "undrained" })).toMatchObject({ drainEnded: true });
      // Polls are a minute apart: the undrain's notice woke B's dispatcher.
      const grant = await worker.next("grant");
      expect(grant.actionId).toBe(action?.id);
      await worker.complete(grant, { output: {} });
      worker.goodbye();
    });
  });

  it("survives kill -9 of a server process: its agents resume elsewhere within grace, every action completes once", async () => {
    await using store = await freshPostgresDatabase();
    const { processes, addresses } = await startServers(store.url as string, 3, TIMING);
    const agents = ["a1", "a2", "a3", "a4"].map((id) => runSdkAgent([addresses.join(","), "fleet", id, "4"]));
    try {
      const firstConnections = await Promise.all(
        agents.map((agent) => agent.waitForLine((l) => l.type === "connected")),
      );
      const actions = createClient(ActionService, addresses[0] as string);
      const ids: string[] = [];
      for (let i = 0; i < 300; i++) {
        const { action } = await actions.submitAction({ cluster: "fleet", payload: { sleepMs: 150 } });
        ids.push(action?.id ?? "");
      }
      // Kill the process most agents are on, a third of the way through.
      const perAddress = new Map<string, number>();
      for (const c of firstConnections)
        perAddress.set(c.address as string, (perAddress.get(c.address as string) ?? 0) + 1);
      const victim = [...perAddress].sort((x, y) => y[1] - x[1])[0]?.[0] as string;
      const survivor = addresses.find((x) => x !== victim) as string;
      await until(agents, () => acceptedCompletions(agents).size >= 100, "a third of the actions");
      const moved = agents.filter((_, i) => firstConnections[i]?.address === victim);
      const victimIndex = addresses.indexOf(victim);
      processes[victimIndex]?.child.kill("SIGKILL");

      // Its agents come back on another process, to the same session.
      for (const agent of moved) {
        const before = firstConnections[agents.indexOf(agent)];
        const after = await agent.waitForLine((l) => l.type === "connected" && l.address !== victim);
        expect(after.sessionId).toBe(before?.sessionId);
      }
      // Every action finishes, each accepted exactly once, and nothing expired.
      const survivorClient = createClient(ActionService, survivor);
      await allCompleted(agents, ids, survivor);
      const counts = acceptedCompletions(agents);
      expect(ids.filter((id) => counts.get(id) !== 1)).toEqual([]);
      const { actions: finished } = await survivorClient.listActions({ cluster: "fleet", pageSize: 1000 });
      expect(finished.filter((x) => x.state !== ActionState.SUCCEEDED)).toEqual([]);
      const expired = await createClient(EventService, survivor).listEvents({
        kind: EventKind.LEASE_EXPIRED,
      });
      expect(expired.events).toEqual([]);
      expect(moved.length).toBeGreaterThan(0);
    } finally {
      for (const agent of agents) agent.child.kill("SIGKILL");
      for (const p of processes) p.child.kill("SIGKILL");
    }
  }, 120_000);

  it("spreads the agents again over a process restarted after the others; their sessions resume, nothing expires", async () => {
    await using store = await freshPostgresDatabase();
    // Before, a URL's own application_name made every process look like one: nothing moved.
    const url = withApplicationName(store.url as string);
    const flags = [...TIMING, "--rebalance-interval", "1s"];
    const { processes, addresses } = await startServers(url, 2, flags);
    const [a, b] = addresses as [string, string];
    const agents = ["r1", "r2", "r3", "r4", "r5", "r6"].map((id) =>
      runSdkAgent([`${a},${b}`, "spread", id, "4"]),
    );
    let restarted: LeaseholdProcess | undefined;
    try {
      const first = await Promise.all(
        agents.map((agent) => agent.waitForLine((l) => l.type === "connected")),
      );
      // B goes away, as in a rolling restart: every agent ends up on A.
      processes[1]?.child.kill("SIGKILL");
      await until(agents, () => agents.every((agent) => where(agent) === a), "every agent on A");
      restarted = runLeasehold(["serve", "--listen", b, "--metrics-listen", "off", ...flags], url);
      await restarted.waitForLog((l) => l.msg === "leasehold serving");
      const actions = createClient(ActionService, a);
      const ids: string[] = [];
      for (let i = 0; i < 200; i++) {
        const { action } = await actions.submitAction({ cluster: "spread", payload: { sleepMs: 200 } });
        ids.push(action?.id ?? "");
      }
      // A hosts six of six over two processes: its share is three, plus a tenth (at least one), so
      // it moves half the excess over its share, two, at once; four stay within it.
      await until(agents, () => agents.filter((agent) => where(agent) === b).length >= 2, "two agents on B");
      expect(
        await processes[0]?.waitForLog(
          (l) => l.msg === "moved worker streams to spread them over the server processes",
        ),
      ).toMatchObject({ moved: 2, hosted: 6, liveSessions: 6, servers: 2 });
      for (const agent of agents.filter((x) => where(x) === b)) {
        const i = agents.indexOf(agent);
        // Told why, and back to the session it had from the start.
        expect(
          agent.lines.some(
            (l) =>
              l.type === "disconnected" &&
              /REBALANCING|this server hosts \d+ of the 6 live worker sessions/.test(String(l.error)),
          ),
        ).toBe(true);
        expect(agent.lines.filter((l) => l.type === "connected").at(-1)?.sessionId).toBe(first[i]?.sessionId);
      }
      await allCompleted(agents, ids, a);
      const counts = acceptedCompletions(agents);
      expect(ids.filter((id) => counts.get(id) !== 1)).toEqual([]);
      const expired = await createClient(EventService, a).listEvents({ kind: EventKind.LEASE_EXPIRED });
      expect(expired.events).toEqual([]);
      // Within its share now: no more moves than the two (the log counts them).
      const moves =
        processes[0]?.logs.filter(
          (l) => l.msg === "moved worker streams to spread them over the server processes",
        ) ?? [];
      expect(moves.reduce((n, l) => n + Number(l.moved), 0)).toBe(2);
    } finally {
      for (const agent of agents) agent.child.kill("SIGKILL");
      for (const p of [...processes, ...(restarted ? [restarted] : [])]) p.child.kill("SIGKILL");
    }
  }, 120_000);

  it("counts only the processes alive: streams are not pushed at one that hangs (SIGSTOP) with its connections open", async () => {
    await using store = await freshPostgresDatabase();
    const url = store.url as string;
    const { processes, addresses } = await startServers(url, 2, [...TIMING, "--rebalance-interval", "1s"]);
    const [a, b] = addresses as [string, string];
    const [hosting, hung] = processes as [LeaseholdProcess, LeaseholdProcess];
    hung.child.kill("SIGSTOP");
    const stoppedAt = Date.now();
    const agents = ["h1", "h2", "h3", "h4", "h5", "h6"].map((id) =>
      runSdkAgent([`${a},${b}`, "hung", id, "4"]),
    );
    try {
      // Those that try the hung process first find it silent (no health answer) and come to A.
      await until(agents, () => agents.every((agent) => where(agent) === a), "every agent on A");
      // Rounds every second for a while after the hung process's last liveness mark ran out
      // (3 heartbeat intervals of 1 s after its last tick).
      const settledAt = stoppedAt + 4500;
      await new Promise((r) => setTimeout(r, Math.max(0, settledAt + 8000 - Date.now())));
      const moves = hosting.logs.filter(
        (l) =>
          l.msg === "moved worker streams to spread them over the server processes" &&
          Number(l.time) > settledAt,
      );
      // Before, the hung process counted as long as its LISTEN connection stayed open: A hosting
      // 6 of 6 over "2 processes" moved 2 streams a round at it, each agent back after 3 s.
      expect(moves).toEqual([]);
      expect(agents.filter((agent) => where(agent) !== a).map((agent) => agent.lines.at(-1))).toEqual([]);
    } finally {
      for (const agent of agents) agent.child.kill("SIGKILL");
      for (const p of processes) p.child.kill("SIGKILL");
    }
  }, 120_000);

  describe("PostgreSQL restarted during a run", () => {
    let pg: OwnPostgres;
    beforeAll(async () => {
      pg = await startOwnPostgres();
    }, 60_000);
    afterAll(async () => {
      await pg?.destroy();
    });

    it("expires nothing for connected workers, reports NOT_SERVING meanwhile, and finishes every action", async () => {
      const url = pg.url.replace(/\/postgres$/, "/leasehold");
      const admin = postgres(pg.url, { onnotice: () => {} });
      await admin`create database leasehold`;
      await admin.end();
      const { processes, addresses } = await startServers(url, 2, [
        "--grace-period",
        "20s",
        "--heartbeat-interval",
        "1s",
      ]);
      const agents = ["p1", "p2"].map((id) => runSdkAgent([addresses.join(","), "outage", id, "4"]));
      try {
        await Promise.all(agents.map((agent) => agent.waitForLine((l) => l.type === "connected")));
        const actions = createClient(ActionService, addresses[0] as string);
        const ids: string[] = [];
        for (let i = 0; i < 120; i++) {
          const { action } = await actions.submitAction({ cluster: "outage", payload: { sleepMs: 100 } });
          ids.push(action?.id ?? "");
        }
        await until(agents, () => acceptedCompletions(agents).size >= 20, "the first actions");
        const outageStarted = Date.now();
        await pg.stop();
        await Promise.all(
          processes.map((p) =>
            p.waitForLog((l) => l.msg === "database unreachable; NOT_SERVING until it answers again"),
          ),
        );
        await pg.start();
        await Promise.all(
          processes.map((p) => p.waitForLog((l) => l.msg === "database reachable again; serving")),
        );
        // The grace period is well above the outage (a few seconds), however slow stopping and starting is.
        expect(Date.now() - outageStarted).toBeLessThan(20_000);
        await allCompleted(agents, ids, addresses[1] as string);
        const counts = acceptedCompletions(agents);
        expect(ids.filter((id) => counts.get(id) !== 1)).toEqual([]);
        const expired = await createClient(EventService, addresses[1] as string).listEvents({
          kind: EventKind.LEASE_EXPIRED,
        });
        // On failure, what the servers and agents said (times in ms since the outage began).
        const story = [
          ...processes.flatMap((p, i) =>
            p.logs.map(
              (l) =>
                `${Number(l.time) - outageStarted} server${i} ${l.msg} ${l.err ? JSON.stringify(l.err).slice(0, 160) : ""}`,
            ),
          ),
          ...agents.flatMap((a) =>
            a.lines
              .filter((l) => l.type !== "finished" && l.type !== "grant")
              .map((l) => `agent ${JSON.stringify(l)}`),
          ),
        ].join("\n");
        expect(
          expired.events.map((e) => e.message),
          story,
        ).toEqual([]);
        // The agents never lost their sessions.
        for (const agent of agents) expect(agent.lines.filter((l) => l.type === "self_fenced")).toEqual([]);
        // Each process recorded the outage it saw, once it could write again.
        const serverIds = processes.map(
          (p) => p.logs.find((l) => l.msg === "leasehold serving")?.serverId as string,
        );
        const events = createClient(EventService, addresses[1] as string);
        let outages: Awaited<ReturnType<typeof events.listEvents>>["events"] = [];
        for (const giveUpAt = Date.now() + 30_000; outages.length < 2 && Date.now() < giveUpAt; ) {
          ({ events: outages } = await events.listEvents({ kind: EventKind.DATABASE_UNREACHABLE }));
          if (outages.length < 2) await new Promise((r) => setTimeout(r, 100));
        }
        expect(outages.map((e) => e.details?.server_id).sort()).toEqual([...serverIds].sort());
        for (const e of outages) {
          expect(e.cluster).toBe("");
          expect(e.details?.duration_ms).toBeGreaterThan(0);
          expect(e.details?.read_only).toBe(false);
          expect(e.message).toMatch(/could not reach its database for \d+\.\d s/);
        }
      } finally {
        for (const agent of agents) agent.child.kill("SIGKILL");
        for (const p of processes) p.child.kill("SIGKILL");
      }
    }, 120_000);
  });
});
