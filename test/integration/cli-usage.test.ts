import { execFile } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { type AddressInfo, createServer } from "node:net";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { createProgram } from "../../src/main.js";
import { buildCommit } from "../../src/version.js";
import { freshPostgresDatabase, runsDriverNeutralTests } from "../helpers/database.js";
import { freePort } from "../helpers/ports.js";
import { runCli as cli, runLeasehold } from "../helpers/process.js";

/**
 * `leasehold serve <args>` on a throw-away PGlite, or on the PostgreSQL at
 * `databaseUrl`, run to its end: its exit code, stderr and log lines.
 */
async function serveUntilExit(
  args: string[],
  databaseUrl?: string,
): Promise<{ code: number | string; stderr: string; logs: Record<string, unknown>[] }> {
  const server = runLeasehold(
    ["serve", ...(databaseUrl ? [] : ["--data-dir", "memory://"]), ...args],
    databaseUrl,
  );
  let stderr = "";
  server.child.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString("utf8");
  });
  // Its output may still be on its way when it exits: every line is read once its pipes close.
  const closed = once(server.child, "close");
  try {
    const code = await server.exited;
    await closed;
    return { code, stderr, logs: server.logs };
  } finally {
    server.child.kill("SIGKILL");
  }
}

const { version } = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as {
  version: string;
};
/** The commit `npm run build` recorded for dist/ (version.ts, recordBuild), read when a test needs it. */
const builtCommit = () =>
  (
    JSON.parse(readFileSync(new URL("../../dist/build-info.json", import.meta.url), "utf8")) as {
      commit: string;
    }
  ).commit;

// Every case spawns a CLI process (a second or more on a loaded machine): the timeout is a hang guard.
describe.runIf(runsDriverNeutralTests())(
  "leasehold --version, and the flags refused before it connects or serves",
  { timeout: 60_000 },
  () => {
    it("prints the package's version and the commit the build was made from with --version and -V, and exits 0", async () => {
      const built = builtCommit();
      for (const flag of ["--version", "-V"]) {
        expect(await cli([flag])).toEqual({ code: 0, stdout: `${version} (commit ${built})\n`, stderr: "" });
      }
      // `npm run build` recorded the checkout's commit (this is one), with -dirty for local changes.
      expect(built).toMatch(/^[0-9a-f]{7,}(-dirty)?$/);
      // Read from src/ here (vitest), which asks git for the checkout's commit now.
      expect(createProgram().version()).toBe(`${version} (commit ${buildCommit()})`);
      expect((await cli(["--help"])).stdout).toMatch(/-V, --version/);
    });

    it("runs the CLI when node runs dist/main.js itself, not only through bin/leasehold.js", async () => {
      const main = fileURLToPath(new URL("../../dist/main.js", import.meta.url));
      const run = (args: string[]) =>
        new Promise<{ code: number; stdout: string; stderr: string }>((resolve) => {
          execFile(process.execPath, [main, ...args], (error, stdout, stderr) =>
            resolve({ code: error ? ((error as { code?: number }).code ?? 1) : 0, stdout, stderr }),
          );
        });
      // It exited 0 without a word: the file only exported `main`.
      expect(await run(["--version"])).toEqual({
        code: 0,
        stdout: `${version} (commit ${builtCommit()})\n`,
        stderr: "",
      });
      expect(await run(["action", "bogus"])).toMatchObject({
        code: 2,
        stderr: expect.stringContaining("unknown command 'bogus'"),
      });
    });

    it("says a required option is missing in its own words, exits 2, and marks such options in --help", async () => {
      expect(await cli(["lease", "create"])).toEqual({
        code: 2,
        stdout: "",
        stderr: "leasehold: required option '--runtime <cluster>' not specified\n",
      });
      expect(await cli(["action", "list", "--bogus"])).toMatchObject({
        code: 2,
        stderr: "leasehold: unknown option '--bogus'\n",
      });
      // A command timeout Node's timers cannot hold (24.8 days) would kill the command at once.
      expect(await cli(["action", "submit", "--cluster", "x", "--timeout", "3000000", "--", "true"])).toEqual(
        {
          code: 2,
          stdout: "",
          stderr:
            "leasehold: option '--timeout <seconds>' argument '3000000' is invalid. expected 1 to 2147483 seconds\n",
        },
      );
      const help = (await cli(["agent", "--help"])).stdout;
      expect(help).toMatch(/--cluster <name> +the cluster this worker belongs to \(required\)/);
      expect(help).not.toMatch(/--worker-id[^\n]*\(required\)/);
      // The variables a command can read its lease from, where an operator looks.
      expect(help.replace(/\s+/g, " ")).toMatch(
        /LEASEHOLD_ACTION_ID \(the action's id\) and LEASEHOLD_EPOCH/,
      );
    });

    it("refuses a duration flag too long for its request, naming the flag and the limit, before any call", async () => {
      const huge = "999999999999999999999s";
      expect(await cli(["lease", "create", "--runtime", "C", "--ttl", huge])).toEqual({
        code: 2,
        stdout: "",
        stderr: `leasehold: --ttl: must be at most 315576000000s, about 10,000 years (got "${huge}")\n`,
      });
      expect(await cli(["lease", "wait", "L", "--timeout", huge])).toEqual({
        code: 2,
        stdout: "",
        stderr: `leasehold: --timeout: must be at most 315576000000s, about 10,000 years (got "${huge}")\n`,
      });
      expect(await cli(["lease", "wait", "L", "--timeout", "25h"])).toEqual({
        code: 2,
        stdout: "",
        stderr: 'leasehold: --timeout: must be at most 24h (the longest wait the server takes) (got "25h")\n',
      });
      expect(await cli(["lease", "collect-outputs", "L", "--timeout", "2h"])).toMatchObject({
        code: 2,
        stderr: expect.stringContaining("--timeout: must be at most 1h"),
      });
      // Not the server's default of 60s, silently.
      expect(await cli(["lease", "collect-outputs", "L", "--timeout", "0"])).toEqual({
        code: 2,
        stdout: "",
        stderr:
          "leasehold: --timeout: must be more than 0 (0 would mean the server's default, 60s); give how long to wait, e.g. 60s\n",
      });
    });

    it("says that the command of action submit goes after -- when commander took its option for submit's", async () => {
      expect(await cli(["action", "submit", "--cluster", "east", "ls", "-la"])).toEqual({
        code: 2,
        stdout: "",
        stderr:
          "leasehold: unknown option '-la'\n" +
          "(the command to run goes after --: leasehold action submit --cluster east -- ls -la)\n",
      });
      // The line it suggests keeps submit's options, and quotes what the shell would split.
      const quoted = await cli([
        "action",
        "submit",
        "--label",
        "a=b",
        "--cluster",
        "x",
        "echo",
        "it's",
        "-n",
      ]);
      expect(quoted.stderr).toContain(
        "(the command to run goes after --: leasehold action submit --cluster x --label a=b -- echo 'it'\\''s' -n)",
      );
      // Before any word of a command, an unknown option is more likely a mistyped one: no such hint.
      expect(await cli(["action", "submit", "--cluster", "east", "--bogus", "ls"])).toMatchObject({
        code: 2,
        stderr: "leasehold: unknown option '--bogus'\n",
      });
    });

    it("serve names the lease TTL flag that was given when the other one's default conflicts with it", async () => {
      expect(await cli(["serve", "--data-dir", "memory://", "--lease-default-ttl", "48h"])).toEqual({
        code: 2,
        stdout: "",
        stderr:
          "leasehold: --lease-default-ttl: 48h is longer than --lease-max-ttl (24h, the default); raise --lease-max-ttl too\n",
      });
      expect(await cli(["serve", "--data-dir", "memory://", "--lease-max-ttl", "30m"])).toMatchObject({
        code: 2,
        stderr: expect.stringContaining(
          "--lease-max-ttl: 30m is shorter than --lease-default-ttl (1h, the default)",
        ),
      });
    });

    it("refuses a malformed --server address with exit 2, naming the flag and the form it takes", async () => {
      const expected = /expected host:port or \[ipv6\]:port, e\.g\. 127\.0\.0\.1:50051/;
      // An empty --server (an unset variable in a script) is not taken for the default address.
      expect(await cli(["--server", "", "action", "list"])).toEqual({
        code: 2,
        stdout: "",
        stderr: "leasehold: --server: must not be empty; omit it for 127.0.0.1:50051\n",
      });
      const badPort = await cli(["--server", "127.0.0.1:abc", "action", "list"]);
      expect(badPort.code).toBe(2);
      expect(badPort.stderr).toMatch(
        /^leasehold: --server: "127\.0\.0\.1:abc" has port "abc", not a whole number/,
      );
      expect(badPort.stderr).toMatch(expected);
      // Each address of a list is checked, and the agent checks them too, before it starts.
      const inList = await cli(["--server", "127.0.0.1:1,localhost:70000", "clusters", "list"]);
      expect(inList).toMatchObject({ code: 2, stderr: expect.stringMatching(/--server: "localhost:70000"/) });
      const agent = await cli(["--server", "::1:50051", "agent", "--cluster", "c", "--allow-any-command"]);
      expect(agent).toMatchObject({
        code: 2,
        stderr: expect.stringMatching(/--server: "::1:50051" .*an IPv6 address goes in brackets/),
      });
      const grace = await cli(["agent", "--cluster", "c", "--allow-any-command", "--kill-grace", "soon"]);
      expect(grace).toMatchObject({
        code: 2,
        stderr: expect.stringContaining(
          '--kill-grace: must be a duration like 500ms, 10s or 2m (got "soon")',
        ),
      });
      const drain = await cli(["agent", "--cluster", "c", "--allow-any-command", "--drain-timeout", "25h"]);
      expect(drain).toMatchObject({
        code: 2,
        stderr: expect.stringContaining('--drain-timeout: must be at most 24h (got "25h")'),
      });
      const noPort = await cli(["--server", "localhost", "events", "--follow"]);
      expect(noPort).toMatchObject({ code: 2, stderr: expect.stringMatching(/"localhost" has no port/) });
      // The forms grpc-js dials are still dialed: nothing listens there, so they are unreachable (3).
      for (const address of ["[::1]:1", "dns:///127.0.0.1:1", "unix:/nonexistent/leasehold.sock"]) {
        expect(await cli(["--server", address, "clusters", "list"])).toMatchObject({
          code: 3,
          stderr: expect.stringContaining(`cannot reach the server at ${address}`),
        });
      }
    });

    it("serve names the flag whose port another process uses, and exits without a stack trace", async () => {
      const taken = createServer();
      await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
      const address = `127.0.0.1:${(taken.address() as AddressInfo).port}`;
      try {
        const grpc = await serveUntilExit(["--listen", address, "--metrics-listen", "off"]);
        expect(grpc.code).toBe(2);
        expect(grpc.stderr).toMatch(
          new RegExp(`^leasehold: --listen: cannot listen on ${address}: address already in use`, "m"),
        );
        expect(grpc.stderr).not.toMatch(/^\s+at /m);
        // grpc-js's own line about it, which says less than our message, is printed nowhere.
        expect(grpc.stderr).not.toMatch(/No address added/);
        expect(grpc.logs.map((l) => l.msg)).not.toContainEqual(expect.stringMatching(/No address added/));
        const metrics = await serveUntilExit(["--listen", "127.0.0.1:0", "--metrics-listen", address]);
        // A usage error like --listen's: 2, not the 1 of a failure at run time.
        expect(metrics.code).toBe(2);
        expect(metrics.stderr).toMatch(
          new RegExp(`^leasehold: --metrics-listen: cannot listen on ${address}`, "m"),
        );
        expect(metrics.stderr).not.toMatch(/^\s+at /m);
      } finally {
        taken.close();
      }
    });

    it("serve names a --metrics-listen port in use before it waits for the database", async () => {
      const taken = createServer();
      await new Promise<void>((resolve) => taken.listen(0, "127.0.0.1", resolve));
      const address = `127.0.0.1:${(taken.address() as AddressInfo).port}`;
      // Nothing listens there: the server would wait for it until it answers.
      const unreachable = `postgres://postgres@127.0.0.1:${await freePort()}/leasehold`;
      const server = runLeasehold(
        ["serve", "--listen", "127.0.0.1:0", "--metrics-listen", address],
        unreachable,
      );
      let stderr = "";
      server.child.stderr?.on("data", (chunk: Buffer) => {
        stderr += chunk.toString("utf8");
      });
      try {
        const first = await Promise.race([
          server.exited.then((code) => ({ exited: code })),
          server
            .waitForLog((l) => String(l.msg).startsWith("database not reachable"))
            .then(
              () => "waited for the database",
              () => "exited",
            ),
        ]);
        expect(first).toEqual({ exited: 2 });
        expect(stderr).toMatch(new RegExp(`^leasehold: --metrics-listen: cannot listen on ${address}`, "m"));
      } finally {
        server.child.kill("SIGKILL");
        taken.close();
      }
    });

    it("serve on PostgreSQL exits 2 naming --metrics-listen when its host does not resolve", async () => {
      // It was taken for the database lost while starting, and retried forever.
      await using store = await freshPostgresDatabase();
      const served = await serveUntilExit(
        ["--listen", "127.0.0.1:0", "--insecure", "--metrics-listen", "nosuchhost.invalid:9999"],
        store.url,
      );
      expect(served.code).toBe(2);
      expect(served.stderr).toMatch(
        /^leasehold: --metrics-listen: cannot listen on nosuchhost\.invalid:9999: /m,
      );
    });

    it("refuses a gRPC target among several --server addresses, which would be dropped", async () => {
      expect(await cli(["--server", "unix:/a.sock,127.0.0.1:1", "clusters", "list"])).toMatchObject({
        code: 2,
        stderr: expect.stringContaining('"unix:/a.sock" is a gRPC target, which must be the only address'),
      });
    });
  },
);
