import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { runLeasehold } from "../helpers/process.js";

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL("../..", import.meta.url));

/** A plain JavaScript agent and client, as a user of the installed package writes them. */
const USER_SCRIPT = `
import { createAgent } from "leasehold/agent";
import { ActionService, ActionState, connectClient } from "leasehold/client";

const address = process.argv[2];
const agent = createAgent({
  address,
  cluster: "east",
  workerId: "plain-js",
  handler: async (ctx) => ({ doubled: ctx.payload.n * 2 }),
});
const actions = await connectClient(ActionService, address);
const { action } = await actions.submitAction({ cluster: "east", payload: { n: 21 } });
for await (const { action: now } of actions.watchAction({ actionId: action.id })) {
  if (now.state === ActionState.SUCCEEDED) {
    console.log(JSON.stringify({ state: ActionState[now.state], output: now.output }));
    break;
  }
}
actions.close();
await agent.close();
`;

// What `npm pack` ships does not depend on the database: checked once, in the PGlite run.
describe.runIf(inject("driver") === "pglite")("the npm package", () => {
  let dir = "";
  let server: ReturnType<typeof runLeasehold> | undefined;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-package-"));
    // dist/ is current (the global setup builds it); prepare would only build it again.
    await run("npm", ["pack", "--ignore-scripts", "--pack-destination", dir], { cwd: ROOT });
    const tarball = readdirSync(dir).find((f) => f.endsWith(".tgz"));
    if (!tarball) throw new Error(`npm pack wrote no tarball into ${dir}`);
    writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "user", private: true, type: "module" }));
    // The dependencies come from npm's cache, filled by the `npm ci` that preceded the tests.
    await run("npm", ["install", "--prefer-offline", "--no-audit", "--no-fund", `./${tarball}`], {
      cwd: dir,
    });
  }, 180_000);

  afterAll(async () => {
    server?.child.kill("SIGKILL");
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("installs into an empty folder, serves with npx, and its SDK works from plain JavaScript", async () => {
    // `npx leasehold` from the user's folder: the installed bin, not this checkout's.
    const bin = join(dir, "node_modules", ".bin", "leasehold");
    server = runLeasehold(
      ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--data-dir", "memory://"],
      undefined,
      { command: bin, cwd: dir },
    );
    const serving = await server.waitForLog((l) => l.msg === "leasehold serving");
    const address = `127.0.0.1:${serving.port}`;

    writeFileSync(join(dir, "agent.mjs"), USER_SCRIPT);
    const { stdout } = await run(process.execPath, ["agent.mjs", address], { cwd: dir, timeout: 60_000 });
    expect(JSON.parse(stdout.trim())).toEqual({ state: "SUCCEEDED", output: { doubled: 42 } });

    const help = await run(bin, ["--help"], { cwd: dir });
    expect(help.stdout).toContain("Usage: leasehold");
  }, 120_000);
});
