import { once } from "node:events";
import { mkdtempSync, writeFileSync } from "node:fs";
import http2 from "node:http2";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import {
  ActionService,
  GetActionRequestSchema,
  WatchActionRequestSchema,
} from "../../src/gen/leasehold/v1/action_pb.js";
import { type ConnectionRefusal, defaultMaxConnections } from "../../src/rpc/connection-limits.js";
import { bind, createRpcServer } from "../../src/rpc/server.js";
import { grpcFrame, rawCall } from "../helpers/raw-grpc.js";
import { startTestServer } from "../helpers/server.js";

/** The HTTP/2 client preface and an empty SETTINGS frame: the server answers with its own SETTINGS. */
const PREFACE = Buffer.concat([
  Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
  Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0]),
]);

/**
 * A bare connection from `localAddress`: "served" once the server's first
 * HTTP/2 frame arrives, "closed" if the server closes it before.
 */
async function connect(port: number, localAddress = "127.0.0.1") {
  const socket = net.connect({ host: "127.0.0.1", port, localAddress });
  socket.on("error", () => {});
  await once(socket, "connect");
  socket.write(PREFACE);
  const outcome = await new Promise<"served" | "closed">((resolve) => {
    socket.once("data", () => resolve("served"));
    socket.once("close", () => resolve("closed"));
  });
  return { socket, outcome };
}

/** grpc.health.v1.Health/Check over node:http2 from `localAddress`: the grpc-status it ends with. */
async function healthCheck(port: number, localAddress: string): Promise<string | undefined> {
  const session = http2.connect(`http://127.0.0.1:${port}`, {
    createConnection: () => net.connect({ host: "127.0.0.1", port, localAddress }),
  });
  session.on("error", () => {});
  try {
    const stream = session.request({
      ":method": "POST",
      ":path": "/grpc.health.v1.Health/Check",
      "content-type": "application/grpc",
      te: "trailers",
    });
    stream.on("error", () => {});
    // One message: not compressed, 0 bytes (an empty HealthCheckRequest).
    stream.end(Buffer.from([0, 0, 0, 0, 0]));
    stream.resume();
    const [trailers] = (await once(stream, "trailers")) as [http2.IncomingHttpHeaders];
    return trailers["grpc-status"] as string | undefined;
  } finally {
    session.close();
  }
}

/**
 * The connections the rpc server takes: a bound per peer address and one for
 * the process (src/rpc/connection-limits.ts), so that a peer opening
 * connections without end cannot take every file descriptor.
 */
describe("connection limits", () => {
  const sockets: net.Socket[] = [];
  let close: (() => Promise<void>) | undefined;
  afterEach(async () => {
    for (const s of sockets.splice(0)) s.destroy();
    await close?.();
    close = undefined;
  });

  async function start(limits: { maxConnectionsPerAddress?: number; maxConnections?: number }, held = false) {
    const logged: { msg: string; address?: string }[] = [];
    const log = pino({ level: "warn" }, { write: (line: string) => logged.push(JSON.parse(line)) });
    const refused: ConnectionRefusal[] = [];
    let open = 0;
    const closedOne: (() => void)[] = [];
    const server = await createRpcServer("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), {
      log,
      // With `held`, WatchAction streams stay open until their client ends them.
      services: [
        bind(
          ActionService,
          held
            ? {
                async *watchAction(_request, ctx) {
                  await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
                  yield* [];
                },
              }
            : {},
        ),
      ],
      ...limits,
      connections: {
        opened: () => open++,
        closed: () => {
          open--;
          for (const f of closedOne.splice(0)) f();
        },
        refused: (reason) => refused.push(reason),
      },
    });
    server.markServing();
    close = () => server.close();
    const hold = async (localAddress = "127.0.0.1") => {
      const c = await connect(server.port, localAddress);
      sockets.push(c.socket);
      return c;
    };
    const nextClose = () => new Promise<void>((resolve) => closedOne.push(resolve));
    return { port: server.port, logged, refused, hold, nextClose };
  }

  it("closes a connection past an address's share, and takes others from that address once one ends", async () => {
    const s = await start({ maxConnectionsPerAddress: 3 });
    for (let i = 0; i < 3; i++) expect((await s.hold()).outcome).toBe("served");
    const past = await s.hold();
    expect(past.outcome).toBe("closed");
    expect(s.refused).toEqual(["per_address"]);
    expect(s.logged.at(-1)).toMatchObject({
      address: "127.0.0.1",
      msg: "refused a connection from 127.0.0.1: it holds 3, the most one address may (--max-connections-per-address)",
    });
    // Another address still gets its calls answered.
    expect(await healthCheck(s.port, "127.0.0.2")).toBe("0");
    // One of the three ends: that address may connect again.
    const closed = s.nextClose();
    sockets[0]?.destroy();
    await closed;
    expect(await healthCheck(s.port, "127.0.0.1")).toBe("0");
  });

  it("refuses a call past an address's share of open calls at once, and takes others once one ends", async () => {
    // One connection per address: four open calls.
    const s = await start({ maxConnectionsPerAddress: 1 }, true);
    const session = http2.connect(`http://127.0.0.1:${s.port}`);
    session.on("error", () => {});
    try {
      const call = (path: string, bytes: Uint8Array) => rawCall(session, path, bytes);
      const watch = () =>
        call(
          "/leasehold.v1.ActionService/WatchAction",
          grpcFrame(WatchActionRequestSchema, { actionId: "a" }),
        );
      const held = [watch(), watch(), watch(), watch()];
      const past = await watch().status;
      expect(past.code).toBe("8");
      expect(past.message).toMatch(
        /^this address \(127\.0\.0\.1\) has 4 calls open, as many as one address may: end calls/,
      );
      expect(s.logged.at(-1)).toMatchObject({
        msg: "call refused: its address holds as many open calls as one address may",
        address: "127.0.0.1",
        limit: 4,
      });
      // The four are still open, untouched by the refusal.
      for (const h of held) expect(h.stream.closed).toBe(false);
      // One ends: once the server has seen it end, the address may call again (GetAction passes
      // the door, then is not implemented here).
      held[0]?.stream.close(http2.constants.NGHTTP2_CANCEL);
      let code: string | undefined;
      for (let i = 0; i < 500; i++) {
        code = (await call("/leasehold.v1.ActionService/GetAction", new Uint8Array()).status).code;
        if (code !== "8") break;
        await new Promise((r) => setTimeout(r, 10));
      }
      expect(code).toBe("12");
    } finally {
      session.destroy();
    }
  });

  it("counts a call until its answer is sent: a client that reads none gets calls past its share refused, and its answers reset", async () => {
    const logged: { msg: string; reason?: string }[] = [];
    const log = pino({ level: "warn" }, { write: (line: string) => logged.push(JSON.parse(line)) });
    const server = await createRpcServer("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), {
      log,
      // 200 KB answers, past the size always sent; the budget takes one of them.
      services: [
        bind(ActionService, {
          getAction: async (request) => ({
            action: { id: request.actionId, payload: { pad: "x".repeat(200_000) } },
          }),
        }),
      ],
      // One connection per address: four open calls.
      maxConnectionsPerAddress: 1,
      maxUnsentAnswerBytes: 300_000,
      // Long enough that the steps before the resets run within it on a loaded machine.
      requestStallMs: 3000,
    });
    server.markServing();
    close = () => server.close();
    // A client that announces a flow-control window of 0 and never grants more: no answer can be
    // sent to it, only headers.
    const session = http2.connect(`http://127.0.0.1:${server.port}`, { settings: { initialWindowSize: 0 } });
    session.on("error", () => {});
    try {
      const health = () => rawCall(session, "/grpc.health.v1.Health/Check", Buffer.from([0, 0, 0, 0, 0]));
      const getAction = (id: string) =>
        rawCall(
          session,
          "/leasehold.v1.ActionService/GetAction",
          grpcFrame(GetActionRequestSchema, { actionId: id }),
        );
      const answered = (c: ReturnType<typeof rawCall>) =>
        Promise.race([
          once(c.stream, "response"),
          c.status.then((s) => expect.fail(`ended ${s.code}: ${s.message}`)),
        ]);
      const closed = (c: ReturnType<typeof rawCall>) =>
        new Promise<number | undefined>((resolve) => {
          if (c.stream.closed) resolve(c.stream.rstCode);
          else c.stream.once("close", () => resolve(c.stream.rstCode));
        });
      // Handlers answered all three (headers came); none of their answers could be sent.
      const held = [health(), health(), getAction("a")];
      for (const c of held) await answered(c);
      // A second large answer would take the unsent answers past the budget: not sent.
      const big = await getAction("b").status;
      expect(big.code).toBe("8");
      expect(big.message).toMatch(/^the server holds 0\.2 MiB of answers its clients have not read/);
      // The fourth call opens; the fifth finds the address's four calls open, answered or not.
      const fourth = health();
      await answered(fourth);
      const past = await health().status;
      expect(past.code).toBe("8");
      expect(past.message).toMatch(/^this address \(127\.0\.0\.1\) has 4 calls open/);
      // Another address is served meanwhile.
      expect(await healthCheck(server.port, "127.0.0.2")).toBe("0");
      // The answers nobody takes are reset (ENHANCE_YOUR_CALM), which closes their calls.
      for (const c of [...held, fourth])
        expect(await closed(c)).toBe(http2.constants.NGHTTP2_ENHANCE_YOUR_CALM);
      expect(logged.some((l) => l.reason === "ANSWER_STALLED")).toBe(true);
      // The address's calls were let go: its next one is served.
      await answered(health());
    } finally {
      session.destroy();
    }
  }, 20_000);

  it("sets no bound on a client's keepalive pings: a connection pinged every 20 ms stays open and serves", async () => {
    // README (Limits) and worker.proto tell clients to ping as often as their middleboxes need:
    // a server that answered too_many_pings (GOAWAY ENHANCE_YOUR_CALM) would end their streams.
    const s = await start({});
    const session = http2.connect(`http://127.0.0.1:${s.port}`);
    session.on("error", () => {});
    let goaway: number | undefined;
    session.on("goaway", (code) => {
      goaway = code;
    });
    await once(session, "connect");
    try {
      for (let i = 0; i < 100; i++) {
        await new Promise<void>((resolve, reject) =>
          session.ping((error) =>
            error ? reject(new Error(`ping ${i}: ${error.message}, goaway ${goaway}`)) : resolve(),
          ),
        );
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(goaway).toBeUndefined();
      expect(session.closed).toBe(false);
      const stream = session.request({
        ":method": "POST",
        ":path": "/grpc.health.v1.Health/Check",
        "content-type": "application/grpc",
        te: "trailers",
      });
      stream.end(Buffer.from([0, 0, 0, 0, 0]));
      stream.resume();
      const [trailers] = (await once(stream, "trailers")) as [http2.IncomingHttpHeaders];
      expect(trailers["grpc-status"]).toBe("0");
    } finally {
      session.destroy();
    }
  });

  it("closes connections past the process's bound, whatever their address", async () => {
    const s = await start({ maxConnections: 2, maxConnectionsPerAddress: 0 });
    expect((await s.hold("127.0.0.1")).outcome).toBe("served");
    expect((await s.hold("127.0.0.2")).outcome).toBe("served");
    expect((await s.hold("127.0.0.3")).outcome).toBe("closed");
    expect(s.refused).toEqual(["total"]);
    expect(s.logged.at(-1)?.msg).toMatch(/^refused a connection: 2 are open, the most this process takes/);
  });

  it("counts the console port's connections against the same share of an address", async () => {
    const t = await startTestServer({
      config: { maxConnectionsPerAddress: "2", consoleListen: "127.0.0.1:0" },
    });
    close = () => t.stop();
    const grpcPort = Number(t.address.split(":")[1]);
    const first = await connect(grpcPort);
    sockets.push(first.socket);
    expect(first.outcome).toBe("served");
    const console1 = net.connect({ host: "127.0.0.1", port: t.server.consolePort as number });
    sockets.push(console1);
    await once(console1, "connect");
    // The console answers HTTP/1.1: a request shows the connection is taken and served.
    console1.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    await once(console1, "data");
    // The address holds its two: a third, to either port, is closed as it is accepted.
    const past = await connect(grpcPort);
    sockets.push(past.socket);
    expect(past.outcome).toBe("closed");
    const console2 = net.connect({ host: "127.0.0.1", port: t.server.consolePort as number });
    sockets.push(console2);
    console2.on("error", () => {});
    console2.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    const outcome = await new Promise<string>((resolve) => {
      console2.once("data", () => resolve("served"));
      console2.once("close", () => resolve("closed"));
    });
    expect(outcome).toBe("closed");
  });

  it("takes its default bound from the open-file limit, leaving room for the database and files", () => {
    const dir = mkdtempSync(join(tmpdir(), "limits-"));
    const limits = (soft: string) =>
      `Limit                     Soft Limit           Hard Limit           Units\nMax open files            ${soft}                20000                files\n`;
    let n = 0;
    const file = (text: string) => {
      const path = join(dir, `limits-${n++}`);
      writeFileSync(path, text);
      return path;
    };
    expect(defaultMaxConnections(file(limits("20000")))).toBe(20000 - 1024);
    expect(defaultMaxConnections(file(limits("1024")))).toBe(256);
    expect(defaultMaxConnections(file(limits("unlimited")))).toBe(65_536);
    expect(defaultMaxConnections(`${dir}/missing`)).toBe(65_536);
  });
});
