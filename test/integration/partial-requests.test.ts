import { mkdtempSync, rmSync } from "node:fs";
import { type ClientHttp2Session, connect as http2Connect, constants as http2Constants } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { Code } from "../../src/errors.js";
import { ErrorInfoSchema } from "../../src/gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../src/gen/google/rpc/status_pb.js";
import { ActionService } from "../../src/gen/leasehold/v1/action_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import type { StreamLimits } from "../../src/server.js";
import { startTestServer, type TestServer, waitForLog } from "../helpers/server.js";
import { failure } from "../helpers/status.js";
import { connectWorker, type TestWorker } from "../helpers/worker.js";

const KiB = 1024;
const MiB = 1024 * KiB;

/** How a half-sent call ended, as its raw HTTP/2 client saw it. */
interface Ending {
  /** grpc-status of the trailers-only answer; undefined if none came. */
  readonly status: number | undefined;
  /** ErrorInfo.reason of its grpc-status-details-bin. */
  readonly reason: string | undefined;
  /** The RST_STREAM code the stream closed with. */
  readonly rstCode: number;
}

/**
 * Request messages that begin to arrive and never finish (SPEC §5): the
 * server holds at most its budget of them across all connections, resets
 * the streams that would take it past, and resets those that stop sending,
 * while other calls and worker streams go on. Hostile peers speak raw HTTP/2,
 * as a gRPC library always finishes its messages.
 */
describe("request messages that never finish arriving", () => {
  let t: TestServer;
  const closers: (() => void)[] = [];

  const start = async (limits: StreamLimits, authTokens?: string) => {
    t = await startTestServer({
      config: { gracePeriod: "10s", heartbeatInterval: "2s", ...(authTokens ? { authTokens } : {}) },
      overrides: { timers: false, limits },
    });
  };
  const worker = async (workerId: string): Promise<TestWorker> => {
    const w = await connectWorker(t.address, { workerId, cluster: "east", capacity: 1 });
    closers.push(() => w.drop());
    return w;
  };
  const rawSession = async (): Promise<ClientHttp2Session> => {
    // Node's own cap on a client session's memory (10 MB) counts what the streams have queued
    // to send: past it, Node resets incoming responses itself (ENHANCE_YOUR_CALM).
    const session = http2Connect(`http://${t.address}`, { maxSessionMemory: 1000 });
    closers.push(() => session.destroy());
    session.on("error", () => {});
    await new Promise((resolve) => session.once("remoteSettings", resolve));
    return session;
  };
  /**
   * A CreateFile call whose length prefix announces `announced` bytes, of which it sends `sent`
   * and then nothing more: `ended` resolves once the server closes the stream, `written` once
   * the client has written the last byte to the connection (frames go out in order on one
   * connection, and the server reads them in that order).
   */
  const halfSent = (session: ClientHttp2Session, announced: number, sent: number) => {
    const stream = session.request({
      ":method": "POST",
      ":path": "/leasehold.v1.ResourceService/CreateFile",
      "content-type": "application/grpc",
      te: "trailers",
    });
    stream.on("error", () => {});
    stream.resume();
    let headers: Record<string, unknown> = {};
    /** The grpc-status and ErrorInfo reason of a trailers-only answer, once it comes. */
    const answered = new Promise<{ status: number; reason: string | undefined }>((resolve) =>
      stream.on("response", (h) => {
        headers = h;
        if (h["grpc-status"] !== undefined)
          resolve({ status: Number(h["grpc-status"]), reason: reasonOf(h["grpc-status-details-bin"]) });
      }),
    );
    const ended = new Promise<Ending>((resolve) =>
      stream.on("close", () =>
        resolve({
          status: headers["grpc-status"] === undefined ? undefined : Number(headers["grpc-status"]),
          reason: reasonOf(headers["grpc-status-details-bin"]),
          rstCode: stream.rstCode ?? -1,
        }),
      ),
    );
    const prefix = Buffer.alloc(5);
    prefix.writeUInt32BE(announced, 1);
    stream.write(prefix);
    const chunk = Buffer.alloc(16 * KiB, 0x41);
    const written = new Promise<void>((resolve) => {
      let left = sent;
      const pump = () => {
        while (left > 0 && !stream.closed) {
          const n = Math.min(left, chunk.length);
          left -= n;
          const last = left === 0;
          if (!stream.write(chunk.subarray(0, n), last ? () => resolve() : undefined) && !last) {
            stream.once("drain", pump);
            return;
          }
        }
      };
      pump();
    });
    return { stream, ended, written, answered };
  };
  const logLine = (test: (line: Record<string, unknown>) => boolean) => waitForLog(t.logs, test);

  afterEach(async () => {
    for (const c of closers.splice(0)) c();
    await t[Symbol.asyncDispose]();
  });

  it("resets the streams whose half-sent messages would take the server past its budget, while other calls go on", async () => {
    // The stall bound is out of the way: only the budget resets streams here.
    await start({ maxPartialRequestBytes: 1 * MiB, requestStallMs: 10 * 60_000 });
    const steady = await worker("steady");
    const session = await rawSession();
    // Each call announces 1 MiB and sends 600 KiB of it. The first one's bytes are all in
    // before the others' (they follow it on the connection), and it fits the budget.
    const first = halfSent(session, 1 * MiB, 600 * KiB);
    await first.written;
    // Two such messages do not fit: whatever the order their chunks come in, each of these is
    // reset by the end of its 600 KiB, and the first one keeps what it holds.
    const more = Array.from({ length: 16 }, () => halfSent(session, 1 * MiB, 600 * KiB));
    expect(await Promise.all(more.map((c) => c.ended))).toEqual(
      Array(16).fill({
        status: Code.ResourceExhausted,
        reason: "PARTIAL_REQUESTS_OVER_BUDGET",
        rstCode: http2Constants.NGHTTP2_NO_ERROR,
      }),
    );
    expect(first.stream.closed).toBe(false);
    const logged = await logLine((l) => l.reason === "PARTIAL_REQUESTS_OVER_BUDGET");
    expect(logged.msg).toMatch(
      /^reset a request of \/leasehold\.v1\.ResourceService\/CreateFile: the server holds .* past its limit of 1\.0 MiB/,
    );

    // Small messages go on: a worker's heartbeat and a submit are answered as usual.
    expect((await steady.heartbeat(1)).sequence).toBe(1n);
    const submitted = await t.client(ActionService).submitAction({ cluster: "east" });
    expect(submitted.action?.id).toBeTruthy();
    // A gRPC client's large request, on a connection of its own, finds the budget taken and
    // learns why.
    const refused = await failure(
      t.client(ResourceService).createFile({ name: "big.bin", content: new Uint8Array(500 * KiB) }),
    );
    expect([refused.code, refused.reason]).toEqual([Code.ResourceExhausted, "PARTIAL_REQUESTS_OVER_BUDGET"]);
    expect(refused.message).toMatch(/past its limit of 1\.0 MiB; retry later/);
    expect(first.stream.closed).toBe(false);
  }, 60_000);

  it("refuses callers without credentials before reading their requests, so they hold none of the budget", async () => {
    const dir = mkdtempSync(join(tmpdir(), "leasehold-preauth-"));
    closers.push(() => rmSync(dir, { recursive: true, force: true }));
    const tokens = join(dir, "tokens.yaml");
    const token = addStaticToken(tokens, {
      principal: "uploader",
      bindings: [{ role: "operator", clusters: ["*"], workerIds: "*" }],
    });
    await start({ maxPartialRequestBytes: 1 * MiB, requestStallMs: 10 * 60_000 }, tokens);
    const session = await rawSession();
    // Without credentials: each announces 1 MiB and sends 600 KiB, and never the rest. Read,
    // the first alone would leave no room for the upload below.
    const first = halfSent(session, 1 * MiB, 600 * KiB);
    await first.written;
    const anonymous = [first, ...Array.from({ length: 3 }, () => halfSent(session, 1 * MiB, 600 * KiB))];
    const metadata = new grpc.Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    const file = await t
      .client(ResourceService)
      .createFile({ name: "big.bin", content: new Uint8Array(500 * KiB) }, { metadata });
    expect(file.resource?.id).toBeTruthy();
    // Each was answered as it started, as a call with a whole request would be.
    expect(await Promise.all(anonymous.map((c) => c.answered))).toEqual(
      Array(4).fill({ status: Code.Unauthenticated, reason: "UNAUTHENTICATED" }),
    );
    expect(t.logs.some((l) => l.reason === "PARTIAL_REQUESTS_OVER_BUDGET")).toBe(false);
    const logged = await logLine((l) => l.reason === "UNAUTHENTICATED");
    expect(logged.msg).toMatch(
      /^refused leasehold\.v1\.ResourceService\/CreateFile: this server needs credentials/,
    );
  }, 60_000);

  it("resets a message that stops arriving, which frees its share of the budget, and leaves idle worker streams alone", async () => {
    await start({ maxPartialRequestBytes: 1 * MiB, requestStallMs: 1000 });
    // Connected first and idle from then on: between two messages a stream holds nothing.
    const steady = await worker("steady");
    const session = await rawSession();
    const stuck = halfSent(session, 1 * MiB, 600 * KiB);
    expect(await stuck.ended).toEqual({
      status: Code.ResourceExhausted,
      reason: "REQUEST_STALLED",
      rstCode: http2Constants.NGHTTP2_NO_ERROR,
    });
    const logged = await logLine((l) => l.reason === "REQUEST_STALLED");
    expect(logged.msg).toMatch(
      /^reset a request of .*: the request message stopped arriving: \d+ of its 1048576 bytes came/,
    );

    expect((await steady.heartbeat(1)).sequence).toBe(1n);
    expect(t.logs.filter((l) => l.msg === "worker stream lost")).toEqual([]);
    // The budget the stalled message held is free again: 500 KiB more would not have fitted.
    const file = await t.client(ResourceService).createFile({
      name: "big.bin",
      content: new Uint8Array(500 * KiB),
    });
    expect(file.resource?.id).toBeTruthy();
  }, 60_000);
});

/** ErrorInfo.reason of a `grpc-status-details-bin` header as node:http2 hands it over (base64). */
function reasonOf(header: unknown): string | undefined {
  if (typeof header !== "string") return undefined;
  const status = fromBinary(StatusSchema, Buffer.from(header, "base64"));
  for (const detail of status.details) {
    const info = anyUnpack(detail, ErrorInfoSchema);
    if (info) return info.reason;
  }
  return undefined;
}
