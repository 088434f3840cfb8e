import { create, toBinary, toJson } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import {
  ActionSchema,
  SubmitActionRequestSchema,
  SubmitActionsResponseSchema,
} from "../../src/gen/leasehold/v1/action_pb.js";
import { encodeBasicSubmitResults, type SubmitResult } from "../../src/rpc/action-wire.js";
import { toBasicProtoAction, toNewAction, toProtoAction } from "../../src/rpc/services/action-service.js";
import type { ActionRecord, ActionState } from "../../src/work/action.js";

const at = new Date("2026-12-04T10:00:00.000Z");

const record = (over: Partial<ActionRecord>): ActionRecord => ({
  id: "0193a5f2-7c1e-7b3a-8f00-000000000001",
  requestId: null,
  runId: "",
  cluster: "c",
  labelSelector: {},
  payload: null,
  priority: 0,
  retryPolicy: { maxAttempts: 3, initialBackoffMs: 1000, backoffMultiplier: 2, maxBackoffMs: 60_000 },
  maxSystemRetries: 3,
  state: "QUEUED",
  epoch: 0,
  attemptCount: 0,
  failureCount: 0,
  systemRetryCount: 0,
  sessionId: null,
  workerId: null,
  grantedAt: null,
  cancelRequested: false,
  output: null,
  lastError: null,
  failureReason: "",
  phase: "",
  phaseDetails: null,
  stopReason: null,
  createdAt: at,
  updatedAt: at,
  notBefore: at,
  finishedAt: null,
  createdBy: "alice",
  ...over,
});

const json = (a: ActionRecord, view = toProtoAction) => toJson(ActionSchema, create(ActionSchema, view(a)));

describe("actions as the API shows them", () => {
  it("leaves out what an action does not have", () => {
    expect(json(record({}))).toEqual({
      id: "0193a5f2-7c1e-7b3a-8f00-000000000001",
      cluster: "c",
      retryPolicy: { maxAttempts: 3, initialBackoff: "1s", backoffMultiplier: 2, maxBackoff: "60s" },
      maxSystemRetries: 3,
      state: "ACTION_STATE_QUEUED",
      createTime: "2026-12-04T10:00:00Z",
      updateTime: "2026-12-04T10:00:00Z",
      notBefore: "2026-12-04T10:00:00Z",
      createdBy: "alice",
    });
  });

  it("shows the lease, the payload, the output and the last error with its details", () => {
    const shown = json(
      record({
        requestId: "r-1",
        payload: { n: 1 },
        state: "LEASED",
        epoch: 2,
        sessionId: "s-1",
        workerId: "w-1",
        grantedAt: at,
        output: { ok: true },
        lastError: { message: "boom", retryable: true, details: { code: 7 } },
      }),
    );
    expect(shown).toMatchObject({
      requestId: "r-1",
      payload: { n: 1 },
      epoch: "2",
      lease: { workerId: "w-1", sessionId: "s-1", epoch: "2", grantTime: "2026-12-04T10:00:00Z" },
      output: { ok: true },
      lastError: { message: "boom", retryable: true, details: { code: 7 } },
    });
    // A leased row without its session (being taken over) shows no lease; an error without details, none.
    const partial = json(
      record({ state: "LEASED", workerId: "w-1", lastError: { message: "x", retryable: false } }),
    );
    expect(partial).not.toHaveProperty("lease");
    expect(partial).toHaveProperty("lastError", { message: "x" });
  });

  it("shows only the naming fields in the basic view", () => {
    expect(json(record({ payload: { n: 1 }, output: { ok: true } }), toBasicProtoAction)).toEqual({
      id: "0193a5f2-7c1e-7b3a-8f00-000000000001",
      cluster: "c",
      state: "ACTION_STATE_QUEUED",
      createTime: "2026-12-04T10:00:00Z",
      createdBy: "alice",
    });
  });

  it("hashes a request as earlier versions did, so that their stored request ids still match", () => {
    const request = create(SubmitActionRequestSchema, {
      requestId: "r-1",
      cluster: "c",
      runId: "run",
      labelSelector: { b: "2", a: "1" },
      payload: { z: 1, a: [1, { y: "x" }] },
      priority: 3,
    });
    // The value of commit 6348722 and before.
    expect(toNewAction(request).requestHash).toBe(
      "bc99bdd085d5043e44909e76ae35899ba369a265200fb3b6420a2ea38fa9e747",
    );
    expect(toNewAction(create(SubmitActionRequestSchema, { cluster: "c" })).requestHash).toBeUndefined();
  });

  it("encodes a SubmitActions answer in the basic view to exactly the bytes toBinary gives", () => {
    const states: ActionState[] = ["QUEUED", "LEASED", "SUCCEEDED", "FAILED", "CANCELLED"];
    const times = [0, 999, 1000, 1_764_000_000_000, 1_764_000_000_123, 253_402_300_799_999];
    const results: SubmitResult[] = [];
    for (let i = 0; i < 300; i++) {
      results.push({
        action: record({
          id: `0193a5f2-7c1e-7b3a-8f00-${String(i).padStart(12, "0")}`,
          requestId: i % 3 === 0 ? null : i % 3 === 1 ? `r-${i}` : "é".repeat(i % 70),
          runId: i % 4 === 0 ? "" : "run-".repeat(i % 40),
          cluster: i % 5 === 0 ? "gpu-east" : "集群",
          state: states[i % states.length] as ActionState,
          createdAt: new Date(times[i % times.length] as number),
          createdBy: i % 2 ? "" : "spiffe://example/agent 😀",
        }),
        created: i % 7 !== 0,
      });
    }
    for (const some of [[], results.slice(0, 1), results.slice(0, 9), results]) {
      const expected = toBinary(
        SubmitActionsResponseSchema,
        create(SubmitActionsResponseSchema, {
          results: some.map(({ action, created }) => ({ action: toBasicProtoAction(action), created })),
        }),
      );
      expect(encodeBasicSubmitResults(some)).toEqual(Buffer.from(expected));
    }
  });

  it("leaves an answer with a time it cannot write to the ordinary encoder", () => {
    for (const createdAt of [new Date(-1), new Date(Number.NaN)]) {
      expect(encodeBasicSubmitResults([{ action: record({ createdAt }), created: true }])).toBeUndefined();
    }
  });
});
