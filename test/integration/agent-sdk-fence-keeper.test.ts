import { existsSync, mkdtempSync, readFileSync, rmSync, watch, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { runSdkCommandAgent } from "../helpers/process.js";
import { startTestServer } from "../helpers/server.js";

/** Whether a process is gone (or a zombie: killed, not yet reaped). */
const ended = (pid: number) => {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return true;
  }
};

/** Resolves once `file` exists (watching its directory, not polling). */
function appeared(file: string): Promise<void> {
  return new Promise((resolve) => {
    const look = () => {
      if (!existsSync(file)) return;
      watcher.close();
      resolve();
    };
    const watcher = watch(join(file, ".."), look);
    look();
  });
}

describe.skipIf(process.platform !== "linux")("an SDK agent with commandHandler and a fence keeper", () => {
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  afterEach(async () => {
    for (const fn of cleanups.splice(0).reverse()) await fn();
  });

  it("leaves no command running when it is killed with SIGKILL", async () => {
    const t = await startTestServer({ config: { heartbeatInterval: "500ms", gracePeriod: "3s" } });
    cleanups.push(() => t[Symbol.asyncDispose]());
    const dir = mkdtempSync(join(tmpdir(), "leasehold-sdk-keeper-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const workDir = join(dir, "work");
    const pidFile = join(dir, "pid");
    const done = join(dir, "done");
    // Ends the command's loop should the keeper not have killed it.
    cleanups.push(() => writeFileSync(done, ""));
    const agent = runSdkCommandAgent([t.address, "east", "sdk-keeper", workDir]);
    cleanups.push(() => agent.child.kill("SIGKILL"));
    await agent.waitForLine((l) => l.type === "connected");
    await t.client(ActionService).submitAction({
      cluster: "east",
      payload: {
        argv: [
          "sh",
          "-c",
          `echo $$ > "$0.new"; mv "$0.new" "$0"; while [ ! -e "$1" ]; do sleep 0.1; done`,
          pidFile,
          done,
        ],
      } as never,
    });
    await appeared(pidFile);
    const pid = Number(readFileSync(pidFile, "utf8"));
    // The registry records the group after telling the keeper: once the record is there, both know.
    await appeared(join(workDir, ".processes", "sdk-keeper", String(pid)));
    expect(ended(pid)).toBe(false);
    agent.child.kill("SIGKILL");
    await expect.poll(() => ended(pid), { timeout: 30_000, interval: 50 }).toBe(true);
  }, 60_000);
});
