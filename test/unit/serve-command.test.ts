import { describe, expect, it } from "vitest";
import { EXIT } from "../../src/cli/output.js";
import { serveCommand } from "../../src/cli/serve-command.js";

/** The error of `leasehold serve <args>` with `env` set, as far as its options go (a bad one stops it there). */
async function serveWith(args: string[], env: Record<string, string>) {
  Object.assign(process.env, env);
  try {
    await serveCommand().exitOverride().parseAsync(args, { from: "user" });
    return undefined;
  } catch (error) {
    return error as { message: string; exitCode: number };
  } finally {
    for (const name of Object.keys(env)) delete process.env[name];
  }
}

describe("serve's option errors", () => {
  it("name the environment variable when the bad value came from it", async () => {
    expect(await serveWith([], { LEASEHOLD_GRACE_PERIOD: "1s" })).toMatchObject({
      exitCode: EXIT.usage,
      message: "LEASEHOLD_GRACE_PERIOD (--grace-period): must be at least 2s",
    });
    expect(await serveWith([], { LEASEHOLD_DISPATCH_POLL: "50ms" })).toMatchObject({
      exitCode: EXIT.usage,
      message: "LEASEHOLD_DISPATCH_POLL (--dispatch-poll): must be at least 100ms",
    });
  });

  it("name the flag when the bad value came from the flag, even with the variable set too", async () => {
    expect(await serveWith(["--grace-period", "1s"], { LEASEHOLD_GRACE_PERIOD: "10s" })).toMatchObject({
      exitCode: EXIT.usage,
      message: "--grace-period: must be at least 2s",
    });
  });
});
