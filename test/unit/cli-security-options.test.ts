import { Command } from "commander";
import { afterEach, describe, expect, it } from "vitest";
import { type GlobalOptions, globals } from "../../src/cli/output.js";
import { createProgram } from "../../src/main.js";

/** Runs `leasehold <args>` with a `probe` subcommand (options `--tls-cert`, `--tls-key`, `--port`) added. */
async function parse(args: string[]) {
  const program = createProgram();
  const seen: { own?: Record<string, unknown>; globals?: GlobalOptions } = {};
  program.addCommand(
    new Command("probe")
      .option("--tls-cert <file>", "the server's own certificate, as serve has")
      .option("--tls-key <file>")
      .option("--port <n>", "", (v) => Number(v))
      .action((own: Record<string, unknown>, command: Command) => {
        seen.own = own;
        seen.globals = globals(command);
      }),
  );
  await program.parseAsync(args, { from: "user" });
  return seen;
}

const saved = { ...process.env };
afterEach(() => {
  for (const key of Object.keys(process.env)) if (!(key in saved)) delete process.env[key];
  Object.assign(process.env, saved);
});

describe("the global security options", () => {
  it("gathers every security flag, before or after the subcommand", async () => {
    const { globals: g } = await parse([
      "--tls-ca",
      "ca.pem",
      "--tls-server-name",
      "leasehold.test",
      "probe",
      "--token-file",
      "/run/token",
      "--tls",
    ]);
    expect(g?.security).toEqual({
      tlsCa: "ca.pem",
      tlsCert: undefined,
      tlsKey: undefined,
      tls: true,
      serverName: "leasehold.test",
      token: undefined,
      tokenFile: "/run/token",
    });
  });

  it("reads them from LEASEHOLD_* variables; an empty variable counts as unset", async () => {
    Object.assign(process.env, {
      LEASEHOLD_TOKEN: "from-env",
      LEASEHOLD_TLS_CA: "",
      LEASEHOLD_TLS: "",
      LEASEHOLD_TLS_CERT: "client.pem",
      LEASEHOLD_TLS_KEY: "client.key",
    });
    const { globals: g, own } = await parse(["probe"]);
    expect(g?.security).toMatchObject({
      token: "from-env",
      tlsCa: undefined,
      tls: false,
      tlsCert: "client.pem",
      tlsKey: "client.key",
    });
    // The subcommand's own options read their own variables, not the clients'.
    expect(own).toEqual({});
    process.env.LEASEHOLD_TLS = "1";
    expect((await parse(["probe"])).globals?.security.tls).toBe(true);
    // As LEASEHOLD_INSECURE reads: these say off, these on, and anything else is a usage error.
    for (const off of ["0", "false", " No ", "off", "OFF"]) {
      process.env.LEASEHOLD_TLS = off;
      expect((await parse(["probe"])).globals?.security.tls).toBe(false);
    }
    for (const on of ["true", "Yes", "on"]) {
      process.env.LEASEHOLD_TLS = on;
      expect((await parse(["probe"])).globals?.security.tls).toBe(true);
    }
    process.env.LEASEHOLD_TLS = "enabled";
    await expect(parse(["probe"])).rejects.toThrow('LEASEHOLD_TLS: "enabled" is neither on nor off');
  });

  it("says in --help which values of LEASEHOLD_TLS and LEASEHOLD_INSECURE turn them on, off, or exit 2", async () => {
    const said =
      "the variable turns it on with 1, true, yes or on, leaves it off when empty, 0, false, no or off, and any other value exits 2";
    expect(createProgram().helpInformation().replace(/\s+/g, " ")).toContain(said);
    const serve = createProgram().commands.find((c) => c.name() === "serve");
    expect(serve?.helpInformation().replace(/\s+/g, " ")).toContain(
      `(anyone who can reach the port can call every method); ${said}`,
    );
    // What the words say is what the code does.
    for (const [value, on] of [
      ["on", true],
      ["yes", true],
      ["off", false],
      ["no", false],
      ["", false],
    ] as const) {
      process.env.LEASEHOLD_TLS = value;
      expect((await parse(["probe"])).globals?.security.tls).toBe(on);
    }
    process.env.LEASEHOLD_TLS = "maybe";
    await expect(parse(["probe"])).rejects.toMatchObject({ exitCode: 2 });
  });

  it("gives a subcommand's own --tls-cert/--tls-key (serve's certificate) to the subcommand, not to the globals", async () => {
    const { own, globals: g } = await parse([
      "--server",
      "127.0.0.1:1",
      "probe",
      "--tls-cert",
      "server.pem",
      "--tls-key",
      "server.key",
      "--port",
      "7",
    ]);
    expect(own).toEqual({ tlsCert: "server.pem", tlsKey: "server.key", port: 7 });
    expect(g?.security.tlsCert).toBeUndefined();
    expect(g?.security.tlsKey).toBeUndefined();
    expect(g?.server).toBe("127.0.0.1:1");
  });

  it("documents every flag and its variable in --help", () => {
    const help = createProgram().helpInformation().replace(/\s+/g, " ");
    for (const [flag, variable] of [
      ["--tls-ca <file>", "LEASEHOLD_TLS_CA"],
      ["--tls-cert <file>", "LEASEHOLD_TLS_CERT"],
      ["--tls-key <file>", "LEASEHOLD_TLS_KEY"],
      ["--tls ", "LEASEHOLD_TLS"],
      ["--tls-server-name <name>", "LEASEHOLD_TLS_SERVER_NAME"],
      ["--token <token>", "LEASEHOLD_TOKEN"],
      ["--token-file <file>", "LEASEHOLD_TOKEN_FILE"],
    ]) {
      expect(help).toContain(flag);
      expect(help).toContain(`env: ${variable})`);
    }
  });
});
