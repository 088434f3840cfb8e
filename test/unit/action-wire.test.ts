import { create, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import {
  ActionSchema,
  ActionState,
  ActionView,
  SubmitActionRequestSchema,
  SubmitActionsRequestSchema,
  SubmitActionsResponseSchema,
} from "../../src/gen/leasehold/v1/action_pb.js";
import { decodeBasicSubmitResults, decodeSubmitActionsRequest } from "../../src/rpc/action-wire.js";
import { RejectedRequest, requestDecoder } from "../../src/rpc/request-decoder.js";
import { ACTION_FAST_DECODERS } from "../../src/rpc/services/action-service.js";
import { agreesWith, expectNeverDiffers } from "../helpers/wire.js";

type Init = MessageInitShape<typeof SubmitActionsRequestSchema>;
const request = (init: Init) =>
  Buffer.from(toBinary(SubmitActionsRequestSchema, create(SubmitActionsRequestSchema, init)));
/** What the server's ordinary decoder reads (unknown fields skipped). */
const ordinary = (bytes: Uint8Array) =>
  fromBinary(SubmitActionsRequestSchema, bytes, { readUnknownFields: false });

/** Every field of SubmitActionRequest, at its edges. */
const everything = request({
  actions: [
    {
      requestId: "req-ação-1",
      cluster: "east",
      runId: "run-7",
      labelSelector: { gpu: "a100", zone: "", "": "empty key" },
      payload: {
        n: 1,
        s: "x",
        b: true,
        z: null,
        list: [1, "two", { three: [] }],
        nested: { deep: { x: -1.5 } },
      },
      priority: 2 ** 31 - 1,
      retryPolicy: {
        maxAttempts: 2 ** 32 - 1,
        initialBackoff: { seconds: 1n, nanos: 500_000_000 },
        backoffMultiplier: 1.5,
        maxBackoff: { seconds: 2n ** 53n - 1n, nanos: 999_999_999 },
      },
      maxSystemRetries: 2 ** 32 - 1,
    },
    {},
    { cluster: "west", payload: {} },
    { cluster: "west", retryPolicy: {} },
    { cluster: "west", retryPolicy: { backoffMultiplier: Number.NaN, initialBackoff: {} } },
  ],
  view: ActionView.BASIC,
});
/** What the peers' comparison sends: 1,000 actions of one cluster with a small payload. */
const bulk = request({
  actions: Array.from({ length: 1000 }, (_, i) => ({ cluster: "bench", payload: { n: i } })),
  view: ActionView.BASIC,
});

describe("decodeSubmitActionsRequest", () => {
  const agrees = (bytes: Buffer, what: string) =>
    agreesWith(decodeSubmitActionsRequest, ordinary, bytes, what);

  it("gives exactly what fromBinary gives for what clients send", () => {
    expect(agrees(everything, "every field")).toBe(true);
    expect(agrees(bulk, "1,000 actions")).toBe(true);
    expect(agrees(request({}), "nothing")).toBe(true);
    expect(agrees(request({ view: 77 as ActionView }), "a view this server does not know")).toBe(true);
    // Two requests sent as one: their actions are concatenated.
    const joined = Buffer.concat([
      request({ actions: [{ cluster: "a" }] }),
      request({ actions: [{ cluster: "b" }] }),
    ]);
    expect(agrees(joined, "two requests joined")).toBe(true);
    // A map key given twice in one action: the later entry wins, as in protobuf-es.
    const entries = Buffer.concat(
      ["first", "second"].map((v) =>
        Buffer.from(
          toBinary(SubmitActionRequestSchema, create(SubmitActionRequestSchema, { labelSelector: { k: v } })),
        ),
      ),
    );
    const twice = Buffer.concat([Buffer.from([0x0a, entries.length]), entries]);
    expect(agrees(twice, "a label key twice")).toBe(true);
    expect(decodeSubmitActionsRequest(twice)?.actions[0]?.labelSelector).toEqual({ k: "second" });
  });

  it("declines what it does not read by hand, for protobuf-es to read", () => {
    const declined: [string, Buffer][] = [
      ["a negative priority (ten bytes)", request({ actions: [{ priority: -1 }] })],
      ["a negative backoff", request({ actions: [{ retryPolicy: { initialBackoff: { seconds: -1n } } }] })],
      ["an unknown field", Buffer.concat([request({ actions: [{}] }), Buffer.from([0x78, 0x01])])],
      ["the view twice", Buffer.concat([request({ view: 1 }), request({ view: 2 })])],
      ["a label key __proto__", request({ actions: [{ labelSelector: { ["__proto__"]: "x" } }] })],
      ["a payload that is not JSON", request({ actions: [{ payload: { x: Number.POSITIVE_INFINITY } }] })],
      ["a cluster that is not UTF-8", Buffer.from([0x0a, 0x03, 0x12, 0x01, 0xff])],
    ];
    for (const [what, bytes] of declined) expect(decodeSubmitActionsRequest(bytes), what).toBeUndefined();
  });

  it("never gives anything but what fromBinary gives, whatever the bytes", () => {
    expectNeverDiffers(
      [everything, request({ actions: [{ cluster: "c", payload: { n: 1 } }] })],
      decodeSubmitActionsRequest,
      ordinary,
      11,
    );
  });
});

describe("the server's decoder of SubmitActions", () => {
  const fast = ACTION_FAST_DECODERS.submitActions as (bytes: Buffer) => object | undefined;
  const decode = requestDecoder(SubmitActionsRequestSchema);

  it("gives what the ordinary decoder gives for a valid request", () => {
    expect(fast(bulk)).toStrictEqual(decode(bulk));
  });

  it("leaves a request the validator refuses to the ordinary decoder, which answers it", () => {
    const tooLong = request({ actions: [{ cluster: "c", requestId: "r".repeat(10_000) }] });
    expect(fast(tooLong)).toBeUndefined();
    const answer = decode(tooLong);
    expect(answer).toBeInstanceOf(RejectedRequest);
    expect((answer as RejectedRequest).error.message).toContain("actions[0].request_id");
  });
});

describe("decodeBasicSubmitResults", () => {
  type Results = NonNullable<MessageInitShape<typeof SubmitActionsResponseSchema>["results"]>;
  const answer = (results: Results) =>
    Buffer.from(toBinary(SubmitActionsResponseSchema, create(SubmitActionsResponseSchema, { results })));
  const ordinary = (bytes: Uint8Array) => fromBinary(SubmitActionsResponseSchema, bytes);
  const agrees = (bytes: Buffer, what: string) => agreesWith(decodeBasicSubmitResults, ordinary, bytes, what);
  const basic = answer([
    {
      action: {
        id: "01a244d1-17ce-74ab-9bea-38954fe13bde",
        requestId: "req-ação",
        runId: "run-1",
        cluster: "east",
        state: ActionState.QUEUED,
        createTime: { seconds: 1_796_450_396n, nanos: 123_000_000 },
        createdBy: " alice ",
      },
      created: true,
    },
    { action: { id: "b", cluster: "east", state: ActionState.SUCCEEDED, createTime: {} }, created: false },
    { action: {} },
    {},
  ]);

  it("gives exactly what fromBinary gives for the basic view", () => {
    expect(agrees(basic, "the basic view's fields")).toBe(true);
    expect(agrees(answer([]), "no results")).toBe(true);
    const many = answer(
      Array.from({ length: 1000 }, (_, i) => ({
        action: {
          id: `id-${i}`,
          cluster: "bench",
          state: ActionState.QUEUED,
          createTime: { seconds: BigInt(i) },
        },
        created: true,
      })),
    );
    expect(agrees(many, "1,000 results")).toBe(true);
  });

  /** A SubmitActionsResponse of one result whose action is `action` (bytes written by hand). */
  const answerWithAction = (action: Buffer) => {
    const result = Buffer.concat([Buffer.from([0x0a, action.length]), action]);
    return Buffer.concat([Buffer.from([0x0a, result.length]), result]);
  };
  const actionBytes = (init: MessageInitShape<typeof ActionSchema>) =>
    Buffer.from(toBinary(ActionSchema, create(ActionSchema, init)));
  const twoTimes = Buffer.concat([
    actionBytes({ id: "a", createTime: { seconds: 5n } }),
    actionBytes({ createTime: { nanos: 7 } }),
  ]);

  it("declines the full view and whatever it does not read, for protobuf-es to read", () => {
    // What it declines, protobuf-es merges.
    expect(ordinary(answerWithAction(twoTimes)).results[0]?.action?.createTime).toMatchObject({
      seconds: 5n,
      nanos: 7,
    });
    const declined: [string, Buffer][] = [
      ["a payload (full view)", answer([{ action: { id: "a", payload: { n: 1 } } }])],
      ["an epoch (full view)", answer([{ action: { id: "a", epoch: 3n } }])],
      ["an update time (full view)", answer([{ action: { id: "a", updateTime: { seconds: 1n } } }])],
      ["a time before 1970", answer([{ action: { id: "a", createTime: { seconds: -1n } } }])],
      // Two create times in one action: protobuf-es merges them (seconds of one, nanos of the other).
      ["a message field twice", answerWithAction(twoTimes)],
      // Field 1 behind a tag of 6 bytes: protobuf-es refuses it ("varint overflows uint32").
      ["a tag over 5 bytes", Buffer.from("0a0a0a088a80808080000161", "hex")],
    ];
    expect(() => ordinary(Buffer.from("0a0a0a088a80808080000161", "hex"))).toThrow(/overflows uint32/);
    for (const [what, bytes] of declined) expect(decodeBasicSubmitResults(bytes), what).toBeUndefined();
  });

  it("never gives anything but what fromBinary gives, whatever the bytes", () => {
    expectNeverDiffers([basic], decodeBasicSubmitResults, ordinary, 13);
  });
});
