import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { freePort } from "../helpers/ports.js";
import { runCli as cli } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

const ndjson = (objects: readonly unknown[]) => `${objects.map((o) => JSON.stringify(o)).join("\n")}\n`;

// Every step spawns a CLI process (a second or more on a loaded machine): the timeout is a hang guard.
describe.runIf(runsDriverNeutralTests())("leasehold action submit --from", { timeout: 120_000 }, () => {
  let t: TestServer;
  let server: string[];
  let dir: string;
  beforeAll(async () => {
    t = await startTestServer();
    server = ["--server", t.address];
    dir = mkdtempSync(join(tmpdir(), "leasehold-cli-bulk-"));
  });
  afterAll(async () => {
    rmSync(dir, { recursive: true, force: true });
    await t?.[Symbol.asyncDispose]();
  });

  /** Every action of a run, across pages. */
  const listRun = async (runId: string) => {
    const all = [];
    let pageToken = "";
    do {
      const page = await t.client(ActionService).listActions({ runId, pageSize: 1000, pageToken });
      all.push(...page.actions);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return all;
  };

  it("reads a file of 130,000 lines (its table once overflowed the stack)", async () => {
    // Math.max(...lines) took one argument a line, past the stack's room at about 125,000. No
    // server listens at the address: the command gets as far as trying to reach it.
    const file = join(dir, "huge.ndjson");
    writeFileSync(
      file,
      ndjson(Array.from({ length: 130_000 }, (_, i) => ({ cluster: "c", requestId: `h${i}`, argv: ["x"] }))),
    );
    const run = await cli(["--server", `127.0.0.1:${await freePort()}`, "action", "submit", "--from", file]);
    expect(run.stderr).not.toContain("Maximum call stack");
    expect(run.stderr).toContain("cannot reach");
    expect(run.code).toBe(3);
  });

  it("submits every line of a file in calls of 1,000, prints one row per line, and a rerun creates nothing", async () => {
    const file = join(dir, "many.ndjson");
    const lines = Array.from({ length: 1200 }, (_, i) => ({
      cluster: "cli-bulk",
      requestId: `many-${i}`,
      argv: ["echo", String(i)],
      ...(i === 5 ? { timeout: 30, priority: 7, labelSelector: { zone: "a" } } : {}),
    }));
    writeFileSync(file, ndjson(lines));
    const first = await cli([...server, "action", "submit", "--from", file, "--run-id", "many"]);
    expect(first.code).toBe(0);
    const rows = first.stdout.trim().split("\n");
    expect(rows[0]).toMatch(/^LINE\s+ID\s+STATE\s+CLUSTER\s+RESULT$/);
    expect(rows).toHaveLength(1201);
    expect(rows[1]).toMatch(/^1\s+[0-9a-f-]{36}\s+QUEUED\s+cli-bulk\s+submitted$/);
    expect(rows[1200]).toMatch(/^1200\s+[0-9a-f-]{36}\s+QUEUED\s+cli-bulk\s+submitted$/);
    expect(first.stderr).toContain("submitted 1200, already submitted 0");

    const queued = await listRun("many");
    expect(queued).toHaveLength(1200);
    const sixth = queued.find((a) => a.requestId === "many-5");
    expect(sixth).toMatchObject({
      payload: { argv: ["echo", "5"], timeout: 30 },
      priority: 7,
      labelSelector: { zone: "a" },
      state: ActionState.QUEUED,
    });
    expect(rows[6]?.split(/\s+/)[1]).toBe(sixth?.id);

    // The same file again, as JSON: every line answers with its action, created false.
    const again = await cli([...server, "--json", "action", "submit", "--from", file, "--run-id", "many"]);
    expect(again.code).toBe(0);
    const results = again.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(results).toHaveLength(1200);
    expect(results[5]).toMatchObject({ line: 6, action: { id: sixth?.id } });
    expect(results.every((r) => r.created === undefined || r.created === false)).toBe(true);
  });

  it("reads stdin with -, filling what a line leaves out from the flags", async () => {
    const input = ndjson([
      { argv: ["true"] },
      { cluster: "cli-bulk-other", payload: { job: 1 }, priority: 2, labelSelector: { zone: "b" } },
    ]);
    const result = await cli(
      [
        ...server,
        "--json",
        "action",
        "submit",
        "--from",
        "-",
        "--cluster",
        "cli-bulk-stdin",
        "--run-id",
        "stdin",
        "--label",
        "gpu=yes",
        "--priority",
        "5",
        "--max-attempts",
        "4",
      ],
      `\n${input}\n`,
    );
    expect(result.code).toBe(0);
    const [a, b] = result.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(a).toMatchObject({
      line: 2,
      created: true,
      action: {
        cluster: "cli-bulk-stdin",
        payload: { argv: ["true"] },
        priority: 5,
        labelSelector: { gpu: "yes" },
        retryPolicy: { maxAttempts: 4 },
        runId: "stdin",
      },
    });
    expect(b).toMatchObject({
      line: 3,
      action: {
        cluster: "cli-bulk-other",
        payload: { job: 1 },
        priority: 2,
        labelSelector: { gpu: "yes", zone: "b" },
      },
    });
  });

  it("refuses a bad line with exit code 2 naming its line, before sending anything", async () => {
    const input = `${ndjson([{ cluster: "c", argv: ["true"], runId: "bad-line" }])}{"cluster": "c", "argv": [\n`;
    const broken = await cli([...server, "action", "submit", "--from", "-"], input);
    expect(broken).toMatchObject({ code: 2, stderr: expect.stringMatching(/line 2: not valid JSON/) });
    const unknownKey = await cli(
      [...server, "action", "submit", "--from", "-"],
      // A blank line counts: the bad one is line 3.
      `${ndjson([{ cluster: "c", argv: ["true"], runId: "bad-line" }])}\n${ndjson([{ cluster: "c", argv: ["x"], colour: 1 }])}`,
    );
    expect(unknownKey).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/line 3: key "colour" is unknown/),
    });
    const noCluster = await cli([...server, "action", "submit", "--from", "-"], ndjson([{ argv: ["true"] }]));
    expect(noCluster).toMatchObject({ code: 2, stderr: expect.stringMatching(/line 1: no cluster/) });
    const nothing = await cli([...server, "action", "submit", "--from", "-"], ndjson([{ cluster: "c" }]));
    expect(nothing).toMatchObject({ code: 2, stderr: expect.stringMatching(/line 1: nothing to run/) });
    const missing = await cli([...server, "action", "submit", "--from", join(dir, "nope.ndjson")]);
    expect(missing).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--from .*nope\.ndjson: cannot read it/),
    });
    const both = await cli(
      [...server, "action", "submit", "--from", "-", "--", "true"],
      ndjson([{ cluster: "c" }]),
    );
    expect(both).toMatchObject({
      code: 2,
      stderr: expect.stringMatching(/--from takes every action from its lines; drop the command after --/),
    });
    expect(await listRun("bad-line")).toEqual([]);
  });

  it("names the line of an item the server refuses, and says which earlier lines were submitted", async () => {
    const lines = Array.from({ length: 1005 }, (_, i) => ({
      cluster: i === 1002 ? "bad cluster" : "cli-bulk",
      runId: "refused",
      argv: ["true"],
    }));
    const result = await cli([...server, "action", "submit", "--from", "-"], ndjson(lines));
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(
      /line 1003: cluster: may contain only letters.*\nthe 1000 actions of lines 1–1000 were submitted; the call for lines 1001–1005 was refused, so nothing from it on was submitted/,
    );
    // The first call (lines 1–1000) went through; the second was all or nothing.
    expect(await listRun("refused")).toHaveLength(1000);
  });

  it("says nothing was submitted only when no call reached a server", async () => {
    const lines = [{ cluster: "cli-bulk", argv: ["true"] }];
    const result = await cli(
      ["--server", `127.0.0.1:${await freePort()}`, "action", "submit", "--from", "-"],
      ndjson(lines),
    );
    expect(result.code).toBe(3);
    expect(result.stderr).toMatch(
      /\nthe call for line 1 never reached the server, so nothing from it on was submitted/,
    );
  });
});
