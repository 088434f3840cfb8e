import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { type ClientHttp2Session, type ClientHttp2Stream, connect as http2Connect } from "node:http2";
import { create, toBinary } from "@bufbuild/protobuf";
import { afterEach, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { DownloadFileRequestSchema, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { intercepting } from "../helpers/intercept-db.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { expectStatus } from "../helpers/status.js";

/** What DownloadFile sends per message, the last one of a file excepted. */
const CHUNK_BYTES = 64 * 1024;
/** Files at the default --max-file-size: 48 chunks. */
const FILE_BYTES = 3 * 1024 * 1024;
/**
 * The most a download whose client reads nothing may read of its file: what the adapter lets
 * wait for the transport (`SERVER_STREAM_AHEAD_BYTES`, two chunks), the flow-control window
 * HTTP/2 may have sent, and a chunk to spare. Not the file.
 */
const HELD_PER_DOWNLOAD = 4 * CHUNK_BYTES;
/** DownloadFile calls held open at once by a client that reads none of them. */
const DEAF_DOWNLOADS = 16;

/** The statement that reads file content (store/queries/read-file-chunk.ts), or read it whole before. */
const READS_CONTENT = /^\s*select\b[\s\S]*\bcontent\b[\s\S]*\bfrom resources\b/;

/**
 * DownloadFile reads a file from the database a chunk at a time, as its
 * client takes them: what a download holds in the server does not grow with
 * the file, and a client that stops reading stops the reading (SPEC §5).
 */
describe("file download", () => {
  let t: TestServer;
  const sessions: ClientHttp2Session[] = [];
  /** File content brought back from the database: its bytes, and the statements that read it. */
  const reads = { bytes: 0, count: 0 };
  let onRead = () => {};
  /** Resolves once `count` statements have read file content. */
  const readsReach = (count: number) =>
    new Promise<void>((resolve) => {
      onRead = () => {
        if (reads.count >= count) resolve();
      };
      onRead();
    });

  const start = async () => {
    t = await startTestServer({
      overrides: {
        timers: false,
        wrapDb: intercepting(async (text, execute) => {
          const result = await execute();
          if (READS_CONTENT.test(text)) {
            reads.bytes += contentBytes(result);
            reads.count++;
            onRead();
          }
          return result;
        }),
      },
    });
  };
  const createFile = async (content: Uint8Array) =>
    (await t.client(ResourceService).createFile({ name: "big.bin", content })).resource?.id ?? "";
  const download = async (resourceId: string) => {
    const chunks: Uint8Array[] = [];
    for await (const m of t.client(ResourceService).downloadFile({ resourceId })) chunks.push(m.chunk);
    return chunks;
  };
  /**
   * DownloadFile on a bare HTTP/2 stream that reads nothing yet: beyond what fills its 16 KiB
   * read buffer no data is consumed, so no WINDOW_UPDATE goes out and the server can send little
   * more than one flow-control window (64 KiB, for the whole connection). A grpc-js client that
   * pauses still takes in a dozen messages.
   */
  const deafDownload = (session: ClientHttp2Session, resourceId: string): ClientHttp2Stream => {
    const stream = session.request({
      ":method": "POST",
      ":path": "/leasehold.v1.ResourceService/DownloadFile",
      "content-type": "application/grpc",
      te: "trailers",
    });
    stream.on("error", () => {});
    stream.end(framed(resourceId));
    stream.pause();
    return stream;
  };
  const connect = () => {
    const session = http2Connect(`http://${t.address}`);
    session.on("error", () => {});
    sessions.push(session);
    return session;
  };

  afterEach(async () => {
    for (const s of sessions.splice(0)) s.destroy();
    reads.bytes = 0;
    reads.count = 0;
    onRead = () => {};
    await t[Symbol.asyncDispose]();
  });

  it("reads a file a few chunks ahead of each client that does not read, then no more", async () => {
    await start();
    const content = randomBytes(FILE_BYTES);
    const id = await createFile(content);
    const session = connect();
    for (let i = 0; i < DEAF_DOWNLOADS; i++) deafDownload(session, id);
    await readsReach(DEAF_DOWNLOADS);

    // A client that reads gets the same bytes, in the same chunks, as before; its 48 reads
    // take turns with anything the deaf downloads still read.
    const before = reads.bytes;
    const chunks = await download(id);
    expect(chunks.map((c) => c.byteLength)).toEqual(Array(FILE_BYTES / CHUNK_BYTES).fill(CHUNK_BYTES));
    expect(Buffer.concat(chunks).equals(content)).toBe(true);
    // (The reads are seen: the bound below is not vacuous.)
    expect(reads.bytes - before).toBeGreaterThanOrEqual(FILE_BYTES);

    // That client read the file once; each deaf download, a few chunks of it.
    expect(reads.bytes - FILE_BYTES).toBeLessThanOrEqual(DEAF_DOWNLOADS * HELD_PER_DOWNLOAD);
  });

  it("ends a download with NOT_FOUND naming the file when the file is deleted during it", async () => {
    await start();
    const content = randomBytes(FILE_BYTES);
    const id = await createFile(content);
    const stream = deafDownload(connect(), id);
    const trailers = once(stream, "trailers");
    await once(stream, "readable");
    await t.client(ResourceService).deleteResource({ resourceId: id });

    let received = 0;
    stream.on("data", (data: Buffer) => {
      received += data.length;
    });
    stream.resume();
    const [headers] = (await trailers) as [Record<string, string>];
    expect(Number(headers["grpc-status"])).toBe(Code.NotFound);
    expect(decodeURIComponent(headers["grpc-message"] ?? "")).toMatch(
      new RegExp(`file "${id}" not found: it was deleted during the download`),
    );
    expect(received).toBeLessThan(FILE_BYTES);
    // A file deleted before its download starts is NOT_FOUND, as before.
    await expectStatus(download(id), Code.NotFound, /not found/);
  });
});

/** A DownloadFile request as one gRPC message on the wire. */
function framed(resourceId: string): Buffer {
  const bytes = toBinary(DownloadFileRequestSchema, create(DownloadFileRequestSchema, { resourceId }));
  const frame = Buffer.alloc(5 + bytes.length);
  frame.writeUInt32BE(bytes.length, 1);
  frame.set(bytes, 5);
  return frame;
}

/** Bytes of file content in a statement's rows: base64 text, as the store asks for it, or bytea. */
function contentBytes(result: unknown): number {
  const rows = (Array.isArray(result) ? result : (result as { rows: unknown[] }).rows) as Record<
    string,
    unknown
  >[];
  let bytes = 0;
  for (const row of rows) {
    for (const value of Object.values(row)) {
      if (typeof value === "string") bytes += Buffer.from(value, "base64").byteLength;
      else if (value instanceof Uint8Array) bytes += value.byteLength;
    }
  }
  return bytes;
}
