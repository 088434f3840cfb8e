import { appendFileSync, mkdtempSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterAll, describe, expect, it } from "vitest";
import { createFileReloader } from "../../src/auth/file-reloader.js";
import { loadReloadingPolicy } from "../../src/auth/policy.js";

const dir = mkdtempSync(join(tmpdir(), "leasehold-reloader-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const log = pino({ level: "silent" });

/** A reloader of one text file that records what it applies. */
function follow(name: string, first: string) {
  const file = join(dir, name);
  writeFileSync(file, first);
  const applied: string[] = [];
  const reloader = createFileReloader({
    files: [file],
    initial: [Buffer.from(first)],
    parse: ([content]) => content?.toString("utf8") ?? "",
    apply: (text) => void applied.push(text),
    log,
    what: "test file",
    pollMs: 0,
  });
  return { file, applied, reloader };
}

describe("file reloader", () => {
  it("does not apply a file while it is being written, and applies it once two looks find it the same", async () => {
    const { file, applied, reloader } = follow("growing.txt", "first\n");
    // The writer has written part of the new file when the poll looks.
    writeFileSync(file, "second, part one\n");
    expect(await reloader.reload()).toBe("pending");
    appendFileSync(file, "second, part two\n");
    expect(await reloader.reload()).toBe("pending");
    expect(applied).toEqual([]);
    // Nothing moved since the last look: the file is complete.
    expect(await reloader.reload()).toBe("applied");
    expect(applied).toEqual(["second, part one\nsecond, part two\n"]);
    expect(await reloader.reload()).toBe("unchanged");
    reloader.close();
  });

  it("waits again when the file was written between two looks even with the same contents", async () => {
    const { file, applied, reloader } = follow("rewritten.txt", "first\n");
    writeFileSync(file, "second\n");
    expect(await reloader.reload()).toBe("pending");
    // Written again (same bytes, later modification time): the writer is still at work.
    utimesSync(file, new Date(), new Date(Date.now() + 5000));
    expect(await reloader.reload()).toBe("pending");
    expect(await reloader.reload()).toBe("applied");
    expect(applied).toEqual(["second\n"]);
    reloader.close();
  });

  it("forgets a change that is undone before it was applied", async () => {
    const { file, applied, reloader } = follow("undone.txt", "first\n");
    writeFileSync(file, "half");
    expect(await reloader.reload()).toBe("pending");
    writeFileSync(file, "first\n");
    expect(await reloader.reload()).toBe("unchanged");
    expect(await reloader.reload()).toBe("unchanged");
    expect(applied).toEqual([]);
    reloader.close();
  });

  it("does not put in force a policy cut short before an agent binding's worker_ids line", async () => {
    const file = join(dir, "policy.yaml");
    const whole = [
      "bindings:",
      "  - principals: [agent-a]",
      "    role: agent",
      "    clusters: [a]",
      '    worker_ids: "a-*"',
      "",
    ].join("\n");
    writeFileSync(file, "bindings: []\n");
    const policy = loadReloadingPolicy(file, log, { pollMs: 0 });
    // What a look can read while the writer is between the clusters line and the worker_ids line:
    // valid, and with worker_ids' default "*" it would let agent-a take any worker id of cluster a.
    writeFileSync(file, whole.slice(0, whole.indexOf("    worker_ids")));
    expect(await policy.reload()).toBe("pending");
    expect(policy.bindingsOf("agent-a")).toEqual([]);
    writeFileSync(file, whole);
    expect(await policy.reload()).toBe("pending");
    expect(policy.bindingsOf("agent-a")).toEqual([]);
    expect(await policy.reload()).toBe("applied");
    expect(policy.bindingsOf("agent-a").map((b) => b.workerIds)).toEqual(["a-*"]);
    policy.close();
  });
});
