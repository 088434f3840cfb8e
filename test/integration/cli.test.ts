import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { type AddressInfo, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { toJson } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from "vitest";
import { ActionService, ActionState, GetActionResponseSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseSchema, LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { BIN, runCli as cli, collectLines } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { connectWorker } from "../helpers/worker.js";

// Every step spawns a CLI process (a second or more each on a loaded machine): the timeout is a
// hang guard sized for that, not a speed check.
describe.runIf(runsDriverNeutralTests())("the leasehold CLI", { timeout: 120_000 }, () => {
  let t: TestServer;
  let server: string[];
  beforeAll(async () => {
    // The raw workers here do not heartbeat: a long grace keeps their sessions live however
    // slowly the CLI processes start.
    t = await startTestServer({ config: { gracePeriod: "10m" } });
    server = ["--server", t.address];
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });

  it("submits an action from a command after --, and get --json matches the server", async () => {
    const submitted = await cli([
      ...server,
      "--json",
      "action",
      "submit",
      "--cluster",
      "cli",
      "--label",
      "gpu=yes",
      // The agent's spelling, the same option.
      "--labels",
      "disk=ssd",
      "--priority",
      "3",
      "--",
      "echo",
      "hi",
    ]);
    expect(submitted.code).toBe(0);
    const { action, created } = JSON.parse(submitted.stdout);
    expect(created).toBe(true);
    expect(action).toMatchObject({
      cluster: "cli",
      state: "ACTION_STATE_QUEUED",
      payload: { argv: ["echo", "hi"] },
      labelSelector: { gpu: "yes", disk: "ssd" },
      priority: 3,
    });
    const got = await cli([...server, "--json", "action", "get", action.id]);
    const fromServer = await t.client(ActionService).getAction({ actionId: action.id });
    expect(JSON.parse(got.stdout)).toEqual(toJson(GetActionResponseSchema, fromServer));
    const human = await cli([...server, "action", "get", action.id]);
    expect(human.stdout).toMatch(new RegExp(`^ID\\s+STATE.*\\n${action.id}\\s+QUEUED\\s+cli`));
    expect(human.stdout).toMatch(/^requires labels: disk=ssd, gpu=yes$/m);
  });

  it("says when a listing stops at --limit with more left, and shows the newest events with --newest", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const { action } = await t.client(ActionService).submitAction({ cluster: "cli-more" });
      ids.push(action?.id ?? "");
    }
    const two = await cli([...server, "--json", "action", "list", "--cluster", "cli-more", "--limit", "2"]);
    expect(JSON.parse(two.stdout).actions.map((a: { id: string }) => a.id)).toEqual(ids.slice(0, 2));
    expect(two.stderr).toBe("leasehold: showing the oldest 2 actions; there are more (raise --limit)\n");
    const all = await cli([...server, "action", "list", "--cluster", "cli-more", "--limit", "3"]);
    expect(all.stderr).toBe("");
    const newest = await cli([
      ...server,
      "--json",
      "events",
      "--cluster",
      "cli-more",
      "--limit",
      "2",
      "--newest",
    ]);
    const events = JSON.parse(newest.stdout).events as { actionId: string; sequence: string }[];
    // The last two submissions' events, printed oldest first.
    expect(events.map((e) => e.actionId)).toEqual(ids.slice(1));
    expect(Number(events[0]?.sequence)).toBeLessThan(Number(events[1]?.sequence));
    expect(newest.stderr).toBe("leasehold: showing the newest 2 events; there are more (raise --limit)\n");
    const one = await cli([...server, "events", "--cluster", "cli-more", "--limit", "1"]);
    expect(one.stderr).toBe(
      "leasehold: showing the oldest 1 event; there are more (--newest shows the latest, or raise --limit)\n",
    );
    // More than one page's worth is read a page at a time.
    const many = await cli([...server, "--json", "events", "--cluster", "cli-more", "--limit", "1500"]);
    expect(many).toMatchObject({ code: 0, stderr: "" });
    expect(JSON.parse(many.stdout).events).toHaveLength(3);
  });

  it("follows events as tail -f does: the latest 20 (or --limit) first, then new ones; --after 0 replays all", async () => {
    const api = t.client(ActionService);
    const ids: string[] = [];
    for (let i = 0; i < 22; i++) ids.push((await api.submitAction({ cluster: "cli-tail" })).action?.id ?? "");
    const follow = (args: string[]) => {
      const child = spawn(
        process.execPath,
        [BIN, ...server, "--json", "events", "--follow", "--cluster", "cli-tail", ...args],
        { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, LEASEHOLD_SERVER: "" } },
      );
      // Killed when the test ends, however it ends (a follower that never prints would outlive it).
      onTestFinished(() => {
        child.kill("SIGKILL");
      });
      return collectLines(child);
    };
    const byDefault = follow([]);
    const latest = follow(["--limit", "2"]);
    const everything = follow(["--after", "0"]);
    const all = [byDefault, latest, everything];
    // Each has printed what it starts with before the next event is made.
    for (const f of all) await f.waitFor((l) => l.actionId === ids[21]);
    ids.push((await api.submitAction({ cluster: "cli-tail" })).action?.id ?? "");
    for (const f of all) await f.waitFor((l) => l.actionId === ids[22]);
    const printed = (f: (typeof all)[number]) => f.lines.map((l) => l.actionId);
    expect(printed(byDefault)).toEqual(ids.slice(2));
    expect(printed(latest)).toEqual(ids.slice(20));
    expect(printed(everything)).toEqual(ids);
    expect(await cli([...server, "events", "--after", "0"])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("--after: only with --follow"),
    });
    expect(await cli([...server, "events", "--follow", "--after", "0", "--limit", "2"])).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--after <sequence>.* cannot be used with .*--limit/),
    });
    expect((await cli(["events", "--help"])).stdout.replace(/\s+/g, " ")).toContain(
      "with --follow, print the latest 20 (or --limit) and then stream new ones, as tail -f does",
    );
  });

  it("pages lease, resource and worker listings up to --limit, and says when there are more", async () => {
    const leaseIds: string[] = [];
    const resourceIds: string[] = [];
    const workers = [];
    try {
      for (let i = 0; i < 3; i++) {
        const { lease } = await t.client(LeaseService).createLease({ runtime: "cli-pages" });
        leaseIds.push(lease?.id ?? "");
        const { resource } = await t.client(ResourceService).createObject({ kind: "cli-pages" });
        resourceIds.push(resource?.id ?? "");
        workers.push(
          await connectWorker(t.address, { workerId: `cli-pages-${i}`, cluster: "cli-pages", capacity: 1 }),
        );
      }
      const listings = [
        { args: ["lease", "list", "--runtime", "cli-pages"], key: "leases", id: "id", ids: leaseIds },
        { args: ["resource", "list", "--kind", "cli-pages"], key: "resources", id: "id", ids: resourceIds },
        {
          args: ["workers", "list", "--cluster", "cli-pages"],
          key: "workers",
          id: "workerId",
          ids: ["cli-pages-0", "cli-pages-1", "cli-pages-2"],
        },
      ];
      for (const { args, key, id, ids } of listings) {
        const two = await cli([...server, "--json", ...args, "--limit", "2"]);
        expect(JSON.parse(two.stdout)[key].map((item: Record<string, string>) => item[id])).toEqual(
          ids.slice(0, 2),
        );
        const order = key === "workers" ? "first" : "oldest";
        expect(two.stderr).toBe(`leasehold: showing the ${order} 2 ${key}; there are more (raise --limit)\n`);
        const all = await cli([...server, ...args, "--limit", "3"]);
        expect(all).toMatchObject({ code: 0, stderr: "" });
        expect(all.stdout.trim().split("\n")).toHaveLength(4);
      }
    } finally {
      for (const w of workers) w.drop();
    }
  });

  it("state and kind filters take the names tables print, in either case", async () => {
    const { action } = await t.client(ActionService).submitAction({ cluster: "cli-case" });
    const { lease } = await t.client(LeaseService).createLease({ runtime: "cli-case" });
    const ids = async (args: string[], key: string, id = "id") => {
      const listed = await cli([...server, "--json", ...args]);
      expect(listed).toMatchObject({ code: 0, stderr: "" });
      return JSON.parse(listed.stdout)[key].map((item: Record<string, string>) => item[id]);
    };
    for (const state of ["QUEUED", "queued", "Queued"])
      expect(await ids(["action", "list", "--cluster", "cli-case", "--state", state], "actions")).toEqual([
        action?.id,
      ]);
    expect(await ids(["action", "list", "--cluster", "cli-case", "--state", "LEASED"], "actions")).toEqual(
      [],
    );
    expect(await ids(["lease", "list", "--runtime", "cli-case", "--state", "OPEN"], "leases")).toEqual([
      lease?.id,
    ]);
    expect(await ids(["workers", "list", "--cluster", "cli-case", "--state", "IN_GRACE"], "workers")).toEqual(
      [],
    );
    expect(
      await ids(["events", "--cluster", "cli-case", "--kind", "SCOPE_LEASE_CREATED"], "events", "kind"),
    ).toEqual(["EVENT_KIND_SCOPE_LEASE_CREATED"]);
    expect(await ids(["events", "--lease", lease?.id ?? ""], "events", "leaseId")).toEqual([lease?.id]);
    const wrong = await cli([...server, "action", "list", "--state", "DONE"]);
    expect(wrong).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("Allowed choices are queued, leased, succeeded, failed, cancelled."),
    });
    expect((await cli(["workers", "list", "--help"])).stdout).toMatch(
      /--state <state> +only in this state, in any case \(choices:\s+"connected", "in_grace", "offline"\)/,
    );
  });

  it("lists, cancels and watches actions with --json output the server agrees with", async () => {
    const { action } = await t
      .client(ActionService)
      .submitAction({ cluster: "cli-list", payload: { argv: ["true"] } as never });
    const listed = JSON.parse(
      (await cli([...server, "--json", "action", "list", "--cluster", "cli-list"])).stdout,
    );
    expect(listed.actions.map((a: { id: string }) => a.id)).toEqual([action?.id]);
    const cancelled = await cli([
      ...server,
      "--json",
      "action",
      "cancel",
      action?.id ?? "",
      "--reason",
      "test",
    ]);
    expect(JSON.parse(cancelled.stdout).action).toMatchObject({
      state: "ACTION_STATE_CANCELLED",
      failureReason: "action cancelled: test",
    });
    const watched = await cli([...server, "--json", "action", "watch", action?.id ?? ""]);
    expect(watched.code).toBe(1); // cancelled is not success
    const lines = watched.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(lines.at(-1)).toMatchObject({ id: action?.id, state: "ACTION_STATE_CANCELLED" });
    expect((await t.client(ActionService).getAction({ actionId: action?.id ?? "" })).action?.state).toBe(
      ActionState.CANCELLED,
    );
  });

  it("cancels a run's actions without naming them, and says what a cancel without an id needs", async () => {
    const api = t.client(ActionService);
    const ids: string[] = [];
    for (const _ of [1, 2, 3])
      ids.push((await api.submitAction({ cluster: "cli-bulk", runId: "r1" })).action?.id ?? "");
    const other = (await api.submitAction({ cluster: "cli-bulk", runId: "r2" })).action?.id ?? "";
    const done = await cli([
      ...server,
      "action",
      "cancel",
      "--cluster",
      "cli-bulk",
      "--run-id",
      "r1",
      "--reason",
      "oops",
    ]);
    expect(done).toMatchObject({
      code: 0,
      stdout: expect.stringMatching(/^cancelled 3 queued actions, cancel requested for 0 leased actions/),
    });
    for (const id of ids)
      expect((await api.getAction({ actionId: id })).action?.state).toBe(ActionState.CANCELLED);
    expect((await api.getAction({ actionId: other })).action?.state).toBe(ActionState.QUEUED);
    const again = await cli([
      ...server,
      "--json",
      "action",
      "cancel",
      "--cluster",
      "cli-bulk",
      "--run-id",
      "r1",
    ]);
    expect(JSON.parse(again.stdout)).toEqual({ cancelledIds: [], cancelRequestedIds: [] });

    expect(await cli([...server, "action", "cancel", "--cluster", "cli-bulk"])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("add --run-id to cancel one run's actions, or --all"),
    });
    expect(await cli([...server, "action", "cancel", other, "--run-id", "r2"])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining(
        "--run-id selects actions to cancel: give it or an action id, not both",
      ),
    });
    expect((await cli([...server, "action", "cancel", "--cluster", "cli-bulk", "--all"])).stdout).toMatch(
      /^cancelled 1 queued action,/,
    );
  });

  it("shows a running action's phase with its latest line, a cancel requested, and a result", async () => {
    const api = t.client(ActionService);
    const worker = await connectWorker(t.address, {
      workerId: "cli-pw",
      cluster: "cli-progress",
      capacity: 1,
    });
    let watch: ReturnType<typeof spawn> | undefined;
    try {
      const { action } = await api.submitAction({ cluster: "cli-progress" });
      const id = action?.id ?? "";
      const grant = await worker.next("grant");
      worker.send({
        message: {
          case: "progress",
          value: {
            reportId: 900n,
            actionId: id,
            epoch: grant.epoch,
            phase: "running",
            details: { line: "step 1" },
          },
        },
      });
      await worker.next("reportResult", (r) => r.reportId === 900n);
      expect((await api.getAction({ actionId: id })).action?.phaseDetails).toEqual({ line: "step 1" });
      expect((await cli([...server, "action", "get", id])).stdout).toMatch(/^phase: running: step 1$/m);
      // A cancel asks the worker to stop: the action is still LEASED, and says so.
      await api.cancelAction({ actionId: id, reason: "enough" });
      watch = spawn(process.execPath, [BIN, ...server, "action", "watch", id], {
        stdio: ["ignore", "pipe", "pipe"],
        env: { ...process.env, LEASEHOLD_SERVER: "" },
      });
      const watched = collectLines(watch);
      await watched.waitFor((l) =>
        /LEASED on cli-pw \(epoch 1\), cancel requested \[running: step 1\]$/.test(String(l.text)),
      );
      const requested = (await t.client(EventService).listEvents({ actionId: id })).events.find(
        (e) => e.kind === EventKind.ACTION_CANCEL_REQUESTED,
      );
      expect(requested?.message).toBe("cancel requested: enough; revoking from cli-pw");
      await worker.release(grant);
      await watched.waitFor((l) => /CANCELLED/.test(String(l.text)));
      // Who asked for the cancel: the request's caller (the worker's release only finished it).
      const cancelled = (await cli([...server, "action", "get", id])).stdout;
      expect(cancelled).toMatch(/^reason: action cancelled: enough\ncancelled by: anonymous$/m);
      // A finished action: its worker is the last attempt's, and its output is shown.
      const { action: next } = await api.submitAction({ cluster: "cli-progress" });
      const second = await worker.next("grant", (g) => g.actionId === next?.id);
      await worker.complete(second, { output: { done: true } });
      const shown = (await cli([...server, "action", "get", next?.id ?? ""])).stdout;
      expect(shown).toMatch(new RegExp(`^${next?.id}\\s+SUCCEEDED\\s+cli-progress\\s+cli-pw\\s`, "m"));
      expect(shown).toMatch(/^output: \{"done":true\}$/m);
    } finally {
      watch?.kill("SIGKILL");
      worker.drop();
    }
  });

  it("lists workers and clusters, drains and undrains a worker, forgets it once gone, and shows events", async () => {
    const worker = await connectWorker(t.address, { workerId: "cli-w", cluster: "cli-c", capacity: 2 });
    try {
      const workers = JSON.parse(
        (await cli([...server, "--json", "workers", "list", "--cluster", "cli-c"])).stdout,
      );
      expect(workers.workers).toEqual([
        expect.objectContaining({ workerId: "cli-w", state: "WORKER_STATE_CONNECTED", capacity: 2 }),
      ]);
      // The table says when the server last heard from the worker (a hung agent stays CONNECTED
      // until its deadline) and which server process hosts its session.
      const table = (await cli([...server, "workers", "list", "--cluster", "cli-c"])).stdout.split("\n");
      expect(table[0]).toMatch(
        /^WORKER\s+CLUSTER\s+STATE\s+SLOTS\s+HELD\s+LAST SEEN\s+DEADLINE\s+DRAINING\s+SERVER$/,
      );
      expect(table[1]).toMatch(
        new RegExp(
          `^cli-w\\s+cli-c\\s+CONNECTED\\s+2\\s+-\\s+\\d+[smhd] ago\\s+\\S+\\s+no\\s+${t.server.serverId}$`,
        ),
      );
      expect((await cli(["workers", "list", "--help"])).stdout.replace(/\s+/g, " ")).toContain(
        "the server process hosting its session, its deadline and held leases (--json adds the session ids",
      );
      const clusters = JSON.parse((await cli([...server, "--json", "clusters", "list"])).stdout);
      expect(clusters.clusters).toEqual(
        expect.arrayContaining([expect.objectContaining({ name: "cli-c", connectedWorkers: 1 })]),
      );
      const drained = JSON.parse(
        (await cli([...server, "--json", "workers", "drain", "cli-w", "--reason", "patching"])).stdout,
      );
      expect(drained.worker).toMatchObject({ workerId: "cli-w", draining: true });
      expect((await t.client(ClusterService).getWorker({ workerId: "cli-w" })).worker?.draining).toBe(true);
      const events = JSON.parse((await cli([...server, "--json", "events", "--worker", "cli-w"])).stdout);
      expect(events.events.map((e: { kind: string }) => e.kind)).toEqual([
        "EVENT_KIND_SESSION_STARTED",
        "EVENT_KIND_WORKER_DRAINING",
      ]);
      // The drain's line says how to end it; undrain ends it, and says when there was none.
      expect((await cli([...server, "workers", "drain", "cli-w"])).stdout).toBe(
        "cli-w is draining (0 leases still held); `leasehold workers undrain cli-w` ends the drain\n",
      );
      expect(await cli([...server, "workers", "undrain", "cli-w", "--reason", "patched"])).toMatchObject({
        code: 0,
        stdout: "cli-w is no longer draining: it is granted work again\n",
      });
      expect((await t.client(ClusterService).getWorker({ workerId: "cli-w" })).worker?.draining).toBe(false);
      expect(await cli([...server, "workers", "undrain", "cli-w"])).toMatchObject({
        code: 0,
        stdout: "cli-w was not draining: nothing changed\n",
      });
      const undrained = JSON.parse((await cli([...server, "--json", "workers", "undrain", "cli-w"])).stdout);
      expect(undrained).toEqual({ worker: expect.objectContaining({ workerId: "cli-w" }) });
      const undrainedEvents = JSON.parse(
        (await cli([...server, "--json", "events", "--worker", "cli-w", "--kind", "WORKER_UNDRAINED"]))
          .stdout,
      );
      expect(undrainedEvents.events).toEqual([
        expect.objectContaining({ message: "worker cli-w is no longer draining: patched" }),
      ]);
      worker.goodbye();
      await worker.ended;
      expect(await cli([...server, "workers", "undrain", "cli-w"])).toMatchObject({
        code: 1,
        stderr: expect.stringContaining("worker cli-w has no live session: nothing to undrain"),
      });
      // drain --help says how a drain ends.
      expect((await cli(["workers", "drain", "--help"])).stdout.replace(/\s+/g, " ")).toContain(
        "The drain lasts until `leasehold workers undrain` or the end of the worker's session",
      );
      // Gone, it can be forgotten: its id is free at once.
      expect(await cli([...server, "workers", "forget", "cli-w", "--reason", "retired"])).toMatchObject({
        code: 0,
        stdout: "cli-w forgotten (it was in cluster cli-c): its id is free\n",
      });
      expect(await cli([...server, "workers", "forget", "cli-w"])).toMatchObject({
        code: 4,
        stderr: expect.stringContaining('worker "cli-w" not found'),
      });
    } finally {
      worker.drop();
    }
  });

  it("follows events as NDJSON with events --follow", async () => {
    const child = spawn(process.execPath, [
      BIN,
      ...server,
      "--json",
      "events",
      "--follow",
      "--cluster",
      "cli-follow",
    ]);
    const lines: Record<string, unknown>[] = [];
    const got = new Promise<void>((resolve) => {
      createInterface({ input: child.stdout }).on("line", (line) => {
        lines.push(JSON.parse(line));
        if (lines.length === 2) resolve();
      });
    });
    try {
      // Stored events are replayed first, then new ones follow.
      await t
        .client(ActionService)
        .submitAction({ cluster: "cli-follow", payload: { argv: ["true"] } as never });
      await t
        .client(ActionService)
        .submitAction({ cluster: "cli-follow", payload: { argv: ["true"] } as never });
      await got;
      expect(lines.map((l) => l.kind)).toEqual([
        "EVENT_KIND_ACTION_SUBMITTED",
        "EVENT_KIND_ACTION_SUBMITTED",
      ]);
      const stored = await t.client(EventService).listEvents({ cluster: "cli-follow" });
      expect(lines.map((l) => l.sequence)).toEqual(stored.events.map((e) => String(e.sequence)));
    } finally {
      child.kill();
    }
  });

  it("exits non-zero with a message that says what to fix", async () => {
    const missing = await cli([...server, "action", "submit", "--", "true"]);
    expect(missing).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/required option '--cluster <name>' not specified/),
    });
    const badNumber = await cli([
      ...server,
      "action",
      "submit",
      "--cluster",
      "c",
      "--priority",
      "high",
      "--",
      "true",
    ]);
    expect(badNumber).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--priority <n>' argument 'high' is invalid\. expected a whole number/),
    });
    const badPrefetch = await cli([
      ...server,
      "agent",
      "--cluster",
      "c",
      "--allow-any-command",
      "--prefetch=-1",
    ]);
    expect(badPrefetch).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(
        /--prefetch <n>' argument '-1' is invalid\. expected a whole number of at least 0/,
      ),
    });
    const tooMany = await cli([
      ...server,
      "agent",
      "--cluster",
      "c",
      "--allow-any-command",
      "--capacity=9000",
      "--prefetch=1001",
    ]);
    expect(tooMany).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--capacity plus --prefetch must be at most 10000 \(got 9000 \+ 1001\)/),
    });
    const nothing = await cli([...server, "action", "submit", "--cluster", "c"]);
    expect(nothing).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/nothing to run: give a command after --/),
    });
    const badJson = await cli([...server, "action", "submit", "--cluster", "c", "--payload", "{nope"]);
    expect(badJson).toMatchObject({ code: 2, stderr: expect.stringMatching(/--payload: not valid JSON/) });
    const noFile = await cli([
      ...server,
      "action",
      "submit",
      "--cluster",
      "c",
      "--payload",
      "@/no/such.json",
    ]);
    expect(noFile).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--payload @\/no\/such\.json: cannot read it \(ENOENT/),
    });
    const badStdin = await cli([...server, "action", "submit", "--cluster", "c", "--payload", "@-"], "[1]");
    expect(badStdin).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--payload: must be a JSON object/),
    });
    const fromStdin = await cli(
      [...server, "--json", "action", "submit", "--cluster", "c", "--payload", "@-"],
      '{"n": 1}',
    );
    expect(JSON.parse(fromStdin.stdout)).toMatchObject({ action: { payload: { n: 1 } } });
    const serverSide = await cli([...server, "action", "submit", "--cluster", "bad name", "--", "true"]);
    expect(serverSide).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/cluster: may contain only letters/),
    });
    const unknown = await cli([...server, "action", "get", "01900000-0000-7000-8000-000000000000"]);
    expect(unknown).toMatchObject({
      code: 4,
      stderr: expect.stringMatching(/action "01900000-.*" not found/),
    });
    const unreachable = await cli(["--server", "127.0.0.1:1", "clusters", "list"]);
    expect(unreachable).toMatchObject({
      code: 3,
      stderr: expect.stringMatching(/cannot reach the server at 127\.0\.0\.1:1/),
    });
    // The followers too: they wait for a server that went away, not for one never reached.
    for (const address of ["127.0.0.1:1", "nosuchhost.invalid:7000"]) {
      for (const follow of [
        ["action", "watch", "01900000-0000-7000-8000-000000000000"],
        ["events", "--follow"],
      ]) {
        expect(await cli(["--server", address, ...follow])).toMatchObject({
          code: 3,
          stderr: expect.stringContaining(`cannot reach the server at ${address}`),
        });
      }
    }
    // Several addresses: a dead one first, then the server; and a name that resolves to it.
    const port = t.address.split(":")[1];
    const failover = await cli(["--server", `127.0.0.1:1,${t.address}`, "--json", "clusters", "list"]);
    expect(failover.code).toBe(0);
    const byName = await cli(["--server", `127.0.0.1:1,localhost:${port}`, "--json", "clusters", "list"]);
    expect(byName.code).toBe(0);
    const unknownCommand = await cli(["frobnicate"]);
    expect(unknownCommand.code).toBe(2);
    expect((await cli(["--help"])).code).toBe(0);
    // A subcommand's help lists the program's options it takes (serve has its own TLS options).
    expect((await cli(["agent", "--help"])).stdout).toMatch(/Global Options:[\s\S]*--server <host:port>/);
    expect((await cli(["action", "submit", "--help"])).stdout).toMatch(/--tls-ca <file>/);
    expect((await cli(["serve", "--help"])).stdout).not.toMatch(/Global Options/);
    // A group's help is its list of commands, not pushed down by the program's options.
    const group = (await cli(["lease", "--help"])).stdout;
    expect(group).toMatch(/Commands:\n +create /);
    expect(group).not.toMatch(/Global Options/);
  });

  it("says each reason the agent cannot connect once, however many times it tries each address", async () => {
    // The second address accepts connections and drops them at once: a reason of its own,
    // different from the first address's refusal, on every other try.
    let attempts = 0;
    const counted = new Set<() => void>();
    const dropper = createServer((socket) => {
      attempts += 1;
      socket.destroy();
      for (const w of [...counted]) w();
    });
    await new Promise<void>((r) => dropper.listen(0, "127.0.0.1", r));
    const port = (dropper.address() as AddressInfo).port;
    const agent = spawn(
      process.execPath,
      [
        BIN,
        "agent",
        "--server",
        `127.0.0.1:1,127.0.0.1:${port}`,
        "--cluster",
        "quiet",
        "--allow-any-command",
      ],
      { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, LEASEHOLD_SERVER: "" } },
    );
    try {
      const { lines, waitFor } = collectLines(agent);
      await waitFor((l) => /cannot connect/.test(String(l.text)));
      await new Promise<void>((resolve) => {
        const look = () => {
          if (attempts < 3) return;
          counted.delete(look);
          resolve();
        };
        counted.add(look);
        look();
      });
      // Both addresses were tried more than once by now (the agent alternates between them): one
      // line for each reason (the dropping one fails in more than one way), none for the tries after.
      // Never connected: it says it cannot connect yet, never that it was disconnected.
      const said = lines.map((l) => String(l.text)).filter((text) => /connect/.test(text));
      expect(said[0]).toMatch(
        new RegExp(
          ` cannot connect to any of 127\\.0\\.0\\.1:1, 127\\.0\\.0\\.1:${port} yet \\(.+\\); trying again with backoff$`,
        ),
      );
      for (const line of said.slice(1))
        expect(line).toMatch(/ still cannot connect after [1-9]\d* m?s \(.+\); trying again with backoff$/);
      const reasons = said.map((line) =>
        /\((.+)\); trying again/.exec(line)?.[1]?.replace(/ \(\d{4}-[^)]*\)/g, ""),
      );
      expect(new Set(reasons).size, said.join("\n")).toBe(said.length);
      expect(reasons).toContain("connect ECONNREFUSED 127.0.0.1:1");
    } finally {
      agent.kill("SIGKILL");
      dropper.close();
    }
  });

  it("resource get shows a deployment's phase and containers, and an object's body", async () => {
    const worker = await connectWorker(t.address, { workerId: "cli-dw", cluster: "cli-dep", capacity: 1 });
    try {
      const { lease } = await t.client(LeaseService).createLease({ runtime: "cli-dep" });
      const leaseId = lease?.id ?? "";
      const command = { argv: ["true"] };
      const { resource: deployment } = await t.client(ResourceService).createDeployment({
        leaseId,
        spec: {
          containers: [
            { name: "web", command },
            { name: "side", command },
          ],
        },
      });
      const grant = await worker.next("grant");
      await worker.complete(grant, {
        output: {
          containers: [
            { name: "web", state: "exited", exitCode: 3, message: "boom" },
            { name: "side", state: "running" },
          ],
        },
      });
      const shown = await cli([...server, "resource", "get", deployment?.id ?? ""]);
      expect(shown.code).toBe(0);
      expect(shown.stdout).toContain(
        `\n${deployment?.id} STOPPED web=exited(3, boom) side=running - stopped\n`,
      );
      const { resource: object } = await t
        .client(ResourceService)
        .createObject({ kind: "cli-note", leaseId, body: { n: 1, tags: ["a"] } as never });
      const body = await cli([...server, "resource", "get", object?.id ?? ""]);
      expect(body.stdout).toMatch(/^body: \{"n":1,"tags":\["a"\]\}$/m);
    } finally {
      worker.drop();
    }
  });

  it("shows no worker for a retry waiting in the queue, and the last attempt's for a finished action", async () => {
    const worker = await connectWorker(t.address, {
      workerId: "cli-retry",
      cluster: "cli-retry",
      capacity: 1,
    });
    try {
      const api = t.client(ActionService);
      const { action } = await api.submitAction({
        cluster: "cli-retry",
        retryPolicy: { maxAttempts: 2, initialBackoff: { seconds: 3600n } },
      });
      const id = action?.id ?? "";
      await worker.complete(await worker.next("grant"), { error: "flaky", retryable: true });
      const queued = await cli([...server, "action", "get", id]);
      expect(queued.stdout).toMatch(new RegExp(`^${id} +QUEUED +cli-retry +- `, "m"));
      await api.cancelAction({ actionId: id });
      const cancelled = await cli([...server, "action", "get", id]);
      expect(cancelled.stdout).toMatch(new RegExp(`^${id} +CANCELLED +cli-retry +cli-retry `, "m"));
    } finally {
      worker.drop();
    }
  });

  it("prints what the server sends with its control characters escaped, and --json exact", async () => {
    // ESC (a clear-screen sequence), a carriage return, C1's CSI and DEL, as any submitter may send them.
    const nasty = "ok\u001b[2J\r\u009b31m\u007f";
    const shown = "ok\\x1b[2J\\r\\x9b31m\\x7f";
    const { lease } = await t.client(LeaseService).createLease({ runtime: "cli-escapes", label: nasty });
    const leaseId = lease?.id ?? "";
    const worker = await connectWorker(t.address, {
      workerId: "cli-esc",
      cluster: "cli-escapes",
      capacity: 1,
    });
    try {
      const { action } = await t.client(ActionService).submitAction({ cluster: "cli-escapes" });
      const grant = await worker.next("grant");
      await worker.complete(grant, {
        error: `boom${nasty}\nsecond line`,
        retryable: false,
        details: { stderrTail: `bad${nasty}\nlast line\n` },
      });
      const outputs = await Promise.all([
        cli([...server, "lease", "get", leaseId]),
        cli([...server, "lease", "list", "--runtime", "cli-escapes"]),
        cli([...server, "action", "get", action?.id ?? ""]),
        cli([...server, "events", "--action", action?.id ?? ""]),
      ]);
      for (const { code, stdout } of outputs) {
        expect(code).toBe(0);
        expect(controlsIn(stdout)).toEqual([]);
      }
      const [get, list, actionGet, events] = outputs.map((o) => o.stdout);
      expect(get).toMatch(new RegExp(`^${leaseId} +OPEN +cli-escapes +${escapeRegExp(shown)} +0 `, "m"));
      expect(list).toContain(` ${shown} `);
      // One line each, the newline shown too: nothing the server sends makes a line of its own.
      expect(actionGet).toContain(`reason: failed (not retryable): boom${shown}\\nsecond line\n`);
      expect(actionGet).toContain(`last error: boom${shown}\\nsecond line\n`);
      // What the failed command wrote (the reference agent's details), on one line too.
      expect(actionGet).toContain(`\nstderr: bad${shown}\\nlast line\n`);
      expect(events).toContain(`boom${shown}\\nsecond line`);

      // --json is the exact JSON of the value, DEL and C1 escaped as JSON escapes them.
      const json = await cli([...server, "--json", "lease", "get", leaseId]);
      expect(controlsIn(json.stdout)).toEqual([]);
      expect(JSON.parse(json.stdout).label).toBe(nasty);

      // So are the server's messages on stderr, which echo what a caller sent.
      const missing = await cli([...server, "lease", "get", `nope${nasty}`]);
      expect(missing.code).toBe(4);
      expect(controlsIn(missing.stderr)).toEqual([]);
      expect(missing.stderr).toContain('lease "nopeok\\u001b[2J\\r\\x9b31m\\x7f" not found');
    } finally {
      worker.drop();
      await t.client(LeaseService).rollbackLease({ leaseId });
    }
  });

  it("lease create retried after its lease closed shows the lease's state and exits 1", async () => {
    const create = ["lease", "create", "--runtime", "cli-retry", "--request-id", "retry-1"];
    const first = await cli([...server, ...create]);
    expect(first).toMatchObject({ code: 0, stderr: "" });
    const id = first.stdout.split(" ")[0] ?? "";
    expect(first.stdout).toMatch(new RegExp(`^${escapeRegExp(id)} \\(open until \\S+\\)\n$`));
    // The same request again while the lease is open: the same lease, still a success.
    expect(await cli([...server, ...create])).toEqual(first);
    const { lease } = await t.client(LeaseService).rollbackLease({ leaseId: id });
    if (!lease) throw new Error("the rollback returned no lease");
    const closedAt = new Date((toJson(LeaseSchema, lease) as { closeTime: string }).closeTime).toISOString();
    const again = await cli([...server, ...create]);
    expect(again).toEqual({
      code: 1,
      stdout: `${id} (rolled back at ${closedAt})\n`,
      stderr:
        `leasehold: --request-id retry-1: the lease this request id opened, ${id}, is already closed ` +
        `(rolled back at ${closedAt}); a retry returns that lease as it is. ` +
        "To open a new lease, use a new request id.\n",
    });
    const asJson = await cli([...server, "--json", ...create]);
    expect(asJson.code).toBe(1);
    expect(JSON.parse(asJson.stdout)).toMatchObject({ id, state: "LEASE_STATE_ROLLED_BACK" });
  });

  it("runs a scope lease through create, file upload, promote, rollback and housekeeping", async () => {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-cli-"));
    try {
      const lease = JSON.parse(
        (
          await cli([
            ...server,
            "--json",
            "lease",
            "create",
            "--runtime",
            "east",
            "--ttl",
            "10m",
            "--label",
            "cli",
          ])
        ).stdout,
      );
      expect(lease).toMatchObject({ runtime: "east", state: "LEASE_STATE_OPEN", ttl: "600s", label: "cli" });
      const path = join(dir, "fixture.txt");
      writeFileSync(path, "fixture content\n");
      const kept = JSON.parse(
        (await cli([...server, "--json", "file", "create", path, "--lease", lease.id])).stdout,
      );
      expect(kept).toMatchObject({
        kind: "file",
        ownership: "OWNERSHIP_LEASE",
        leaseId: lease.id,
        file: { name: "fixture.txt" },
      });
      const scratch = JSON.parse(
        (
          await cli([
            ...server,
            "--json",
            "resource",
            "create",
            "--kind",
            "scratch",
            "--lease",
            lease.id,
            "--body",
            '{"n":1}',
          ])
        ).stdout,
      );
      expect(scratch).toMatchObject({ kind: "scratch", object: { n: 1 } });
      const promoted = JSON.parse(
        (await cli([...server, "--json", "lease", "promote", lease.id, "--kind", "file", "--id", kept.id]))
          .stdout,
      );
      expect(promoted.ownership).toBe("OWNERSHIP_WORKSPACE");
      // It shows the lease with the result it now holds, as `lease get` and `lease debug` do.
      // A result another program wrote, from a file (`@-` reads standard input).
      const resultFile = join(mkdtempSync(join(tmpdir(), "leasehold-cli-")), "result.json");
      writeFileSync(resultFile, '{"passed":true}\n');
      const recorded = await cli([...server, "lease", "set-result", lease.id, "--result", `@${resultFile}`]);
      rmSync(dirname(resultFile), { recursive: true });
      expect(recorded.stdout).toContain('result: {"passed":true}\n');
      const rolled = await cli([...server, "lease", "rollback", lease.id]);
      expect(rolled).toMatchObject({ code: 0, stdout: `${lease.id} rolled back: 1 resource destroyed\n` });
      expect((await t.client(LeaseService).getLease({ leaseId: lease.id })).lease).toMatchObject({
        state: LeaseState.ROLLED_BACK,
        result: { passed: true },
      });
      const fromServer = await t.client(LeaseService).getLease({ leaseId: lease.id });
      expect(JSON.parse((await cli([...server, "--json", "lease", "get", lease.id])).stdout)).toEqual(
        toJson(LeaseSchema, fromServer.lease as never),
      );
      const downloaded = await cli([...server, "file", "download", kept.id]);
      expect(downloaded.stdout).toBe("fixture content\n");
      const debug = JSON.parse((await cli([...server, "--json", "lease", "debug", lease.id])).stdout);
      expect(debug.resources.map((r: { id: string }) => r.id)).toEqual([kept.id]);
      const shown = (await cli([...server, "lease", "get", lease.id])).stdout;
      expect(shown).toContain("created by: anonymous\n");
      // When it closed, and why, each in its own column.
      const closedAt = new Date(
        JSON.parse((await cli([...server, "--json", "lease", "get", lease.id])).stdout).closeTime,
      ).toISOString();
      expect(shown).toMatch(/^LEASE .* EXPIRES +CLOSED +REASON\n/);
      expect(shown).toMatch(new RegExp(`${escapeRegExp(closedAt)} +rolled_back\n`));
      expect(shown).toContain('result: {"passed":true}\n');
      expect((await cli([...server, "lease", "debug", lease.id])).stdout).toContain(
        'result: {"passed":true}\n',
      );
      expect((await cli([...server, "lease", "delete", lease.id])).code).toBe(0);
      expect((await cli([...server, "lease", "get", lease.id])).code).toBe(4);
      // Many at once by runtime; the event names who deleted it.
      const other = JSON.parse(
        (await cli([...server, "--json", "lease", "create", "--runtime", "cli-west"])).stdout,
      );
      await t.client(LeaseService).commitLease({ leaseId: other.id });
      // One still open on that runtime is left, and said so.
      const open = JSON.parse(
        (await cli([...server, "--json", "lease", "create", "--runtime", "cli-west"])).stdout,
      );
      const byRuntime = await cli([...server, "lease", "delete", "--runtime", "cli-west"]);
      expect(byRuntime).toMatchObject({
        code: 0,
        stdout: "1 closed lease deleted; 1 still open was left (roll it back or commit it first)\n",
      });
      const asJson = await cli([...server, "--json", "lease", "delete", "--runtime", "cli-west"]);
      expect(JSON.parse(asJson.stdout)).toEqual({ deleted: 0, skippedOpen: 1, skippedRunning: 0 });
      await t.client(LeaseService).rollbackLease({ leaseId: open.id });
      const deletedEvents = await cli([
        ...server,
        "events",
        "--cluster",
        "cli-west",
        "--kind",
        "scope_lease_deleted",
      ]);
      expect(deletedEvents.stdout).toMatch(
        /scope_lease_deleted\s+-\s+-\s+anonymous\s+scope lease record deleted/,
      );
      const both = await cli([...server, "lease", "delete", other.id, "--runtime", "cli-west"]);
      expect(both).toMatchObject({ code: 2, stderr: expect.stringMatching(/not both/) });
      const again = await cli([...server, "lease", "rollback", lease.id]);
      expect(again).toMatchObject({ code: 4 });
      const noRuntime = await cli([...server, "lease", "create"]);
      expect(noRuntime).toMatchObject({
        code: 2,
        stderr: expect.stringMatching(/required option '--runtime <cluster>'/),
      });
      const badTtl = await cli([...server, "lease", "create", "--runtime", "east", "--ttl", "soon"]);
      expect(badTtl).toMatchObject({
        code: 2,
        stderr: expect.stringMatching(/--ttl: must be a duration like/),
      });
      // Not rounded to 1s: the server keeps a TTL in whole milliseconds, and 0.9995s is none.
      const fineTtl = await cli([...server, "lease", "create", "--runtime", "east", "--ttl", "0.9995s"]);
      expect(fineTtl).toMatchObject({
        code: 2,
        stdout: "",
        stderr: expect.stringContaining('--ttl: must be a whole number of milliseconds (got "0.9995s")'),
      });
      const shortTtl = await cli([...server, "lease", "create", "--runtime", "east", "--ttl", "999ms"]);
      expect(shortTtl).toMatchObject({ code: 2, stderr: expect.stringMatching(/ttl: must be at least 1s/) });
      // An unset variable (--ttl "$TTL") is a mistake, not a request for the default.
      const emptyTtl = await cli([...server, "lease", "create", "--runtime", "east", "--ttl", ""]);
      expect(emptyTtl).toMatchObject({
        code: 2,
        stderr: expect.stringMatching(/--ttl: must be a duration like .*\(got ""\)/),
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** `text` matched literally in a RegExp. */
function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** The control characters of `text` but its line ends: C0, DEL and C1. */
function controlsIn(text: string): string[] {
  return [...text].filter((c) => {
    const n = c.charCodeAt(0);
    return (n < 0x20 && c !== "\n") || (n >= 0x7f && n <= 0x9f);
  });
}
