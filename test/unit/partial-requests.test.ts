import { EventEmitter } from "node:events";
import { constants as http2 } from "node:http2";
import { createRequire } from "node:module";
import type * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Code } from "../../src/errors.js";
import {
  createPartialRequestLimit,
  type PartialRequestLimit,
  STALL_PROGRESS_BYTES,
} from "../../src/rpc/partial-requests.js";

const { BaseServerInterceptingCall } = createRequire(import.meta.url)(
  "@grpc/grpc-js/build/src/server-interceptors.js",
);

const KiB = 1024;
const STALL_MS = 1000;

/**
 * The HTTP/2 stream grpc-js's call reads: what it and the module use of a
 * ServerHttp2Stream. `respond` records the answer; the test says when it has
 * left (`state.localClose`, as nghttp2 reports it once END_STREAM is sent).
 */
class FakeStream extends EventEmitter {
  paused = false;
  closed = false;
  destroyed = false;
  rstCode: number | undefined;
  answer: Record<string, unknown> | undefined;
  readonly state = { localClose: 0 };
  pause() {
    this.paused = true;
    return this;
  }
  resume() {
    this.paused = false;
    return this;
  }
  isPaused() {
    return this.paused;
  }
  respond(headers: Record<string, unknown>) {
    this.answer = headers;
  }
  close(code: number) {
    if (this.closed) return;
    this.closed = true;
    this.rstCode = code;
    this.emit("close");
  }
  end() {}
}

const method = {
  path: "/test.Files/Put",
  requestStream: false,
  responseStream: false,
  requestDeserialize: (b: Buffer) => b,
  responseSerialize: (b: Buffer) => b,
} as grpc.ServerMethodDefinition<Buffer, Buffer>;

/** A length prefix announcing `size` bytes, and `sent` bytes of the message. */
const start = (size: number, sent: number) => {
  const bytes = Buffer.alloc(5 + sent, 0x41);
  bytes[0] = 0;
  bytes.writeUInt32BE(size, 1);
  return bytes;
};

describe("createPartialRequestLimit", () => {
  let limit: PartialRequestLimit;
  let logs: Record<string, unknown>[];

  const setUp = (maxBytes: number) => {
    logs = [];
    const log = pino({ level: "warn" }, { write: (line: string) => logs.push(JSON.parse(line)) });
    const made = createPartialRequestLimit({ log, maxBytes, stallMs: STALL_MS });
    if (!made) throw new Error("grpc-js's call changed shape");
    limit = made;
  };
  /** A unary call as grpc-js makes it for a stream, followed by the module, reading. */
  const call = () => {
    const stream = new FakeStream();
    const handler = {
      path: method.path,
      type: "unary",
      deserialize: (b: Buffer) => b,
      serialize: (b: Buffer) => b,
    };
    const base = new BaseServerInterceptingCall(stream, { ":path": method.path }, null, handler, {});
    limit.interceptor(method, base);
    stream.resume();
    return {
      base,
      stream,
      send: (bytes: Buffer) => stream.emit("data", bytes),
      status: () => (stream.answer ? Number(stream.answer["grpc-status"]) : undefined),
    };
  };

  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    limit.close();
    vi.useRealTimers();
  });

  it("counts the reads a message arriving holds, each once, and nothing between messages", () => {
    setUp(1024 * KiB);
    const big = call();
    // A chunk is its own read here: the prefix and 40 KiB of the message.
    big.send(start(100 * KiB, 40 * KiB));
    expect(limit.heldBytes).toBe(40 * KiB + 5);
    big.send(Buffer.alloc(60 * KiB - 1));
    expect(limit.heldBytes).toBe(100 * KiB + 4);
    // The last byte, and the next message begun in the same read.
    big.send(Buffer.concat([Buffer.alloc(1), start(200 * KiB, 10 * KiB)]));
    expect(limit.heldBytes).toBe(10 * KiB + 6);

    // Two messages that came in one read: they hold it once.
    const read = Buffer.concat([start(100 * KiB, 10 * KiB), start(100 * KiB, 10 * KiB)]);
    const [one, two] = [call(), call()];
    one.send(read.subarray(0, read.length / 2));
    two.send(read.subarray(read.length / 2));
    expect(limit.heldBytes).toBe(10 * KiB + 6 + read.length);
    one.stream.close(http2.NGHTTP2_CANCEL);
    expect(limit.heldBytes).toBe(10 * KiB + 6 + read.length);
    two.send(Buffer.alloc(90 * KiB));
    expect(limit.heldBytes).toBe(10 * KiB + 6);
    big.stream.close(http2.NGHTTP2_CANCEL);
    expect(limit.heldBytes).toBe(0);
  });

  it("resets the stream whose chunk takes the total past the budget, and closes it once its status left", () => {
    setUp(300 * KiB);
    const first = call();
    first.send(start(1024 * KiB, 200 * KiB));
    const second = call();
    second.send(start(1024 * KiB, 90 * KiB));
    expect(second.status()).toBeUndefined();
    second.send(Buffer.alloc(40 * KiB));

    expect(second.status()).toBe(Code.ResourceExhausted);
    expect(limit.heldBytes).toBe(200 * KiB + 5);
    expect(logs).toMatchObject([
      {
        method: method.path,
        reason: "PARTIAL_REQUESTS_OVER_BUDGET",
        receivedBytes: 130 * KiB,
        heldBytes: 130 * KiB + 5,
      },
    ]);
    // An RST_STREAM now would overtake the answer: the stream closes once it has left.
    expect(second.stream.closed).toBe(false);
    second.stream.state.localClose = 1;
    second.send(Buffer.alloc(16 * KiB));
    expect(second.stream.rstCode).toBe(http2.NGHTTP2_NO_ERROR);
    expect(limit.heldBytes).toBe(200 * KiB + 5);

    // A message that holds no more than two reads' worth goes on past the budget, then no further.
    const third = call();
    third.send(start(1024 * KiB, 100 * KiB));
    expect(limit.heldBytes).toBeGreaterThan(300 * KiB);
    expect(third.status()).toBeUndefined();
    third.send(Buffer.alloc(30 * KiB));
    expect(third.status()).toBe(Code.ResourceExhausted);

    expect(first.status()).toBeUndefined();
    first.send(Buffer.alloc(824 * KiB));
    expect(first.status()).toBeUndefined();
    expect(limit.heldBytes).toBe(0);
  });

  it("resets a call that ended with part of a message in hand once more of it comes", () => {
    setUp(1024 * KiB);
    const c = call();
    c.send(start(1024 * KiB, 10 * KiB));
    c.base.sendStatus({ code: Code.DeadlineExceeded, details: "Deadline exceeded", metadata: null });
    expect(limit.heldBytes).toBe(10 * KiB + 5);
    c.send(Buffer.alloc(KiB));
    expect(limit.heldBytes).toBe(0);
    expect(c.status()).toBe(Code.DeadlineExceeded);
    expect(logs.map((l) => l.reason)).toEqual(["CALL_ENDED"]);
    c.stream.state.localClose = 1;
    c.send(Buffer.alloc(KiB));
    expect(c.stream.rstCode).toBe(http2.NGHTTP2_NO_ERROR);
  });

  it("cuts an answer that has not left by the next check with ENHANCE_YOUR_CALM", () => {
    setUp(10 * KiB);
    const c = call();
    c.send(start(1024 * KiB, 200 * KiB));
    expect(c.status()).toBe(Code.ResourceExhausted);
    vi.advanceTimersByTime(STALL_MS);
    expect(c.stream.closed).toBe(false);
    vi.advanceTimersByTime(STALL_MS);
    expect(c.stream.rstCode).toBe(http2.NGHTTP2_ENHANCE_YOUR_CALM);
  });

  it("resets a message that gains too little for a whole check period, unless the server is not reading", () => {
    setUp(1024 * KiB);
    const stuck = call();
    stuck.send(start(1024 * KiB, 100 * KiB));
    const slow = call();
    slow.send(start(1024 * KiB, 100 * KiB));
    const unread = call();
    unread.send(start(1024 * KiB, 100 * KiB));
    unread.stream.pause();
    const smallStuck = call();
    smallStuck.send(start(1000, 10));

    // A message that began since the last check gets a whole period.
    vi.advanceTimersByTime(STALL_MS);
    stuck.send(Buffer.alloc(STALL_PROGRESS_BYTES - 1));
    slow.send(Buffer.alloc(STALL_PROGRESS_BYTES));
    for (const c of [stuck, slow, unread, smallStuck]) expect(c.status()).toBeUndefined();
    vi.advanceTimersByTime(STALL_MS);
    expect(stuck.status()).toBe(Code.ResourceExhausted);
    expect(smallStuck.status()).toBe(Code.ResourceExhausted);
    expect(slow.status()).toBeUndefined();
    expect(unread.status()).toBeUndefined();
    expect(logs.map((l) => l.reason)).toEqual(["REQUEST_STALLED", "REQUEST_STALLED"]);
    expect(limit.heldBytes).toBe(200 * KiB + 10 + STALL_PROGRESS_BYTES);

    for (let i = 0; i < 3; i++) {
      slow.send(Buffer.alloc(STALL_PROGRESS_BYTES));
      vi.advanceTimersByTime(STALL_MS);
    }
    expect(slow.status()).toBeUndefined();
    expect(unread.status()).toBeUndefined();
  });

  it("never checks a stream between messages", () => {
    setUp(1024 * KiB);
    const idle = call();
    idle.send(start(10, 10));
    vi.advanceTimersByTime(10 * STALL_MS);
    expect(idle.status()).toBeUndefined();
    expect(vi.getTimerCount()).toBe(0);
  });
});
