import {
  create,
  type DescMessage,
  type JsonObject,
  type MessageInitShape,
  toBinary,
} from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { describe, expect, it } from "vitest";
import { Code, type LeaseholdError, quote } from "../../src/errors.js";
import { ActionService, SubmitActionRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { ClusterService } from "../../src/gen/leasehold/v1/cluster_pb.js";
import {
  type EventKind,
  EventService,
  ListEventsRequestSchema,
  WatchEventsRequestSchema,
} from "../../src/gen/leasehold/v1/event_pb.js";
import {
  CreateLeaseRequestSchema,
  DeleteLeasesRequestSchema,
  LeaseService,
  WaitLeaseRequestSchema,
} from "../../src/gen/leasehold/v1/lease_pb.js";
import { CreateDeploymentRequestSchema, ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { ConnectRequestSchema, WorkerService } from "../../src/gen/leasehold/v1/worker_pb.js";
import { charactersOver, FIELD_LIMITS, PAYLOAD_LIMITS } from "../../src/rpc/limits.js";
import { RejectedRequest, requestDecoder } from "../../src/rpc/request-decoder.js";
import { requestValidator } from "../../src/rpc/request-validator.js";

const SERVICES = [ActionService, ClusterService, EventService, LeaseService, ResourceService, WorkerService];

/** Decodes and validates `init` as the wire would carry it; the error, or undefined if it passes. */
function check<D extends DescMessage>(desc: D, init: MessageInitShape<D>): LeaseholdError | undefined {
  const result = requestDecoder(desc)(Buffer.from(toBinary(desc, create(desc, init))));
  return result instanceof RejectedRequest ? result.error : undefined;
}

/** The code, message and field paths of a refusal. */
const refusal = (error: LeaseholdError | undefined) =>
  error && { code: error.code, message: error.message, fields: error.fieldViolations.map((v) => v.field) };

/** A JSON object nested `levels` deep. */
function nested(levels: number): JsonObject {
  let value: JsonObject = {};
  for (let i = 1; i < levels; i++) value = { a: value };
  return value;
}

describe("the request validator", () => {
  it("compiles for every request of every service", () => {
    for (const service of SERVICES) {
      for (const method of service.methods) expect(() => requestValidator(method.input)).not.toThrow();
    }
  });

  it("has a limit table whose every entry names a request field", () => {
    const fields = new Set<string>();
    const visit = (desc: DescMessage, seen: Set<string>) => {
      if (seen.has(desc.typeName)) return;
      seen.add(desc.typeName);
      for (const f of desc.fields) {
        fields.add(`${desc.typeName}.${f.name}`);
        const child = (f as { message?: DescMessage }).message;
        if (child) visit(child, seen);
      }
    };
    const seen = new Set<string>();
    for (const service of SERVICES) for (const method of service.methods) visit(method.input, seen);
    expect(Object.keys(FIELD_LIMITS).filter((name) => !fields.has(name))).toEqual([]);
  });

  it("passes valid requests, payloads and heartbeats untouched", () => {
    expect(
      check(SubmitActionRequestSchema, {
        cluster: "east",
        labelSelector: { gpu: "a100" },
        payload: {
          argv: ["echo", "hi"],
          nested: nested(PAYLOAD_LIMITS.depth - 1),
          n: 1.5,
          ok: true,
          none: null,
        },
        retryPolicy: { initialBackoff: { seconds: 1n } },
      }),
    ).toBeUndefined();
    expect(
      check(ConnectRequestSchema, {
        message: {
          case: "heartbeat",
          value: { sequence: 2n ** 64n - 1n, heldLeases: [{ actionId: "a", epoch: 2n ** 53n - 1n }] },
        },
      }),
    ).toBeUndefined();
    expect(check(WatchEventsRequestSchema, { afterSequence: 0n })).toBeUndefined();
  });

  it("refuses NUL in any string, naming the field: ids, map keys and values, list elements, payloads", () => {
    expect(refusal(check(ListEventsRequestSchema, { actionId: "a\u0000b" }))).toEqual({
      code: Code.InvalidArgument,
      message: "action_id: must not contain NUL (\\u0000) characters",
      fields: ["action_id"],
    });
    expect(
      refusal(
        check(SubmitActionRequestSchema, {
          cluster: "c",
          labelSelector: { "k\u0000": "v", k: "v\u0000" },
          payload: { list: [1, "x\u0000"], "key\u0000": 1 },
        }),
      )?.fields,
    ).toEqual([
      'label_selector["k\\u0000"]',
      'label_selector["k"]',
      'payload["list"][1]',
      'payload["key\\u0000"]',
    ]);
    expect(
      refusal(
        check(CreateDeploymentRequestSchema, {
          spec: { containers: [{ name: "a", command: { argv: ["ok", "b\u0000"] } }] },
        }),
      )?.fields,
    ).toEqual(["spec.containers[0].command.argv[1]"]);
  });

  it("bounds every string, echoing no more than a short prefix", () => {
    const error = check(ListEventsRequestSchema, { cluster: "x".repeat(1024 * 1024) });
    expect(refusal(error)).toEqual({
      code: Code.InvalidArgument,
      message: "cluster: must be at most 128 characters (got 1048576)",
      fields: ["cluster"],
    });
    // Free text gets a larger limit from the table.
    expect(check(ListEventsRequestSchema, { pageToken: "t".repeat(1024) })).toBeUndefined();
    expect(refusal(check(ListEventsRequestSchema, { pageToken: "t".repeat(1025) }))?.fields).toEqual([
      "page_token",
    ]);
    expect(quote("y".repeat(1000))).toBe(`"${"y".repeat(64)}"…`);
  });

  it("counts characters, not UTF-16 units: an emoji is one character, as in Python and Go", () => {
    const emoji = "\u{1F600}"; // two UTF-16 units
    expect(check(ListEventsRequestSchema, { cluster: emoji.repeat(128) })).toBeUndefined();
    expect(refusal(check(ListEventsRequestSchema, { cluster: emoji.repeat(129) }))?.message).toBe(
      "cluster: must be at most 128 characters (got 129)",
    );
    // A lone surrogate (JavaScript only; UTF-8 cannot carry one) counts as one.
    expect(refusal(check(ListEventsRequestSchema, { cluster: "\ud800".repeat(129) }))?.message).toBe(
      "cluster: must be at most 128 characters (got 129)",
    );
    expect(charactersOver(`${emoji}${"a".repeat(127)}`, 128)).toBeUndefined();
    expect(charactersOver(`${"a".repeat(128)}${emoji}`, 128)).toBe(129);
  });

  it("bounds lists and maps", () => {
    const held = Array.from({ length: 20_001 }, () => ({ actionId: "a", epoch: 1n }));
    expect(
      refusal(check(ConnectRequestSchema, { message: { case: "hello", value: { heldLeases: held } } })),
    ).toMatchObject({
      code: Code.InvalidArgument,
      message: "hello.held_leases: must have at most 20000 elements (got 20001)",
    });
    const labels = Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, "v"]));
    expect(refusal(check(SubmitActionRequestSchema, { labelSelector: labels }))?.message).toBe(
      "label_selector: must have at most 64 entries (got 65)",
    );
  });

  it("refuses 64-bit numbers past 2^53 - 1, except those only echoed", () => {
    expect(refusal(check(WatchEventsRequestSchema, { afterSequence: 2n ** 64n - 1n }))).toEqual({
      code: Code.InvalidArgument,
      message: 'after_sequence: must be between 0 and 9007199254740991 (got "18446744073709551615")',
      fields: ["after_sequence"],
    });
    expect(
      refusal(
        check(ConnectRequestSchema, {
          message: { case: "grantAck", value: { reportId: 2n ** 64n - 1n, actionId: "a", epoch: 2n ** 53n } },
        }),
      )?.fields,
    ).toEqual(["grant_ack.epoch"]);
  });

  it("refuses unknown enum values, non-finite doubles, and timestamps and durations out of range", () => {
    expect(refusal(check(ListEventsRequestSchema, { kind: 999 as EventKind }))?.message).toBe(
      "kind: is not a known EventKind (999)",
    );
    expect(
      refusal(check(SubmitActionRequestSchema, { retryPolicy: { backoffMultiplier: Number.NaN } }))?.message,
    ).toBe("retry_policy.backoff_multiplier: must be a finite number (got NaN)");
    for (const closedBefore of [{ seconds: -62_135_596_801n }, { seconds: 2n ** 63n - 1n }]) {
      expect(refusal(check(DeleteLeasesRequestSchema, { closedBefore }))?.message).toMatch(
        /^closed_before: must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z/,
      );
    }
    expect(refusal(check(DeleteLeasesRequestSchema, { closedBefore: { nanos: -1 } }))?.fields).toEqual([
      "closed_before",
    ]);
    expect(check(DeleteLeasesRequestSchema, { closedBefore: { seconds: 253_402_300_799n } })).toBeUndefined();
    for (const timeout of [
      { seconds: 2n ** 63n - 1n },
      { seconds: 1n, nanos: -5 },
      { nanos: 1_000_000_000 },
    ]) {
      expect(refusal(check(WaitLeaseRequestSchema, { leaseId: "l", timeout }))?.fields).toEqual(["timeout"]);
    }
  });

  it("answers RESOURCE_EXHAUSTED for a payload too deep, too wide or too large, naming the payload", () => {
    const cases = [
      [nested(PAYLOAD_LIMITS.depth + 1), /^payload: must be nested at most 32 levels deep$/],
      [
        Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`k${i}`, i])),
        /^payload: must have at most 10000 values and keys$/,
      ],
      [{ blob: "x".repeat(1024 * 1024) }, /^payload: must be at most 1 MiB as JSON$/],
    ] as const;
    for (const [payload, message] of cases) {
      const error = check(SubmitActionRequestSchema, { cluster: "c", payload });
      expect(refusal(error)).toEqual({
        code: Code.ResourceExhausted,
        message: expect.stringMatching(message),
        fields: ["payload"],
      });
      expect(error?.reason).toBe("PAYLOAD_TOO_LARGE");
    }
  });

  it("walks the messages of a batch (a ConnectRequest holding ConnectRequests), naming each by its index", () => {
    const progress = (phase: string) => ({
      message: { case: "progress" as const, value: { reportId: 1n, actionId: "a", epoch: 1n, phase } },
    });
    const batch = (messages: MessageInitShape<typeof ConnectRequestSchema>[]) =>
      ({ message: { case: "batch", value: { messages } } }) as const;
    expect(check(ConnectRequestSchema, batch([progress("ok"), progress("ok")]))).toBeUndefined();
    expect(
      refusal(check(ConnectRequestSchema, batch([progress("ok"), progress("a\u0000b")])))?.fields,
    ).toEqual(["batch.messages[1].progress.phase"]);
    // Nested batches are walked too (the worker service refuses them as such).
    expect(
      refusal(check(ConnectRequestSchema, batch([batch([progress("ok"), progress("\u0000")])])))?.fields,
    ).toEqual(["batch.messages[0].batch.messages[1].progress.phase"]);
    const many = Array.from({ length: 1025 }, () => progress("ok"));
    expect(refusal(check(ConnectRequestSchema, batch(many)))).toMatchObject({
      code: Code.InvalidArgument,
      fields: ["batch.messages"],
    });
    expect(check(ConnectRequestSchema, batch(many.slice(1)))).toBeUndefined();
  });

  it("reports at most 16 violations", () => {
    const argv = Array.from({ length: 100 }, () => "\u0000");
    const error = check(CreateDeploymentRequestSchema, {
      spec: { containers: [{ name: "a", command: { argv } }] },
    });
    expect(error?.fieldViolations).toHaveLength(16);
  });
});

describe("the request decoder", () => {
  const decode = requestDecoder(ConnectRequestSchema);

  it("refuses invalid UTF-8 with INVALID_ARGUMENT naming the field", () => {
    const bytes = Buffer.from(
      toBinary(
        ConnectRequestSchema,
        create(ConnectRequestSchema, {
          message: {
            case: "hello",
            value: { workerId: "w", heldLeases: [{ actionId: "a" }, { actionId: "ZQXJZQ" }] },
          },
        }),
      ),
    );
    bytes.set([0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1], bytes.indexOf("ZQXJZQ"));
    const result = decode(bytes);
    expect(result).toBeInstanceOf(RejectedRequest);
    expect(refusal((result as RejectedRequest).error)).toEqual({
      code: Code.InvalidArgument,
      message: "hello.held_leases[1].action_id: is not valid UTF-8",
      fields: ["hello.held_leases[1].action_id"],
    });
  });

  it("refuses bytes that are no message with INVALID_ARGUMENT", () => {
    const result = decode(Buffer.from([0x0a, 0xff, 0xff]));
    expect(refusal((result as RejectedRequest).error)).toMatchObject({
      code: Code.InvalidArgument,
      message: expect.stringMatching(/^request: is not a valid leasehold\.v1\.ConnectRequest/),
    });
  });

  it("names a field sent with a wire type its type never has, and what it should be", () => {
    const refused = (schema: Parameters<typeof requestDecoder>[0], bytes: number[]) =>
      refusal((requestDecoder(schema)(Buffer.from(bytes)) as RejectedRequest).error);
    // CreateLeaseRequest.runtime (1, a string) as a varint.
    expect(refused(CreateLeaseRequestSchema, [0x08, 0x05])).toMatchObject({
      code: Code.InvalidArgument,
      message:
        "runtime: is sent as a varint (wire type 0), but it is a string: check the client's copy of the .proto",
    });
    // Its ttl (2, a Duration) as a varint, after a valid runtime.
    expect(refused(CreateLeaseRequestSchema, [0x0a, 0x01, 0x65, 0x10, 0x05])?.message).toBe(
      "ttl: is sent as a varint (wire type 0), but it is a message (length-delimited): check the client's copy of the .proto",
    );
    // Inside a message: the hello's capacity (3, uint32) as 32 bits.
    const hello = [0x1d, 0x01, 0x00, 0x00, 0x00];
    expect(refused(ConnectRequestSchema, [0x0a, hello.length, ...hello])?.message).toBe(
      "hello.capacity: is sent as 32 bits (wire type 5), but it is a uint32: check the client's copy of the .proto",
    );
  });

  it("refuses a payload nested deeper than the decoder follows, naming its field", () => {
    let struct: Uint8Array = new Uint8Array(0);
    for (let i = 0; i < 500; i++) {
      const value = new BinaryWriter().tag(5, WireType.LengthDelimited).bytes(struct).finish();
      const entry = new BinaryWriter()
        .tag(1, WireType.LengthDelimited)
        .string("a")
        .tag(2, WireType.LengthDelimited)
        .bytes(value)
        .finish();
      struct = new BinaryWriter().tag(1, WireType.LengthDelimited).bytes(entry).finish();
    }
    const bytes = new BinaryWriter()
      .tag(2, WireType.LengthDelimited)
      .string("c")
      .tag(5, WireType.LengthDelimited)
      .bytes(struct)
      .finish();
    const result = requestDecoder(SubmitActionRequestSchema)(Buffer.from(bytes));
    expect(refusal((result as RejectedRequest).error)).toMatchObject({
      code: Code.ResourceExhausted,
      fields: ["payload"],
    });
  });

  it("hands the decoded message along when only validation failed", () => {
    const result = decode(
      Buffer.from(
        toBinary(
          ConnectRequestSchema,
          create(ConnectRequestSchema, { message: { case: "goodbye", value: { reason: "\u0000" } } }),
        ),
      ),
    );
    expect((result as RejectedRequest).message).toMatchObject({ message: { case: "goodbye" } });
  });
});
