import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { ConnectRequestSchema, ConnectResponseSchema } from "../../src/gen/leasehold/v1/worker_pb.js";
import {
  batchRuns,
  encodeHeartbeatAck,
  encodeRequestBatch,
  encodeResponseBatch,
} from "../../src/rpc/worker-wire.js";

const ack = (sequence: bigint, remainingMs: number) =>
  toBinary(
    ConnectResponseSchema,
    create(ConnectResponseSchema, {
      message: { case: "heartbeatAck", value: { sequence, remaining: durationFromMs(remainingMs) } },
    }),
  );

describe("worker stream wire encodings", () => {
  it("encodes a heartbeat ack to exactly the bytes toBinary gives", () => {
    const sequences = [0n, 1n, 127n, 128n, 300n, 16_384n, 2n ** 31n, 1_764_000_000_000n, 2n ** 53n - 1n];
    const remaining = [0, 1, 999, 1000, 1001, 9_500, 10_000, 65_536_123, 2 ** 31, 86_400_000 * 365];
    for (const s of sequences) {
      for (const r of remaining) {
        expect(encodeHeartbeatAck(s, r), `sequence ${s}, remaining ${r} ms`).toEqual(Buffer.from(ack(s, r)));
      }
    }
  });

  it("leaves values outside its fast path to the ordinary encoder", () => {
    expect(encodeHeartbeatAck(2n ** 53n, 10)).toBeUndefined();
    expect(encodeHeartbeatAck(2n ** 64n - 1n, 10)).toBeUndefined();
    expect(encodeHeartbeatAck(1n, -1)).toBeUndefined();
    expect(encodeHeartbeatAck(1n, 1.5)).toBeUndefined();
  });

  it("frames encoded messages as the batch toBinary gives", () => {
    const responses = [
      create(ConnectResponseSchema, { message: { case: "drain", value: { reason: "x".repeat(300) } } }),
      create(ConnectResponseSchema, { message: { case: "heartbeatAck", value: { sequence: 5n } } }),
      create(ConnectResponseSchema, {}),
    ];
    const framed = encodeResponseBatch(responses.map((m) => toBinary(ConnectResponseSchema, m)));
    const whole = create(ConnectResponseSchema, {
      message: { case: "batch", value: { messages: responses } },
    });
    expect(framed).toEqual(Buffer.from(toBinary(ConnectResponseSchema, whole)));

    const requests = [
      create(ConnectRequestSchema, { message: { case: "goodbye", value: { reason: "bye" } } }),
      create(ConnectRequestSchema, {
        message: { case: "grantAck", value: { reportId: 1n, actionId: "a", epoch: 2n } },
      }),
    ];
    const batch = fromBinary(
      ConnectRequestSchema,
      encodeRequestBatch(requests.map((m) => toBinary(ConnectRequestSchema, m))),
    );
    expect(batch.message.case).toBe("batch");
    expect(toBinary(ConnectRequestSchema, batch)).toEqual(
      toBinary(
        ConnectRequestSchema,
        create(ConnectRequestSchema, { message: { case: "batch", value: { messages: requests } } }),
      ),
    );
  });

  it("splits messages into runs bounded by count and bytes, a large message alone", () => {
    const sized = (n: number) => new Uint8Array(n);
    const runs: number[][] = [];
    batchRuns(
      [sized(4), sized(4), sized(4), sized(20), sized(1), sized(1), sized(1), sized(1)],
      3,
      10,
      (run) => runs.push(run.map((m) => m.byteLength)),
    );
    expect(runs).toEqual([[4, 4], [4], [20], [1, 1, 1], [1]]);
  });
});
