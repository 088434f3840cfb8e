import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { createProgram } from "../../src/main.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { runCli as cli } from "../helpers/process.js";

const { version } = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as {
  version: string;
};

// Every case spawns a CLI process (a second or more on a loaded machine): the timeout is a hang guard.
describe.runIf(runsDriverNeutralTests())(
  "the leasehold command line before it connects",
  { timeout: 60_000 },
  () => {
    it("prints the package's version with --version and -V, and exits 0", async () => {
      for (const flag of ["--version", "-V"]) {
        expect(await cli([flag])).toEqual({ code: 0, stdout: `${version}\n`, stderr: "" });
      }
      // Read from src/ here (vitest), as from dist/ in the processes above.
      expect(createProgram().version()).toBe(version);
      expect((await cli(["--help"])).stdout).toMatch(/-V, --version/);
    });
  },
);
