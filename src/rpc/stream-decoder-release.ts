import { createRequire } from "node:module";

/**
 * The parts of grpc-js's internal `StreamDecoder` (build/src/stream-decoder.js,
 * 1.14) this module relies on: it splits a stream's DATA chunks into gRPC
 * messages, and is in state 0 (NO_DATA) between two messages.
 */
interface StreamDecoderShape {
  readState: number;
  readCompressFlag: unknown;
  readPartialMessage: unknown[];
  write(data: Buffer): Buffer[];
}

const NO_DATA = 0;
let installed: boolean | undefined;
/**
 * Where the replacement keeps grpc-js's own `write`, on the prototype: a
 * second copy of this module in the process (test runners that share grpc-js
 * between files) finds the replacement in place instead of wrapping it again.
 */
const ORIGINAL = Symbol.for("leasehold.StreamDecoder.write");

/**
 * grpc-js's own `StreamDecoder.prototype.write`, whether or not
 * {@link releaseDecodedChunks} replaced it (tests compare the two).
 */
export function originalDecoderWrite(decoder: {
  prototype: StreamDecoderShape;
}): StreamDecoderShape["write"] {
  const prototype = decoder.prototype as StreamDecoderShape & { [ORIGINAL]?: StreamDecoderShape["write"] };
  return prototype[ORIGINAL] ?? prototype.write;
}

/**
 * Makes grpc-js's stream decoder let go of a stream's last chunk once a
 * message is complete. As released (1.14.7) it keeps two views of that chunk
 * (its compress flag and the message's parts) until the stream's next
 * message begins. On a worker stream that is the next heartbeat, a second
 * later: with 10,000 streams every chunk outlives two young-generation
 * collections, is copied into the old generation, and holds its buffer. With
 * this, `bench/heartbeats.ts` (10,000 streams) ran with 355-361 MiB of server
 * RSS instead of 474-495, and shorter collections (median 6.2 against
 * 6.9-7.2 ms).
 *
 * It changes no decoding: in state NO_DATA the decoder assigns both fields
 * before it reads them (test/unit/stream-decoder-release.test.ts decodes the
 * same frames, however chunked, with and without it). If grpc-js's decoder
 * no longer has this shape, or once patched no longer decodes a few frames
 * cut at awkward places into the right messages, the original is put back.
 * Returns whether it is in place; safe to call more than once.
 */
export function releaseDecodedChunks(): boolean {
  if (installed !== undefined) return installed;
  installed = false;
  let decoder: { prototype: StreamDecoderShape; new (maxLength: number): StreamDecoderShape };
  try {
    const require = createRequire(import.meta.url);
    decoder = require("@grpc/grpc-js/build/src/stream-decoder.js").StreamDecoder;
    const probe = new decoder(-1);
    const shaped =
      typeof decoder.prototype.write === "function" &&
      probe.readState === NO_DATA &&
      Array.isArray(probe.readPartialMessage) &&
      "readCompressFlag" in probe;
    if (!shaped) return false;
    if (ORIGINAL in decoder.prototype) {
      installed = true;
      return installed;
    }
  } catch {
    return false;
  }
  const write = decoder.prototype.write;
  decoder.prototype.write = function (this: StreamDecoderShape, data: Buffer): Buffer[] {
    const messages = write.call(this, data);
    if (this.readState === NO_DATA) {
      this.readCompressFlag = null;
      this.readPartialMessage = [];
    }
    return messages;
  };
  installed = decodesFrames(decoder);
  if (installed) Object.defineProperty(decoder.prototype, ORIGINAL, { value: write });
  else decoder.prototype.write = write;
  return installed;
}

/**
 * Whether a fresh decoder splits three frames, written in chunks cut inside a
 * length prefix, right after a compress flag and inside a message, into the
 * three frames (it hands each message on with its 5-byte prefix).
 */
export function decodesFrames(decoder: new (maxLength: number) => StreamDecoderShape): boolean {
  const frames = [[1, 2, 3], [], [4, 5, 6, 7, 8]].map((payload) => {
    const frame = Buffer.alloc(5 + payload.length);
    frame.writeUInt32BE(payload.length, 1);
    frame.set(payload, 5);
    return frame;
  });
  const all = Buffer.concat(frames);
  try {
    const probe = new decoder(-1);
    const out: Buffer[] = [];
    let at = 0;
    for (const cut of [3, 6, 10, 11, 16, all.length]) {
      out.push(...probe.write(all.subarray(at, cut)));
      at = cut;
    }
    return out.length === frames.length && out.every((m, i) => m.equals(frames[i] as Buffer));
  } catch {
    return false;
  }
}
