import { createRequire } from "node:module";
import { describe, expect, it } from "vitest";
import {
  decodesFrames,
  originalDecoderWrite,
  releaseDecodedChunks,
} from "../../src/rpc/stream-decoder-release.js";

interface Decoder {
  readState: number;
  readCompressFlag: unknown;
  readPartialMessage: unknown[];
  write(data: Buffer): Buffer[];
}
const { StreamDecoder } = createRequire(import.meta.url)("@grpc/grpc-js/build/src/stream-decoder.js") as {
  StreamDecoder: { prototype: Decoder; new (maxLength: number): Decoder };
};
// Another test file of the same worker process may have put the replacement in place already.
const original = originalDecoderWrite(StreamDecoder);

/** A gRPC frame: flag, big-endian length, body. */
function frame(body: Buffer, compressed = false): Buffer {
  const head = Buffer.alloc(5);
  head[0] = compressed ? 1 : 0;
  head.writeUInt32BE(body.length, 1);
  return Buffer.concat([head, body]);
}

/** A small deterministic generator, so a failure names chunkings that can be run again. */
function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

describe("grpc-js's stream decoder, made to let go of decoded chunks", () => {
  it("is in place, and says so again when asked twice", () => {
    expect(releaseDecodedChunks()).toBe(true);
    expect(releaseDecodedChunks()).toBe(true);
    expect(StreamDecoder.prototype.write).not.toBe(original);
  });

  it("decodes the same messages as before, however the frames are chunked", () => {
    releaseDecodedChunks();
    const bodies = [0, 1, 4, 5, 17, 300, 70_000, 0, 2].map((n, i) => Buffer.alloc(n, (i * 37 + 11) & 0xff));
    const stream = Buffer.concat(bodies.map((b, i) => frame(b, i === 3)));
    for (let seed = 1; seed <= 200; seed++) {
      const next = random(seed);
      const chunks: Buffer[] = [];
      for (let at = 0; at < stream.length; ) {
        // Mostly small cuts (inside headers too), sometimes big ones.
        const size = 1 + Math.floor(next() < 0.8 ? next() * 9 : next() * 40_000);
        chunks.push(stream.subarray(at, at + size));
        at += size;
      }
      const before = new StreamDecoder(-1);
      const after = new StreamDecoder(-1);
      const expected = chunks.flatMap((c) => original.call(before, c));
      const got = chunks.flatMap((c) => after.write(c));
      expect(
        got.map((m) => m.toString("hex")),
        `seed ${seed}`,
      ).toEqual(expected.map((m) => m.toString("hex")));
      expect(got).toHaveLength(bodies.length);
    }
  });

  it("checks a decoder on frames cut at awkward places before it stays patched", () => {
    expect(decodesFrames(StreamDecoder)).toBe(true);
    // A decoder that loses the empty message, or one that throws, fails the check.
    class DropsEmpty extends StreamDecoder {
      override write(data: Buffer): Buffer[] {
        return super.write(data).filter((m) => m.length > 5);
      }
    }
    class Throws extends StreamDecoder {
      override write(): Buffer[] {
        throw new TypeError("cannot push to a frozen array");
      }
    }
    expect(decodesFrames(DropsEmpty)).toBe(false);
    expect(decodesFrames(Throws)).toBe(false);
  });

  it("holds nothing of a chunk once its messages are complete, and keeps a partial one", () => {
    releaseDecodedChunks();
    const decoder = new StreamDecoder(-1);
    const whole = frame(Buffer.from("heartbeat"));
    expect(decoder.write(whole)).toHaveLength(1);
    expect(decoder.readCompressFlag).toBeNull();
    expect(decoder.readPartialMessage).toHaveLength(0);
    // Half a message stays held until the rest comes.
    const two = frame(Buffer.from("next message"));
    expect(decoder.write(two.subarray(0, 9))).toHaveLength(0);
    expect(decoder.readPartialMessage).toHaveLength(1);
    const [message] = decoder.write(two.subarray(9));
    expect(message?.subarray(5).toString()).toBe("next message");
    expect(decoder.readPartialMessage).toHaveLength(0);
  });
});
