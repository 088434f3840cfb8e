import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { type Browser, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { ActionService, ActionState } from "../../src/gen/leasehold/v1/action_pb.js";
import { EventKind, EventService } from "../../src/gen/leasehold/v1/event_pb.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { createClient } from "../../src/rpc/client.js";
import { freshStore, type TestStore } from "../helpers/database.js";
import { type LeaseholdProcess, runLeasehold, runReferenceAgent } from "../helpers/process.js";

/**
 * The browser that drives the console: Debian's `chromium` (what `.ci/run`
 * installs), or CHROMIUM_PATH. playwright-core downloads no browser.
 */
const CHROMIUM = [process.env.CHROMIUM_PATH, "/usr/bin/chromium", "/usr/bin/chromium-browser"].find(
  (path): path is string => path !== undefined && path !== "" && existsSync(path),
);
if (!CHROMIUM && !process.env.CI) {
  // Loud on a developer's machine; in CI the test below fails instead.
  console.warn("console-browser.test.ts: no chromium found (apt-get install chromium, or set CHROMIUM_PATH)");
}

/**
 * Where the screenshots go: LEASEHOLD_SCREENSHOTS (`docs` refreshes the
 * README's), else a temporary directory, made when the suite runs (it is
 * collected, and skipped, in the PostgreSQL run too) and removed after it.
 */
const shotsDir = () =>
  process.env.LEASEHOLD_SCREENSHOTS
    ? resolve(process.env.LEASEHOLD_SCREENSHOTS)
    : mkdtempSync(join(tmpdir(), "leasehold-console-shots-"));

/**
 * The console in a real browser against real processes: a server with
 * --console-listen, two reference agents, a long action; the agent holding
 * it is killed with SIGKILL, and the page shows it in grace with a countdown,
 * then the expiry and the epoch-2 grant in the action's timeline.
 */
// Once, in the PGlite run: the page only calls the API, which console-api.test.ts checks on both
// databases.
describe.runIf(inject("driver") === "pglite" && Boolean(CHROMIUM || process.env.CI))(
  "the console in a browser",
  () => {
    let store: TestStore;
    let server: LeaseholdProcess;
    let browser: Browser | undefined;
    let page: Page;
    let consoleUrl: string;
    let address: string;
    const processes: { kill(signal?: NodeJS.Signals): unknown }[] = [];
    let shots = "";
    /** The agents' work directories. */
    let agentsDir = "";
    // Unique, to find the orphaned command of the killed agent afterwards.
    const sleepFor = `${400 + Math.floor(Math.random() * 1000)}`;

    beforeAll(async () => {
      if (!CHROMIUM) throw new Error("no chromium found: apt-get install chromium, or set CHROMIUM_PATH");
      shots = shotsDir();
      agentsDir = mkdtempSync(join(tmpdir(), "leasehold-console-agents-"));
      store = await freshStore();
      server = runLeasehold(
        [
          "serve",
          "--listen",
          "127.0.0.1:0",
          "--console-listen",
          "127.0.0.1:0",
          "--metrics-listen",
          "off",
          "--data-dir",
          store.dataDir,
          "--grace-period",
          "8s",
          "--heartbeat-interval",
          "1s",
        ],
        store.url,
      );
      processes.push(server.child);
      const serving = await server.waitForLog((l) => l.msg === "leasehold serving");
      address = `127.0.0.1:${serving.port}`;
      consoleUrl = String(serving.console);
      expect(consoleUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/$/);
      browser = await chromium.launch({ executablePath: CHROMIUM, headless: true });
      page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    });

    afterAll(async () => {
      await browser?.close();
      for (const p of processes.reverse()) p.kill("SIGKILL");
      await new Promise((r) => execFile("pkill", ["-f", `^sleep ${sleepFor}$`], () => r(undefined)));
      await store?.drop();
      if (shots && !process.env.LEASEHOLD_SCREENSHOTS) rmSync(shots, { recursive: true, force: true });
      if (agentsDir) rmSync(agentsDir, { recursive: true, force: true });
    });

    /** Reference agents (`leasehold agent`, one slot each) in `cluster`, connected. */
    async function startAgents(cluster: string, ids: readonly string[]) {
      const agents = new Map<string, LeaseholdProcess>();
      for (const workerId of ids) {
        const agent = await runReferenceAgent({
          server: address,
          cluster,
          workerId,
          workDir: join(agentsDir, workerId),
          slots: 1,
          allow: ["--allow-command", "sleep *"],
        });
        processes.push(agent.child);
        agents.set(workerId, agent);
      }
      return agents;
    }

    it("shows a connected agent, its loss with a countdown, and the epoch-2 grant in the timeline", async () => {
      const agents = await startAgents("east", ["agent-a", "agent-b"]);

      await page.goto(`${consoleUrl}#/workers?cluster=east`);
      await page.locator('[data-live="live"]').waitFor();
      for (const id of agents.keys()) {
        await page.locator(`tr[data-worker="${id}"][data-state="CONNECTED"]`).waitFor();
      }

      const actions = createClient(ActionService, address);
      try {
        const { action } = await actions.submitAction({
          cluster: "east",
          payload: { argv: ["sleep", sleepFor] },
        });
        const id = action?.id ?? "";
        let holder = "";
        for await (const { action: seen } of actions.watchAction({ actionId: id })) {
          if (seen?.state === ActionState.LEASED) {
            holder = seen.lease?.workerId ?? "";
            break;
          }
        }
        const other = holder === "agent-a" ? "agent-b" : "agent-a";
        // The page shows the lease held, then loses the holder.
        await page.locator(`tr[data-worker="${holder}"] a[href="#/actions/${id}"]`).waitFor();
        agents.get(holder)?.child.kill("SIGKILL");

        const inGrace = page.locator(`tr[data-worker="${holder}"][data-state="IN_GRACE"]`);
        await inGrace.waitFor();
        const countdown = inGrace.locator("[data-countdown]");
        const first = await countdown.textContent();
        expect(first).toMatch(/\d+(\.\d+)? s/);
        // It counts down in place, without a reload.
        await page
          .locator(`tr[data-worker="${holder}"][data-state="IN_GRACE"] [data-countdown]`)
          .filter({ hasNotText: first ?? "" })
          .waitFor();
        mkdirSync(shots, { recursive: true });
        await page.screenshot({
          path: join(shots, "console-workers.png"),
          clip: { x: 0, y: 0, width: 1280, height: 240 },
        });

        // The action's timeline: the expiry of epoch 1 and the grant of epoch 2 to the other agent.
        await page.goto(`${consoleUrl}#/actions/${id}`);
        const timeline = page.locator("ol[data-timeline]");
        await timeline.locator('li[data-kind="LEASE_EXPIRED"][data-epoch="1"]').waitFor({ timeout: 60_000 });
        const regrant = timeline.locator('li[data-kind="LEASE_GRANTED"][data-epoch="2"]');
        await regrant.waitFor();
        expect(await regrant.textContent()).toContain(other);
        await page.locator('[data-action-epoch]:text-is("2")').waitFor();
        expect(await page.locator("[data-action-state]").textContent()).toContain("LEASED");
        await page.screenshot({ path: join(shots, "console-timeline.png"), fullPage: true });

        // The operator cancels it from the page: agent-b's command is killed and the action ends CANCELLED.
        page.once("dialog", (dialog) => void dialog.accept("demo over"));
        await page.getByRole("button", { name: "Cancel" }).click();
        await page.locator('[data-action-state="CANCELLED"]').waitFor();
        await timeline.locator('li[data-kind="ACTION_CANCELLED"]').waitFor();

        // The other pages read the same state: the cluster, the live event feed.
        await page.goto(`${consoleUrl}#/clusters`);
        await page.locator('tr[data-cluster="east"]').waitFor();
        await page.goto(`${consoleUrl}#/events`);
        await page.locator('tr[data-event-seq][data-kind="STREAM_LOST"]').first().waitFor();
        await page.locator('tr[data-event-seq][data-kind="LEASE_EXPIRED"]').first().waitFor();
      } finally {
        actions.close();
      }
    }, 120_000);

    it("shows a partitioned cluster, and the operator resumes its expiries from the page", async () => {
      const agents = await startAgents("west", ["west-1", "west-2", "west-3"]);
      await page.goto(`${consoleUrl}#/clusters`);
      await page.locator('tr[data-cluster="west"][data-health="HEALTHY"]').waitFor();
      // The valve weighs the sessions holding leases: each agent runs one action.
      const actions = createClient(ActionService, address);
      try {
        for (let i = 0; i < 3; i++)
          await actions.submitAction({ cluster: "west", payload: { argv: ["sleep", sleepFor] } });
        await expect
          .poll(
            async () =>
              (await actions.listActions({ cluster: "west", state: ActionState.LEASED })).actions.length,
            {
              timeout: 60_000,
            },
          )
          .toBe(3);
      } finally {
        actions.close();
      }
      // Two of three streams gone at once: the network, not the workers, so expiries pause.
      agents.get("west-1")?.child.kill("SIGKILL");
      agents.get("west-2")?.child.kill("SIGKILL");
      const partitioned = page.locator('tr[data-cluster="west"][data-health="PARTITIONED"]');
      const resume = partitioned.getByRole("button", { name: "Resume expiries" });
      await resume.waitFor({ timeout: 60_000 });
      page.once("dialog", (dialog) => void dialog.accept("west-1 and west-2 were decommissioned"));
      await resume.click();
      // Resumed: the lost sessions are reaped, the cluster is no longer partitioned, the button goes.
      await page.locator('tr[data-cluster="west"]:not([data-health="PARTITIONED"])').waitFor();
      expect(await page.locator('tr[data-cluster="west"] button').count()).toBe(0);
      // And drains the worker left, from the workers page.
      await page.goto(`${consoleUrl}#/workers?cluster=west`);
      page.once("dialog", (dialog) => void dialog.accept(""));
      await page.locator('tr[data-worker="west-3"]').getByRole("button", { name: "Drain" }).click();
      await page.locator('tr[data-worker="west-3"]').getByText("DRAINING").waitFor();
      // And ends the drain: the Drain button is back.
      page.once("dialog", (dialog) => void dialog.accept("patched"));
      await page.locator('tr[data-worker="west-3"]').getByRole("button", { name: "Undrain" }).click();
      await page
        .locator('tr[data-worker="west-3"]')
        .getByRole("button", { name: "Drain", exact: true })
        .waitFor();
      expect(await page.locator('tr[data-worker="west-3"]').getByText("DRAINING").count()).toBe(0);
      const events = createClient(EventService, address);
      try {
        const { events: resumed } = await events.listEvents({
          cluster: "west",
          kind: EventKind.CLUSTER_EXPIRIES_RESUMED,
        });
        expect(resumed.map((e) => e.message).join("\n")).toContain("west-1 and west-2 were decommissioned");
      } finally {
        events.close();
      }
    }, 120_000);

    it("shows a scope lease with its resources, and its rollback live", async () => {
      const leases = createClient(LeaseService, address);
      const resources = createClient(ResourceService, address);
      try {
        const { lease } = await leases.createLease({ runtime: "east", label: "console-test" });
        const id = lease?.id ?? "";
        const { resource } = await resources.createFile({
          leaseId: id,
          name: "input.txt",
          content: new TextEncoder().encode("hello"),
        });
        await page.goto(`${consoleUrl}#/leases`);
        await page.locator(`tr[data-lease="${id}"][data-state="OPEN"]`).waitFor();
        await page.goto(`${consoleUrl}#/leases/${id}`);
        await page.locator(`[data-resource="${resource?.id}"]`).waitFor();
        expect(await page.locator(`[data-resource="${resource?.id}"]`).textContent()).toContain("input.txt");
        await leases.rollbackLease({ leaseId: id });
        // No reload: the rollback's event refreshes the page.
        await page.locator('[data-lease-state="ROLLED_BACK"]').waitFor();
      } finally {
        leases.close();
        resources.close();
      }
    });
  },
);
