import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LeaseService, LeaseState } from "../../src/gen/leasehold/v1/lease_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { runCli as cli } from "../helpers/process.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/** The server's file limit here; its receive limit is 1 MiB more. */
const MAX_FILE = 64 * 1024;
const RECEIVE_LIMIT = MAX_FILE + 1024 * 1024;

/**
 * Files too large for the server: over its receive limit, grpc-js answers
 * before any handler with a bare "Received message larger than max"; the
 * CLI says which file, how large, and which setting refuses it.
 */
describe.runIf(runsDriverNeutralTests())(
  "uploading a file larger than the server accepts",
  { timeout: 120_000 },
  () => {
    let t: TestServer;
    let dir: string;
    let server: string[];
    beforeAll(async () => {
      t = await startTestServer({ config: { maxFileSize: String(MAX_FILE) } });
      server = ["--server", t.address];
      dir = mkdtempSync(join(tmpdir(), "leasehold-upload-limit-"));
      writeFileSync(join(dir, "big.bin"), Buffer.alloc(RECEIVE_LIMIT + 100_000));
      writeFileSync(join(dir, "over.bin"), Buffer.alloc(MAX_FILE + 1));
    });
    afterAll(async () => {
      await t?.[Symbol.asyncDispose]();
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    const size = RECEIVE_LIMIT + 100_000;
    const refusal = `(${size} bytes) is too large for the server: it refuses requests over ${RECEIVE_LIMIT} bytes (its --max-file-size plus 1 MiB)`;

    it("file create names the file, its size and the server's limit", async () => {
      const path = join(dir, "big.bin");
      const created = await cli([...server, "file", "create", path]);
      expect(created).toMatchObject({ code: 1, stdout: "" });
      expect(created.stderr).toContain(`${path} ${refusal}`);
      expect(created.stderr).not.toMatch(/Received message larger than max/);
      // Over --max-file-size but within the receive limit: refused by the server, said the same way.
      const overPath = join(dir, "over.bin");
      const over = await cli([...server, "file", "create", overPath]);
      expect(over).toMatchObject({ code: 1, stdout: "" });
      expect(over.stderr).toContain(
        `${overPath} (${MAX_FILE + 1} bytes) is too large for the server: it accepts files of at most ${MAX_FILE} bytes (its --max-file-size)`,
      );
    });

    it("lease run --test names the fixture, its size and the server's limit, rolls the lease back and exits 2", async () => {
      const manifest = join(dir, "manifest.yaml");
      writeFileSync(
        manifest,
        `runtime: upload-limit
fixtures:
  - path: big.bin
deployment:
  containers: [{name: web, argv: [sleep, "60"]}]
`,
      );
      const run = await cli([...server, "lease", "run", "--test", manifest]);
      expect(run.code).toBe(2);
      const events = run.stdout
        .trim()
        .split("\n")
        .map((line) => JSON.parse(line));
      const error = events.find((e) => e.event === "error");
      expect(error).toMatchObject({ step: "upload_fixtures" });
      expect(error.message).toContain(`fixture "big.bin" ${refusal}`);
      expect(run.stderr).toContain(`fixture "big.bin" ${refusal}`);
      const { lease } = await t.client(LeaseService).getLease({ leaseId: events[0].lease_id });
      expect(lease?.state).toBe(LeaseState.ROLLED_BACK);
    });

    it("lease run --test names a fixture over --max-file-size but within the receive limit, exit 2", async () => {
      const manifest = join(dir, "manifest-over.yaml");
      writeFileSync(
        manifest,
        `runtime: upload-limit
fixtures:
  - path: over.bin
deployment:
  containers: [{name: web, argv: [sleep, "60"]}]
`,
      );
      const run = await cli([...server, "lease", "run", "--test", manifest]);
      expect(run.code).toBe(2);
      const error = run.stdout
        .trim()
        .split("\n")
        .map((line) => JSON.parse(line))
        .find((e) => e.event === "error");
      const said = `fixture "over.bin" (${MAX_FILE + 1} bytes) is too large for the server: it accepts files of at most ${MAX_FILE} bytes (its --max-file-size)`;
      expect(error).toMatchObject({ step: "upload_fixtures" });
      expect(error.message).toContain(said);
      expect(run.stderr).toContain(said);
    });
  },
);
