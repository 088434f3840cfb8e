import type http2 from "node:http2";
import { create, type DescMessage, type MessageInitShape, toBinary } from "@bufbuild/protobuf";

/** A gRPC message frame: the compressed flag (0 unless given), the length, the message. */
export function grpcFrame<M extends DescMessage>(schema: M, init: MessageInitShape<M>, flag = 0): Buffer {
  const body = toBinary(schema, create(schema, init));
  const frame = Buffer.alloc(5 + body.length);
  frame[0] = flag;
  frame.writeUInt32BE(body.length, 1);
  frame.set(body, 5);
  return frame;
}

/** An HPACK header field, literal without indexing, new name, no Huffman coding (names and values < 127 bytes). */
export const hpackLiteral = (name: string, value: string): Buffer =>
  Buffer.concat([
    Buffer.from([0, name.length]),
    Buffer.from(name),
    Buffer.from([value.length]),
    Buffer.from(value),
  ]);

/**
 * A gRPC call over a bare HTTP/2 `session` (as a client without a gRPC
 * library sends one): `bytes` as the request, then the end of the stream.
 * `status` resolves with grpc-status and the decoded grpc-message, from the
 * trailers or from headers that carry the status alone.
 */
export function rawCall(
  session: http2.ClientHttp2Session,
  path: string,
  bytes: Uint8Array,
  headers: http2.OutgoingHttpHeaders = {},
): {
  stream: http2.ClientHttp2Stream;
  status: Promise<{ code: string | undefined; message: string }>;
} {
  const stream = session.request({
    ":method": "POST",
    ":path": path,
    "content-type": "application/grpc",
    te: "trailers",
    ...headers,
  });
  stream.on("error", () => {});
  stream.end(bytes);
  const status = new Promise<{ code: string | undefined; message: string }>((resolve) => {
    const done = (h: http2.IncomingHttpHeaders) =>
      resolve({
        code: h["grpc-status"] as string | undefined,
        message: decodeURIComponent(String(h["grpc-message"] ?? "")),
      });
    stream.once("trailers", done);
    stream.once("response", (h) => {
      if (h["grpc-status"] !== undefined) done(h);
    });
  });
  return { stream, status };
}
