import { create, type DescMessage, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { ConnectRequestSchema, ConnectResponseSchema } from "../../src/gen/leasehold/v1/worker_pb.js";
import { RejectedRequest, requestDecoder } from "../../src/rpc/request-decoder.js";
import { toConnectResponse, WORKER_FAST_DECODERS } from "../../src/rpc/services/worker-service.js";
import {
  batchRuns,
  decodeBareHeartbeat,
  decodeServerMessage,
  decodeWorkerReports,
  encodeGrant,
  encodeGrantAck,
  encodeHeartbeatAck,
  encodeReportResult,
  encodeRequestBatch,
  encodeResponseBatch,
  encodeSuccess,
  type GrantFields,
  type ReportResultFields,
} from "../../src/rpc/worker-wire.js";
import type { JsonObject } from "../../src/work/action.js";
import type { ServerMessage } from "../../src/work/worker-messages.js";
import { agreesWith, expectNeverDiffers } from "../helpers/wire.js";

const ack = (sequence: bigint, remainingMs: number) =>
  toBinary(
    ConnectResponseSchema,
    create(ConnectResponseSchema, {
      message: { case: "heartbeatAck", value: { sequence, remaining: durationFromMs(remainingMs) } },
    }),
  );

/** What the ordinary path (protobuf-es) makes of a server message. */
const ordinary = (m: ServerMessage) =>
  toBinary(ConnectResponseSchema, create(ConnectResponseSchema, toConnectResponse(m)));
const grant = (g: GrantFields) => ordinary({ type: "grant", ...g });
const reportResult = (r: ReportResultFields) => ordinary({ type: "report_result", ...r });

/** JSON that exercises every kind of google.protobuf.Value and the varint lengths past one byte. */
const payloads: (JsonObject | null)[] = [
  null,
  {},
  { n: 1 },
  { "": "", zero: 0, negZero: -0, neg: -12.5, big: 2 ** 60, tiny: 5e-324, t: true, f: false, nil: null },
  { text: 'quote " backslash \\ newline \n U+2028 \u2028 emoji 😀 lone \ud800 é', 键: "值" },
  { list: [], nested: { a: [1, "two", null, { b: [[], {}] }], deep: { deeper: { deepest: [true] } } } },
  { long: "x".repeat(300), many: Array.from({ length: 200 }, (_, i) => ({ i, s: String(i) })) },
  Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`k${i}`, "v".repeat(i * 10)])),
];

describe("worker stream wire encodings", () => {
  it("encodes a grant to exactly the bytes toBinary gives", () => {
    for (const payload of payloads) {
      for (const checkpoint of [null, { step: 3 }, ...payloads.slice(4, 6)]) {
        for (const [epoch, attempt, runId, traceParent] of [
          [0, 0, "", undefined],
          [1, 1, "run-1", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
          [2 ** 53 - 1, 2 ** 32 - 1, "r".repeat(200), ""],
        ] as const) {
          const g: GrantFields = {
            actionId: "0193a5f2-7c1e-7b3a-8f00-000000000001",
            epoch,
            attempt,
            payload,
            runId,
            checkpoint,
            traceParent,
          };
          expect(encodeGrant(g), JSON.stringify(g)).toEqual(Buffer.from(grant(g)));
        }
      }
    }
  });

  it("encodes a report result to exactly the bytes toBinary gives", () => {
    for (const reportId of [0n, 1n, 128n, 2n ** 40n, 2n ** 53n - 1n]) {
      for (const rejectReason of [undefined, "FENCED", "INVALID", "NOT_FOUND", "UNAVAILABLE"] as const) {
        for (const message of ["", "action is now SUCCEEDED", "é".repeat(100)]) {
          const r: ReportResultFields = {
            reportId,
            actionId: reportId === 0n ? "" : "a-1",
            epoch: Number(reportId % 1000n),
            accepted: rejectReason === undefined,
            rejectReason,
            message,
          };
          expect(encodeReportResult(r), JSON.stringify({ ...r, reportId: String(reportId) })).toEqual(
            Buffer.from(reportResult(r)),
          );
        }
      }
    }
  });

  it("leaves grants and report results outside its fast path to the ordinary encoder", () => {
    const g: GrantFields = { actionId: "a", epoch: 1, attempt: 1, payload: {}, runId: "", checkpoint: null };
    expect(encodeGrant({ ...g, epoch: 2 ** 53 })).toBeUndefined();
    expect(encodeGrant({ ...g, epoch: -1 })).toBeUndefined();
    expect(encodeGrant({ ...g, attempt: 2 ** 32 })).toBeUndefined();
    expect(encodeGrant({ ...g, payload: { x: undefined } as unknown as JsonObject })).toBeUndefined();
    expect(encodeGrant({ ...g, payload: { x: [Number.NaN] } })).toBeUndefined();
    expect(encodeGrant({ ...g, payload: ["a", 1] as unknown as JsonObject })).toBeUndefined();
    expect(encodeGrant({ ...g, checkpoint: { x: { y: () => 1 } } as unknown as JsonObject })).toBeUndefined();
    const r: ReportResultFields = { reportId: 1n, actionId: "a", epoch: 1, accepted: true, message: "" };
    expect(encodeReportResult({ ...r, reportId: 2n ** 53n })).toBeUndefined();
    expect(encodeReportResult({ ...r, reportId: -1n })).toBeUndefined();
    expect(encodeReportResult({ ...r, epoch: 0.5 })).toBeUndefined();
  });

  it("encodes a successful completion to exactly the bytes toBinary gives", () => {
    const success = (c: {
      reportId: bigint;
      actionId: string;
      epoch: bigint;
      traceParent: string;
      output: JsonObject | undefined;
    }) =>
      toBinary(
        ConnectRequestSchema,
        create(ConnectRequestSchema, {
          message: {
            case: "completion",
            value: {
              reportId: c.reportId,
              actionId: c.actionId,
              epoch: c.epoch,
              traceParent: c.traceParent,
              outcome: { case: "succeeded", value: { output: c.output as never } },
            },
          },
        }),
      );
    for (const output of [undefined, ...payloads.filter((p) => p !== null)]) {
      for (const [reportId, actionId, epoch, traceParent] of [
        [0n, "", 0n, ""],
        [
          1n,
          "0193a5f2-7c1e-7b3a-8f00-000000000001",
          1n,
          "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ],
        [2n ** 53n - 1n, "ação-😀", 2n ** 53n - 1n, ""],
      ] as const) {
        const c = { reportId, actionId, epoch, traceParent, output: output as JsonObject | undefined };
        expect(encodeSuccess(c), JSON.stringify(output)).toEqual(Buffer.from(success(c)));
      }
    }
    // Outside the fast path: left to protobuf-es.
    const base = { reportId: 1n, actionId: "a", epoch: 1n, traceParent: "", output: undefined };
    expect(encodeSuccess({ ...base, reportId: 2n ** 53n })).toBeUndefined();
    expect(encodeSuccess({ ...base, epoch: 2n ** 64n - 1n })).toBeUndefined();
    expect(encodeSuccess({ ...base, output: [1, 2] as unknown as JsonObject })).toBeUndefined();
    expect(encodeSuccess({ ...base, output: { n: Number.NaN } })).toBeUndefined();
    // A JavaScript handler may return anything: protobuf-es writes an empty Struct for it.
    for (const odd of ["", 0, false])
      expect(encodeSuccess({ ...base, output: odd as never })).toBeUndefined();
  });

  it("encodes a grant ack to exactly the bytes toBinary gives", () => {
    for (const [reportId, actionId, epoch] of [
      [0n, "", 0n],
      [1n, "0193a5f2-7c1e-7b3a-8f00-000000000001", 1n],
      [2n ** 53n - 1n, "ação-😀", 2n ** 53n - 1n],
    ] as const) {
      const ordinary = toBinary(
        ConnectRequestSchema,
        create(ConnectRequestSchema, { message: { case: "grantAck", value: { reportId, actionId, epoch } } }),
      );
      expect(encodeGrantAck(reportId, actionId, epoch)).toEqual(Buffer.from(ordinary));
    }
    expect(encodeGrantAck(2n ** 53n, "a", 1n)).toBeUndefined();
    expect(encodeGrantAck(1n, "a", 2n ** 64n - 1n)).toBeUndefined();
  });

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

describe("decodeBareHeartbeat", () => {
  const heartbeat = (sequence: bigint, heldLeases: { actionId: string; epoch: bigint }[] = []) =>
    toBinary(
      ConnectRequestSchema,
      create(ConnectRequestSchema, { message: { case: "heartbeat", value: { sequence, heldLeases } } }),
    );
  const decode = requestDecoder(ConnectRequestSchema);

  it("gives what protobuf-es and the validator give for a heartbeat with only a sequence", () => {
    const sequences = [0n, 1n, 127n, 128n, 300n, 16_383n, 16_384n, 2n ** 31n, 2n ** 32n + 5n, 2n ** 53n - 1n];
    for (const sequence of sequences) {
      const bytes = heartbeat(sequence);
      const fast = decodeBareHeartbeat(bytes);
      expect(fast, `sequence ${sequence}`).toEqual(fromBinary(ConnectRequestSchema, bytes));
      expect(fast).toEqual(decode(Buffer.from(bytes)));
      expect(fast?.message.case === "heartbeat" && fast.message.value.sequence).toBe(sequence);
    }
    // A sequence of 0 written out, and a varint longer than it needs to be, decode the same way.
    for (const bytes of [
      [0x12, 0x02, 0x08, 0x00],
      [0x12, 0x04, 0x08, 0x85, 0x80, 0x00],
    ]) {
      const raw = Uint8Array.from(bytes);
      expect(decodeBareHeartbeat(raw)).toEqual(fromBinary(ConnectRequestSchema, raw));
    }
  });

  it("leaves everything else to the ordinary decoder", () => {
    const others: [string, Uint8Array][] = [
      ["a sequence past 2^53 - 1", heartbeat(2n ** 53n)],
      ["the largest sequence", heartbeat(2n ** 64n - 1n)],
      ["held leases", heartbeat(3n, [{ actionId: "a", epoch: 1n }])],
      ["another field in the heartbeat", Uint8Array.from([0x12, 0x04, 0x08, 0x01, 0x18, 0x01])],
      ["a field after the heartbeat", Uint8Array.from([0x12, 0x02, 0x08, 0x01, 0x3a, 0x00])],
      ["a varint cut short", Uint8Array.from([0x12, 0x02, 0x08, 0x80])],
      ["a length longer than the bytes", Uint8Array.from([0x12, 0x03, 0x08, 0x01])],
      ["nothing", new Uint8Array(0)],
      [
        "a goodbye",
        toBinary(
          ConnectRequestSchema,
          create(ConnectRequestSchema, { message: { case: "goodbye", value: { reason: "done" } } }),
        ),
      ],
    ];
    for (const [what, bytes] of others) expect(decodeBareHeartbeat(bytes), what).toBeUndefined();
  });
});

describe("decodeServerMessage", () => {
  const response = (message: object) => encoded(ConnectResponseSchema, message);
  /** The fast decoder gives either nothing or exactly what protobuf-es gives. */
  const ordinary = (bytes: Buffer) => fromBinary(ConnectResponseSchema, bytes);
  const agrees = (bytes: Buffer, what: string) => agreesWith(decodeServerMessage, ordinary, bytes, what);

  const grants = payloads.flatMap((payload) =>
    [null, { step: 3, log: ["é", null] }].map((checkpoint, i) =>
      response({
        case: "grant",
        value: {
          actionId: i === 0 ? "0193a5f2-7c1e-7b3a-8f00-000000000001" : "ação-😀",
          epoch: i === 0 ? 1n : 2n ** 53n - 1n,
          attempt: i === 0 ? 1 : 2 ** 32 - 1,
          runId: i === 0 ? "" : "run-1",
          traceParent: i === 0 ? "" : "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
          ...(payload ? { payload } : {}),
          ...(checkpoint ? { checkpoint } : {}),
        },
      }),
    ),
  );
  const results = [0n, 1n, 2n ** 53n - 1n].flatMap((reportId) =>
    [0, 1, 2, 3, 4, 77].map((rejectReason) =>
      response({
        case: "reportResult",
        value: {
          reportId,
          actionId: reportId === 0n ? "" : "a-1",
          epoch: reportId,
          accepted: rejectReason === 0,
          rejectReason,
          message: rejectReason === 0 ? "" : "fenced: é",
        },
      }),
    ),
  );
  const acks = [0n, 5n, 2n ** 53n - 1n].flatMap((sequence) =>
    [undefined, 0, 1, 999, 1000, 2500, 86_400_000].flatMap((ms) =>
      [false, true].map((databaseUnreachable) =>
        response({
          case: "heartbeatAck",
          value: {
            sequence,
            databaseUnreachable,
            ...(ms === undefined ? {} : { remaining: durationFromMs(ms) }),
          },
        }),
      ),
    ),
  );

  it("gives what fromBinary gives for grants, report results, heartbeat acks and batches of them", () => {
    const known = [...grants, ...results, ...acks];
    for (const bytes of known) expect(agrees(bytes, bytes.toString("hex")), bytes.toString("hex")).toBe(true);
    const batch = encodeResponseBatch([results[1], grants[3], acks[4], grants[9]] as Buffer[]);
    expect(agrees(batch, "a batch")).toBe(true);
    expect(agrees(encodeResponseBatch([]), "an empty batch")).toBe(true);
    // A leading U+FEFF is text, as protobuf-es reads it.
    expect(agrees(response({ case: "reportResult", value: { message: "\ufeffbom" } }), "a BOM")).toBe(true);
  });

  it("leaves everything else to fromBinary", () => {
    const grant = (value: object) =>
      response({ case: "grant", value: { actionId: "a", epoch: 1n, attempt: 1, ...value } });
    const others: [string, Buffer][] = [
      ["a welcome", response({ case: "welcome", value: { sessionId: "s" } })],
      ["a revoke", response({ case: "revoke", value: { actionId: "a", epoch: 1n } })],
      ["a drain", response({ case: "drain", value: {} })],
      ["an epoch past 2^53 - 1", grant({ epoch: 2n ** 53n })],
      ["the largest report id", response({ case: "reportResult", value: { reportId: 2n ** 64n - 1n } })],
      ["a negative reject reason", response({ case: "reportResult", value: { rejectReason: -1 } })],
      ["a batch in a batch", encodeResponseBatch([encodeResponseBatch([results[0] as Buffer])])],
      ["a welcome in a batch", encodeResponseBatch([response({ case: "drain", value: {} })])],
      // Grant{payload: {k: Value{}}}: a Value with no kind is not JSON.
      [
        "a Value with no kind",
        Buffer.from([0x12, 0x09, 0x22, 0x07, 0x0a, 0x05, 0x0a, 0x01, 0x6b, 0x12, 0x00]),
      ],
      ["a key __proto__", grant({ payload: JSON.parse('{"__proto__": 1}') })],
      // Grant{payload: {x: [true], x: [true]}} in one map entry: protobuf-es joins the two lists.
      [
        "a map entry with two values",
        Buffer.from("1217221" + "50a130a017812063204" + "0a022001120632040a022001", "hex"),
      ],
      // ... and two keys in one entry.
      ["a map entry with two keys", Buffer.from("120e220c0a0a0a01780a0179120220" + "01", "hex")],
      // ReportResult{epoch: 3, epoch: 4}
      ["a field twice", Buffer.from([0x2a, 0x04, 0x18, 0x03, 0x18, 0x04])],
      ["an unknown field", Buffer.from([0x12, 0x02, 0x40, 0x01])],
      ["a string that is not UTF-8", Buffer.from([0x2a, 0x03, 0x12, 0x01, 0xff])],
      ["bytes after the message", Buffer.concat([results[1] as Buffer, Buffer.from([0x00])])],
      ["nothing", Buffer.alloc(0)],
    ];
    for (const [what, bytes] of others) expect(decodeServerMessage(bytes), what).toBeUndefined();
  });

  it("never gives anything but what fromBinary gives, whatever the bytes", () => {
    const samples = [grants[3], grants[9], grants[11], results[7], acks[5]] as Buffer[];
    expectNeverDiffers(samples, decodeServerMessage, ordinary, 7);
  });
});

/** A ConnectRequest or ConnectResponse holding `message`, built freely (any JSON, any enum number). */
function encoded<D extends DescMessage>(schema: D, message: object): Buffer {
  return Buffer.from(toBinary(schema, create(schema, { message } as unknown as MessageInitShape<D>)));
}

describe("decodeWorkerReports", () => {
  const request = (message: object) => encoded(ConnectRequestSchema, message);
  /** What the server's ordinary decoder reads (unknown fields skipped). */
  const ordinary = (bytes: Uint8Array) =>
    fromBinary(ConnectRequestSchema, bytes, { readUnknownFields: false });
  const agrees = (bytes: Buffer, what: string) => agreesWith(decodeWorkerReports, ordinary, bytes, what);
  const completion = (value: object) =>
    request({ case: "completion", value: { reportId: 7n, actionId: "a-1", epoch: 2n, ...value } });
  const completions = [
    ...payloads.map((output) =>
      completion({ outcome: { case: "succeeded", value: output ? { output } : {} } }),
    ),
    completion({
      reportId: 2n ** 53n - 1n,
      actionId: "ação",
      epoch: 2n ** 53n - 1n,
      outcome: { case: "succeeded", value: {} },
      traceParent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }),
  ];
  const acks = [0n, 1n, 2n ** 53n - 1n].map((reportId) =>
    request({
      case: "grantAck",
      value: { reportId, actionId: reportId === 0n ? "" : "a-2", epoch: reportId },
    }),
  );

  it("gives what fromBinary gives for successful completions, grant acks and batches of them", () => {
    for (const bytes of [...completions, ...acks]) expect(agrees(bytes, bytes.toString("hex"))).toBe(true);
    expect(agrees(encodeRequestBatch([acks[1], completions[2], completions[4]] as Buffer[]), "a batch")).toBe(
      true,
    );
  });

  it("leaves everything else to fromBinary", () => {
    const others: [string, Buffer][] = [
      ["a failure", completion({ outcome: { case: "failed", value: { message: "x" } } })],
      ["no outcome", completion({})],
      ["a release", request({ case: "release", value: { reportId: 1n, actionId: "a", epoch: 1n } })],
      ["a progress report", request({ case: "progress", value: { reportId: 1n, actionId: "a", epoch: 1n } })],
      ["a heartbeat", request({ case: "heartbeat", value: { sequence: 1n } })],
      ["an epoch past 2^53 - 1", completion({ epoch: 2n ** 53n, outcome: { case: "succeeded", value: {} } })],
      [
        "a heartbeat in a batch",
        encodeRequestBatch([request({ case: "heartbeat", value: { sequence: 1n } })]),
      ],
      ["a batch in a batch", encodeRequestBatch([encodeRequestBatch([acks[1] as Buffer])])],
      ["an unknown field", Buffer.from([0x1a, 0x02, 0x40, 0x01])],
      ["a string that is not UTF-8", Buffer.from([0x1a, 0x03, 0x12, 0x01, 0xff])],
      // An output {x: [true], x: [true]} in one map entry: protobuf-es joins the two lists (so a
      // validator shown only the last would let through an output over the limits).
      [
        "an output's map entry with two values",
        Buffer.from("2a1c120161221" + "70a150a130a0178120632040a022001120632040a022001", "hex"),
      ],
      [
        "an output with a Value of no kind",
        Buffer.from([0x2a, 0x0b, 0x22, 0x09, 0x0a, 0x07, 0x0a, 0x05, 0x0a, 0x01, 0x6b, 0x12, 0x00]),
      ],
    ];
    for (const [what, bytes] of others) expect(decodeWorkerReports(bytes), what).toBeUndefined();
  });

  it("never gives anything but what fromBinary gives, whatever the bytes", () => {
    const samples = [completions[2], completions[4], completions[7], acks[1]] as Buffer[];
    samples.push(encodeRequestBatch([acks[2], completions[3]] as Buffer[]));
    expectNeverDiffers(samples, decodeWorkerReports, ordinary, 11);
  });

  it("is validated as the ordinary path validates: what the validator refuses is decoded again, and kept to be answered INVALID", () => {
    const fast = WORKER_FAST_DECODERS.connect as (bytes: Buffer) => object | undefined;
    const decode = requestDecoder(ConnectRequestSchema);
    const valid = completions[3] as Buffer;
    expect(fast(valid)).toStrictEqual(decode(valid));
    // trace_parent is limited to 128 characters, and an output to 10,000 values.
    const tooMany = { output: { many: Array.from({ length: 10_001 }, () => null) } };
    for (const refused of [
      completion({ outcome: { case: "succeeded", value: {} }, traceParent: "x".repeat(129) }),
      completion({ outcome: { case: "succeeded", value: tooMany } }),
    ]) {
      expect(decodeWorkerReports(refused)).toBeDefined();
      expect(decode(refused)).toBeInstanceOf(RejectedRequest);
      // A report that breaks the checks is not the stream's end (worker.proto): the request goes on.
      const kept = fast(refused);
      expect(kept).not.toBeInstanceOf(RejectedRequest);
      expect(kept).toMatchObject({ message: { case: "completion" } });
    }
  });
});
