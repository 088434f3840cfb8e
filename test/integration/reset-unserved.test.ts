import { once } from "node:events";
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ListActionsRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { grpcFrame, hpackLiteral as literal } from "../helpers/raw-grpc.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

/** An HTTP/2 frame: length, type, flags, stream id, payload. */
function h2Frame(type: number, flags: number, stream: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const head = Buffer.alloc(9);
  head.writeUIntBE(payload.length, 0, 3);
  head[3] = type;
  head[4] = flags;
  head.writeUInt32BE(stream, 5);
  return Buffer.concat([head, payload]);
}

const HEADERS = 1;
const DATA = 0;
const RST_STREAM = 3;
const SETTINGS = 4;
const END_STREAM = 1;
const END_HEADERS = 4;
const CANCEL = 8;

/**
 * `count` ListActions calls on one bare connection, each HEADERS, DATA (the
 * request, ending the stream) and RST_STREAM(CANCEL), all in one write: what
 * a "rapid reset" client sends. grpc-js hands each request on while Node
 * still reads the chunk, before the RST_STREAM behind it.
 */
async function rapidReset(address: string, count: number): Promise<void> {
  const [host, port] = address.split(":") as [string, string];
  const socket = net.connect({ host, port: Number(port) });
  socket.on("error", () => {});
  await once(socket, "connect");
  socket.resume();
  const headers = Buffer.concat([
    literal(":method", "POST"),
    literal(":scheme", "http"),
    literal(":path", "/leasehold.v1.ActionService/ListActions"),
    literal(":authority", address),
    literal("content-type", "application/grpc"),
    literal("te", "trailers"),
  ]);
  const body = grpcFrame(ListActionsRequestSchema, {});
  const cancel = Buffer.alloc(4);
  cancel.writeUInt32BE(CANCEL);
  const frames = [Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), h2Frame(SETTINGS, 0, 0)];
  for (let i = 0; i < count; i++) {
    const id = 1 + 2 * i;
    frames.push(
      h2Frame(HEADERS, END_HEADERS, id, headers),
      h2Frame(DATA, END_STREAM, id, body),
      h2Frame(RST_STREAM, 0, id, cancel),
    );
  }
  socket.write(Buffer.concat(frames));
  // The server has read it all once it answers a PING sent after it.
  const ack = new Promise<void>((resolve) =>
    socket.on("data", (chunk: Buffer) => {
      if (chunk.includes(Buffer.from("leasehol"))) resolve();
    }),
  );
  socket.write(h2Frame(6, 0, 0, Buffer.from("leasehol")));
  await Promise.race([ack, new Promise((r) => setTimeout(r, 2000))]);
  socket.destroy();
}

/** The value of the first sample of `text` (Prometheus text) whose line starts with `prefix`; 0 if none. */
function sample(text: string, prefix: string): number {
  const line = text.split("\n").find((l) => l.startsWith(prefix));
  return line === undefined ? 0 : Number(line.slice(line.lastIndexOf(" ") + 1));
}

const LIST_ACTIONS = 'grpc_service="leasehold.v1.ActionService",grpc_method="ListActions"';

describe.runIf(runsDriverNeutralTests())("unary calls the client reset before they were served", () => {
  let t: TestServer;
  beforeAll(async () => {
    t = await startTestServer();
  });
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
  });
  const scrape = async () => (await fetch(`http://127.0.0.1:${t.server.metricsPort}/metrics`)).text();

  it("are not run: none is counted handled OK", async () => {
    await rapidReset(t.address, 50);
    // Every call has ended once as many were handled as started.
    let text = "";
    for (let i = 0; i < 50; i++) {
      text = await scrape();
      const started = sample(text, `grpc_server_started_total{grpc_type="unary",${LIST_ACTIONS}}`);
      const handled = text
        .split("\n")
        .filter((l) => l.startsWith(`grpc_server_handled_total{grpc_type="unary",${LIST_ACTIONS}`))
        .reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(" ") + 1)), 0);
      if (started === 50 && handled === 50) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(sample(text, `grpc_server_started_total{grpc_type="unary",${LIST_ACTIONS}}`)).toBe(50);
    expect(sample(text, `grpc_server_handled_total{grpc_type="unary",${LIST_ACTIONS},grpc_code="OK"}`)).toBe(
      0,
    );
    expect(
      sample(text, `grpc_server_handled_total{grpc_type="unary",${LIST_ACTIONS},grpc_code="Canceled"}`),
    ).toBe(50);
  });
});
