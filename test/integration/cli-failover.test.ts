import { describe, expect, it, onTestFinished } from "vitest";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { cuttableProxy } from "../helpers/cuttable-proxy.js";
import { freshPostgresDatabase, runsPostgresTests } from "../helpers/database.js";
import { healthClient } from "../helpers/grpc-peers.js";
import { runCli } from "../helpers/process.js";
import { startTestServer } from "../helpers/server.js";

/**
 * Two servers of one database, the first of them cut off from it: it still
 * accepts connections and answers, refusing calls unserved (DATABASE_UNREACHABLE).
 * The CLI and the client library, given both addresses, take such a call to
 * the other server; they stayed on the first and failed.
 */
describe.runIf(runsPostgresTests())("several --server addresses, one server without its database", () => {
  it("serves the CLI's calls from the server that has its database", async () => {
    const store = await freshPostgresDatabase();
    const url = new URL(store.url as string);
    const proxy = await cuttableProxy(url.hostname, Number(url.port || 5432));
    url.host = `127.0.0.1:${proxy.port}`;
    const config = { gracePeriod: "3s", heartbeatInterval: "500ms" };
    const cutOff = await startTestServer({ store: { ...store, url: url.toString() }, config });
    const fine = await startTestServer({ store, config });
    const health = healthClient(cutOff.address);
    onTestFinished(async () => {
      health.close();
      await cutOff[Symbol.asyncDispose]();
      await fine[Symbol.asyncDispose]();
      proxy.close();
      await store.drop();
    });
    proxy.cut();
    await expect.poll(() => health.check(""), { timeout: 15_000 }).toBe("NOT_SERVING");

    const server = ["--server", `${cutOff.address},${fine.address}`];
    const submitted = await runCli([
      ...server,
      "--json",
      "action",
      "submit",
      "--cluster",
      "east",
      "--request-id",
      "f-1",
      "--",
      "true",
    ]);
    expect(submitted).toMatchObject({ code: 0, stderr: "" });
    const id = JSON.parse(submitted.stdout).action.id as string;
    const got = await runCli([...server, "--json", "action", "get", id]);
    expect(got.code).toBe(0);
    expect(JSON.parse(got.stdout).action.id).toBe(id);
    // Alone, the cut-off server refuses as before: nothing else to go to.
    const alone = await runCli(["--server", cutOff.address, "action", "get", id]);
    expect(alone.code).toBe(3);
    expect(alone.stderr).toMatch(/the database cannot be reached/);
    expect((await fine.client(ActionService).getAction({ actionId: id })).action?.requestId).toBe("f-1");
  });
});
