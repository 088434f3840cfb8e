import { execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, inject, it } from "vitest";
import { freshStore } from "../helpers/database.js";
import { freePort } from "../helpers/ports.js";
import { BIN, collectLines, type LeaseholdProcess, runLeasehold } from "../helpers/process.js";

/** A long-running `leasehold` child whose stdout lines are kept (JSON when parseable). */
function follow(args: string[]) {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  const { lines, waitFor } = collectLines(child);
  const stderr = collectLines(child, "stderr");
  return { child, lines, until: waitFor, stderr: stderr.lines, untilStderr: stderr.waitFor };
}

/** Runs `leasehold <args>` to completion and returns stdout. */
function run(args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(process.execPath, [BIN, ...args], (error, stdout, stderr) =>
      error ? reject(new Error(`leasehold ${args.join(" ")}: ${stderr}`)) : resolve(stdout),
    ),
  );
}

/**
 * The README walkthrough, command for command: a server, two agents, a long
 * action, the agent holding it killed with SIGKILL, the failover watched with
 * `action watch` and `events --follow`, then a server restart that expires
 * nothing.
 */
// On the README's own store, PGlite: what the walkthrough drives (the CLI, agents, failover,
// restart) is covered on PostgreSQL by the failover, restart and CLI tests, and one run of it
// keeps CI within its time.
describe.runIf(inject("driver") === "pglite")("the README walkthrough", () => {
  it("shows a failover after kill -9 and a restart without expiry", async () => {
    await using store = await freshStore();
    const port = await freePort();
    const address = `127.0.0.1:${port}`;
    const serveArgs = [
      "serve",
      "--listen",
      address,
      "--metrics-listen",
      "off",
      "--data-dir",
      store.dataDir,
      // As the README: a restart (PGlite starting, under load on CI) must fit in the 14.5 s
      // guarantee a 15 s grace leaves the agent after the server's handover.
      "--grace-period",
      "15s",
      "--heartbeat-interval",
      "1s",
    ];
    const sleepFor = `${300 + Math.floor(Math.random() * 1000)}`; // unique, to find the orphan of the killed agent
    const processes: { kill(signal?: NodeJS.Signals): unknown }[] = [];
    // Work directories of their own: the README's agents of the same names use the default ones
    // (/tmp/leasehold-agent-<id>), and an agent refuses a directory another live agent holds.
    const workDirs = mkdtempSync(join(tmpdir(), "leasehold-walkthrough-"));
    let server: LeaseholdProcess = runLeasehold(serveArgs, store.url);
    processes.push(server.child);
    try {
      await server.waitForLog((l) => l.msg === "leasehold serving");
      const agents = new Map(
        ["agent-a", "agent-b"].map((id) => {
          const agent = follow([
            "--server",
            address,
            "--json",
            "agent",
            "--cluster",
            "east",
            "--worker-id",
            id,
            "--work-dir",
            join(workDirs, id),
            "--allow-command",
            "sleep *",
          ]);
          processes.push(agent.child);
          return [id, agent];
        }),
      );
      for (const agent of agents.values()) await agent.until((l) => l.type === "connected");

      const submitted = JSON.parse(
        await run([
          "--server",
          address,
          "--json",
          "action",
          "submit",
          "--cluster",
          "east",
          "--",
          "sleep",
          sleepFor,
        ]),
      );
      const id = submitted.action.id as string;
      const watch = follow(["--server", address, "--json", "action", "watch", id]);
      const events = follow(["--server", address, "--json", "events", "--follow"]);
      processes.push(watch.child, events.child);

      const leased = await watch.until((l) => l.state === "ACTION_STATE_LEASED");
      const holder = (leased.lease as { workerId: string }).workerId;
      const other = holder === "agent-a" ? "agent-b" : "agent-a";
      agents.get(holder)?.child.kill("SIGKILL");

      await events.until((l) => l.kind === "EVENT_KIND_STREAM_LOST" && l.workerId === holder);
      const expired = await events.until((l) => l.kind === "EVENT_KIND_LEASE_EXPIRED");
      expect(expired.message).toBe(
        `lease expired for action ${id} (worker ${holder}, cluster east, epoch 1)`,
      );
      const regrant = await events.until((l) => l.kind === "EVENT_KIND_LEASE_GRANTED" && l.epoch === "2");
      expect(regrant.workerId).toBe(other);
      const moved = await watch.until((l) => l.state === "ACTION_STATE_LEASED" && l.epoch === "2");
      expect((moved.lease as { workerId: string }).workerId).toBe(other);
      expect(server.logs.map((l) => l.msg)).toContain(expired.message);

      // Restart the server: the surviving agent reconnects and nothing expires.
      server.child.kill("SIGTERM");
      expect(await server.exited).toBe(0);
      server = runLeasehold(serveArgs, store.url);
      processes.push(server.child);
      await server.waitForLog((l) => l.msg === "leasehold serving");
      await agents.get(other)?.until((l) => l.type === "connected" && (l.resumed as string[]).includes(id));
      // Had the restart outlasted the agent's guarantee (the grace minus up to two heartbeats and
      // its margin), it would have stopped the command and given the action back for a re-run.
      expect(
        agents.get(other)?.lines.filter((l) => l.type === "self_fenced"),
        "the surviving agent self-fenced: the restart took longer than its guarantee",
      ).toEqual([]);
      // The followers said once that the server went away and once that it came back, and the
      // watch did not print the unchanged state again.
      for (const follower of [watch, events]) {
        await follower.untilStderr((l) => String(l.text).includes("server back"));
        expect(follower.stderr.map((l) => String(l.text).replace(/ \(.*\)/, ""))).toEqual([
          "leasehold: server unavailable; reconnecting every 1 s",
          "leasehold: server back; following again",
        ]);
      }
      const states = watch.lines.map((l) => JSON.stringify(l));
      expect(new Set(states).size, "a state printed twice").toBe(states.length);
      await new Promise((r) => setTimeout(r, 16_000)); // longer than the grace period
      const expiries = JSON.parse(
        await run(["--server", address, "--json", "events", "--kind", "lease_expired"]),
      );
      expect(expiries.events).toHaveLength(1);
      const after = JSON.parse(await run(["--server", address, "--json", "action", "get", id]));
      expect(after.action).toMatchObject({
        state: "ACTION_STATE_LEASED",
        epoch: "2",
        lease: { workerId: other },
      });

      // Cancel: the agent kills the command and the action ends CANCELLED.
      await run(["--server", address, "action", "cancel", id]);
      const last = await watch.until((l) => l.state === "ACTION_STATE_CANCELLED");
      expect(last.id).toBe(id);
    } finally {
      for (const p of processes.reverse()) p.kill("SIGKILL");
      // The SIGKILLed agent could not stop its command; it is not ours to leave behind.
      await new Promise((r) => execFile("pkill", ["-f", `^sleep ${sleepFor}$`], () => r(undefined)));
      rmSync(workDirs, { recursive: true, force: true });
    }
  }, 180_000);
});
