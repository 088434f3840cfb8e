import { readFileSync } from "node:fs";
import {
  clone,
  create,
  createFileRegistry,
  type DescField,
  type DescMessage,
  type DescMethod,
  type DescService,
  fromBinary,
  type MessageShape,
  ScalarType,
  toBinary,
} from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import { DurationSchema, FileDescriptorSetSchema, TimestampSchema } from "@bufbuild/protobuf/wkt";
import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { ConnectResponseSchema, RejectReason } from "../../src/gen/leasehold/v1/worker_pb.js";
import { FIELD_LIMITS } from "../../src/rpc/limits.js";
import type { Db } from "../../src/store/database.js";
import { queryRows } from "../../src/store/rows.js";
import { encodePageToken } from "../../src/work/page-token.js";
import { healthClient, type RawOutcome, rawClient } from "../helpers/grpc-peers.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { statusDetails } from "../helpers/status.js";

/**
 * A seeded, descriptor-driven fuzz test of every RPC of leasehold.v1: for
 * each method (read from the descriptor set `npm run generate` builds), a
 * valid base request is mutated one field at a time, for every field the
 * request can reach (nested messages, list elements, map keys and values,
 * oneof members), with values no field accepts: NUL characters, invalid
 * UTF-8, 1 MiB strings, extreme and negative numbers, unknown enum values,
 * forged page tokens, deep, wide and large payloads, timestamps and durations
 * out of range; plus bytes that are no message and a message over the receive
 * limit. Each mutated call must end, before its deadline, with a specific
 * status (never INTERNAL, UNKNOWN or DEADLINE_EXCEEDED) that names the
 * mutated field, must write no row, and the server must stay SERVING.
 *
 * Seeded: the seed picks the variant of each value (where the NUL goes, which
 * extreme number, which key); set LEASEHOLD_FUZZ_SEED to vary it.
 */

const SEED = Number(process.env.LEASEHOLD_FUZZ_SEED ?? 20_261_202);
/** Per-call deadline: generous for a busy machine; an answer comes in milliseconds. */
const DEADLINE_MS = 5_000;

/**
 * The statuses a bad request may get. NOT_FOUND and FAILED_PRECONDITION are
 * honest answers for a request whose ids are well-formed but unknown; the
 * mutations here are all malformed, so they mostly end as INVALID_ARGUMENT
 * (RESOURCE_EXHAUSTED for size limits). OUT_OF_RANGE is allowed by the
 * contract but not used by the server. ALREADY_EXISTS and UNAVAILABLE are not
 * honest for malformed input and count as failures.
 */
const ACCEPTED_CODES = new Set<number>([
  Code.InvalidArgument,
  Code.OutOfRange,
  Code.NotFound,
  Code.FailedPrecondition,
  Code.ResourceExhausted,
]);

/** mulberry32: a small seeded generator, so a run can be repeated exactly. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4_294_967_296;
  };
}
const rand = random(SEED);
const pick = <T>(values: readonly T[]): T => values[Math.floor(rand() * values.length)] as T;

// --- The methods, from the descriptor set -----------------------------------------------

const registry = createFileRegistry(
  fromBinary(
    FileDescriptorSetSchema,
    readFileSync(new URL("../../src/gen/descriptors.binpb", import.meta.url)),
  ),
);
const services: DescService[] = [];
for (const file of registry.files) {
  if (file.proto.package === "leasehold.v1") services.push(...file.services);
}
services.sort((a, b) => a.typeName.localeCompare(b.typeName));

// --- Base requests: valid, so that the mutation is the only thing wrong -----------------

/** What the bases refer to, created before the mutations. */
interface Fixtures {
  fileId: string;
}

type Init = Record<string, unknown>;

function baseRequests(f: Fixtures): Record<string, Init | Record<string, Init>> {
  const retryPolicy = {
    maxAttempts: 2,
    initialBackoff: { seconds: 1n },
    backoffMultiplier: 2,
    maxBackoff: { seconds: 10n },
  };
  const command = { argv: ["true"], env: { A: "1" }, cwd: "work" };
  return {
    "leasehold.v1.ActionService.SubmitAction": {
      requestId: "fuzz-request",
      cluster: "fuzz",
      runId: "run",
      labelSelector: { k: "v" },
      payload: { a: "b", n: [1, 2] },
      priority: 1,
      retryPolicy,
      maxSystemRetries: 2,
    },
    "leasehold.v1.ActionService.SubmitActions": {
      actions: [
        {
          requestId: "fuzz-bulk",
          cluster: "fuzz",
          runId: "run",
          labelSelector: { k: "v" },
          payload: { a: "b", n: [1, 2] },
          priority: 1,
          retryPolicy,
          maxSystemRetries: 2,
        },
      ],
    },
    "leasehold.v1.ActionService.GetAction": { actionId: "nope" },
    "leasehold.v1.ActionService.ListActions": { state: 1, cluster: "fuzz", runId: "run", pageSize: 10 },
    "leasehold.v1.ActionService.CancelAction": { actionId: "nope", reason: "r" },
    "leasehold.v1.ActionService.CancelActions": {
      cluster: "fuzz",
      runId: "run",
      actionIds: ["nope"],
      state: 1,
      all: true,
      reason: "r",
      limit: 10,
    },
    "leasehold.v1.ActionService.WatchAction": { actionId: "nope" },
    "leasehold.v1.ActionService.ExplainAction": { actionId: "nope" },
    "leasehold.v1.ClusterService.ListClusters": {},
    "leasehold.v1.ClusterService.ListWorkers": { cluster: "fuzz", state: 1, pageSize: 10 },
    "leasehold.v1.ClusterService.GetWorker": { workerId: "nope" },
    "leasehold.v1.ClusterService.DrainWorker": { workerId: "nope", reason: "r" },
    "leasehold.v1.ClusterService.UndrainWorker": { workerId: "nope", reason: "r" },
    "leasehold.v1.ClusterService.ForgetWorker": { workerId: "nope", reason: "r" },
    "leasehold.v1.ClusterService.ResumeExpiries": { cluster: "nope", reason: "r" },
    "leasehold.v1.EventService.ListEvents": {
      actionId: "a",
      workerId: "w",
      cluster: "c",
      kind: 1,
      pageSize: 10,
    },
    "leasehold.v1.EventService.WatchEvents": {
      actionId: "a",
      workerId: "w",
      cluster: "c",
      kind: 1,
      afterSequence: 0n,
    },
    "leasehold.v1.LeaseService.CreateLease": {
      runtime: "fuzz",
      ttl: { seconds: 60n },
      label: "l",
      requestId: "fuzz-lease",
    },
    "leasehold.v1.LeaseService.GetLease": { leaseId: "nope" },
    "leasehold.v1.LeaseService.ListLeases": { state: 1, label: "l", runtime: "fuzz", pageSize: 10 },
    "leasehold.v1.LeaseService.PromoteResource": { leaseId: "nope", kind: "thing", resourceId: "nope" },
    "leasehold.v1.LeaseService.RenewLease": { leaseId: "nope", ttl: { seconds: 60n } },
    "leasehold.v1.LeaseService.CommitLease": { leaseId: "nope" },
    "leasehold.v1.LeaseService.RollbackLease": { leaseId: "nope" },
    "leasehold.v1.LeaseService.DeleteLease": { leaseId: "nope" },
    "leasehold.v1.LeaseService.DeleteLeases": { label: "nope", closedBefore: { seconds: 1_000_000n } },
    "leasehold.v1.LeaseService.SetResult": { leaseId: "nope", result: { passed: true } },
    "leasehold.v1.LeaseService.DebugLease": { leaseId: "nope", eventLimit: 10 },
    "leasehold.v1.LeaseService.WaitLease": { leaseId: "nope", timeout: { seconds: 1n } },
    "leasehold.v1.LeaseService.CollectOutputs": { leaseId: "nope", timeout: { seconds: 1n } },
    "leasehold.v1.ResourceService.CreateFile": {
      name: "f.txt",
      content: new TextEncoder().encode("hello"),
      contentType: "text/plain",
    },
    "leasehold.v1.ResourceService.CreateDeployment": {
      runtime: "fuzz",
      spec: {
        containers: [{ name: "web", command }],
        readinessProbe: {
          check: { case: "exec", value: command },
          period: { seconds: 1n },
          timeout: { seconds: 1n },
        },
        outputsDir: "out",
        inputs: [{ fileId: f.fileId, path: "in.txt" }],
      },
    },
    "leasehold.v1.ResourceService.CreateObject": { kind: "thing", body: { a: 1 } },
    "leasehold.v1.ResourceService.GetResource": { resourceId: "nope" },
    "leasehold.v1.ResourceService.ListResources": { leaseId: "l", kind: "thing", ownership: 1, pageSize: 10 },
    "leasehold.v1.ResourceService.DownloadFile": { resourceId: "nope" },
    "leasehold.v1.ResourceService.DeleteResource": { resourceId: "nope" },
    // One base per message of the stream; hello is sent first on every stream.
    "leasehold.v1.WorkerService.Connect": {
      // Its own cluster: no action the other bases queue is granted to these streams.
      hello: {
        workerId: "fuzz-w",
        cluster: "fuzz-agents",
        capacity: 2,
        labels: { k: "v" },
        agentVersion: "fuzz",
      },
      heartbeat: { sequence: 1n, heldLeases: [{ actionId: "a", epoch: 1n }] },
      grantAck: { reportId: 1n, actionId: "a", epoch: 1n },
      progress: {
        reportId: 1n,
        actionId: "a",
        epoch: 1n,
        phase: "p",
        details: { a: 1 },
        checkpoint: { b: 2 },
      },
      completion: {
        reportId: 1n,
        actionId: "a",
        epoch: 1n,
        outcome: { case: "succeeded", value: { output: {} } },
      },
      release: { reportId: 1n, actionId: "a", epoch: 1n, reason: "r" },
      goodbye: { reason: "r" },
      stopGrants: { reason: "r" },
      batch: {
        messages: [
          { message: { case: "heartbeat", value: { sequence: 2n } } },
          { message: { case: "grantAck", value: { reportId: 2n, actionId: "a", epoch: 1n } } },
        ],
      },
    },
  };
}

// --- Mutations ---------------------------------------------------------------------------

/** Bytes that are replaced with invalid UTF-8 of the same length after encoding. */
const MARKER = "ZQXJZQ";
const INVALID_UTF8 = [0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1];
const MiB = 1024 * 1024;

/** A field a mutation can reach: the message fields leading to it, then the field itself. */
interface Target {
  readonly steps: readonly DescField[];
  readonly field: DescField;
  /** What is replaced: the value, one list element, the whole list or map, or one map key or value. */
  readonly part: "value" | "element" | "list" | "map" | "key" | "mapValue";
  /** The field path a violation must name, e.g. `spec.containers[0].name`. */
  readonly path: string;
}

interface Mutation {
  readonly name: string;
  /** The field path the status must name; undefined for whole-message mutations. */
  readonly path: string | undefined;
  readonly bytes: Buffer;
}

const WKT_LEAVES = new Set([
  "google.protobuf.Timestamp",
  "google.protobuf.Duration",
  "google.protobuf.Struct",
]);

/**
 * Every field a request of `desc` can carry, depth first. A message that
 * holds its own type (a ConnectRequest batch holds ConnectRequests) is
 * followed one level down: `batch.messages[0].completion.action_id`, but
 * not `batch.messages[0].batch.messages[0]...`.
 */
function targets(
  desc: DescMessage,
  steps: DescField[] = [],
  prefix = "",
  outer: DescMessage[] = [],
): Target[] {
  const out: Target[] = [];
  if (outer.filter((d) => d === desc).length > 1) return out;
  const within = [...outer, desc];
  for (const field of desc.fields) {
    const path = prefix === "" ? field.name : `${prefix}.${field.name}`;
    switch (field.fieldKind) {
      case "scalar":
      case "enum":
        out.push({ steps, field, part: "value", path });
        break;
      case "message":
        if (WKT_LEAVES.has(field.message.typeName)) out.push({ steps, field, part: "value", path });
        else out.push(...targets(field.message, [...steps, field], path, within));
        break;
      case "list":
        out.push({ steps, field, part: "list", path });
        if (field.listKind === "message" && !WKT_LEAVES.has(field.message.typeName)) {
          out.push(...targets(field.message, [...steps, field], `${path}[0]`, within));
        } else out.push({ steps, field, part: "element", path: `${path}[0]` });
        break;
      case "map":
        out.push({ steps, field, part: "map", path });
        out.push({ steps, field, part: "key", path });
        if (field.mapKind === "message") out.push(...targets(field.message, [...steps, field], path, within));
        else out.push({ steps, field, part: "mapValue", path });
        break;
    }
  }
  return out;
}

type Local = Record<string, unknown>;

/** The message a navigation step leads to, created (and its oneof selected) when missing. */
function child(container: Local, field: DescField): Local {
  const message = (field as { message: DescMessage }).message;
  if (field.fieldKind === "list") {
    const list = container[field.localName] as unknown[];
    if (list.length === 0) list.push(create(message));
    list.length = 1;
    return list[0] as Local;
  }
  if (field.fieldKind === "map") {
    const record = container[field.localName] as Record<string, unknown>;
    const key = Object.keys(record)[0] ?? "k";
    record[key] ??= create(message);
    return record[key] as Local;
  }
  if (field.oneof) {
    const selected = container[field.oneof.localName] as { case?: string; value?: unknown };
    if (selected.case !== field.localName) {
      container[field.oneof.localName] = { case: field.localName, value: create(message) };
    }
    return (container[field.oneof.localName] as { value: Local }).value;
  }
  container[field.localName] ??= create(message);
  return container[field.localName] as Local;
}

/** A zero value for a map's values, so that a key mutation has an entry to carry. */
function mapZero(field: DescField & { fieldKind: "map" }): unknown {
  if (field.mapKind === "message") return create(field.message);
  if (field.mapKind === "enum") return 0;
  return field.scalar === ScalarType.STRING ? "" : 0;
}

/** A copy of `base` with `target` replaced by `value`, encoded. */
function encodeWith(
  desc: DescMessage,
  base: MessageShape<DescMessage>,
  target: Target,
  value: unknown,
): Buffer {
  const message = clone(desc, base) as unknown as Local;
  let container = message;
  for (const step of target.steps) container = child(container, step);
  const { field } = target;
  switch (target.part) {
    case "value":
      if (field.oneof) container[field.oneof.localName] = { case: field.localName, value };
      else container[field.localName] = value;
      break;
    case "element":
      container[field.localName] = [value];
      break;
    case "list":
    case "map":
      container[field.localName] = value;
      break;
    case "key": {
      const record = container[field.localName] as Record<string, unknown>;
      const existing = Object.values(record)[0];
      container[field.localName] = {
        [value as string]: existing ?? mapZero(field as DescField & { fieldKind: "map" }),
      };
      break;
    }
    case "mapValue": {
      const record = container[field.localName] as Record<string, unknown>;
      container[field.localName] = { [Object.keys(record)[0] ?? "k"]: value };
      break;
    }
  }
  const bytes = Buffer.from(toBinary(desc, message as unknown as MessageShape<DescMessage>));
  return spliceInvalidUtf8(bytes);
}

/** Replaces the marker, if present, with invalid UTF-8 of the same length. */
function spliceInvalidUtf8(bytes: Buffer): Buffer {
  const at = bytes.indexOf(MARKER);
  if (at >= 0) bytes.set(INVALID_UTF8, at);
  return bytes;
}

/** A string with a NUL somewhere the seed chooses. */
const withNul = () => pick(["\u0000", "a\u0000", "\u0000b", "id-\u0000-x", `${"x".repeat(20)}\u0000`]);

/** A Struct nested `levels` deep: {"a": {"a": ... {}}}. */
function nested(levels: number): Record<string, unknown> {
  let value: Record<string, unknown> = {};
  for (let i = 1; i < levels; i++) value = { a: value };
  return value;
}

/** A Struct nested `levels` deep, encoded by hand: protobuf-es cannot encode one this deep. */
function nestedStructBytes(levels: number): Uint8Array {
  let struct: Uint8Array = new Uint8Array(0);
  for (let i = 1; i < levels; i++) {
    const value = new BinaryWriter().tag(5, WireType.LengthDelimited).bytes(struct).finish(); // Value.struct_value
    const entry = new BinaryWriter()
      .tag(1, WireType.LengthDelimited)
      .string("a")
      .tag(2, WireType.LengthDelimited)
      .bytes(value)
      .finish();
    struct = new BinaryWriter().tag(1, WireType.LengthDelimited).bytes(entry).finish(); // Struct.fields
  }
  return struct;
}

/** Values that no field of this kind accepts, by name. */
function badValues(target: Target): [string, unknown][] {
  const { field, part } = target;
  if (part === "list") {
    const element: () => unknown =
      field.fieldKind === "list" && field.listKind === "message"
        ? () => create(field.message)
        : field.fieldKind === "list" && field.listKind === "scalar" && field.scalar === ScalarType.STRING
          ? () => ""
          : () => 0;
    return [["20,001 elements", Array.from({ length: 20_001 }, element)]];
  }
  if (part === "map") {
    const zero = mapZero(field as DescField & { fieldKind: "map" });
    return [
      ["20,001 entries", Object.fromEntries(Array.from({ length: 20_001 }, (_, i) => [`k${i}`, zero]))],
    ];
  }
  if (part === "key") {
    return [
      ["a key with NUL", withNul()],
      ["a key of invalid UTF-8", MARKER],
      ["a key of 1 MiB", "k".repeat(MiB)],
    ];
  }
  const type =
    field.fieldKind === "message" || (field.fieldKind === "list" && field.listKind === "message")
      ? (field as { message: DescMessage }).message.typeName
      : field.fieldKind === "enum" ||
          (field.fieldKind === "list" && field.listKind === "enum") ||
          (field.fieldKind === "map" && field.mapKind === "enum")
        ? "enum"
        : ScalarType[(field as { scalar: ScalarType }).scalar];
  const limit = FIELD_LIMITS[`${field.parent.typeName}.${field.name}`];
  switch (type) {
    case "STRING": {
      const values: [string, unknown][] = [
        ["NUL", withNul()],
        ["invalid UTF-8", pick([MARKER, `id-${MARKER}`, `${MARKER}-x`])],
        ["1 MiB", "x".repeat(MiB)],
      ];
      if (field.name === "page_token") {
        values.push(
          ["a page token that is not base64 JSON", pick(["!!", "bm90IGpzb24", "e30", "eyJhIjoxfQ"])],
          ["a forged page token carrying NUL", encodePageToken("a\u0000", {})],
          ["a forged page token carrying a lone surrogate", encodePageToken("\ud800", {})],
          ["a forged page token carrying 300 characters", encodePageToken("k".repeat(300), {})],
        );
      }
      return values;
    }
    case "BYTES":
      // Over the default --max-file-size (3 MiB), under the receive limit.
      return [["3.5 MiB", new Uint8Array(3.5 * MiB)]];
    case "INT32":
    case "SINT32":
    case "SFIXED32":
      return [
        ["the largest int32", 2 ** 31 - 1],
        ["the smallest int32", -(2 ** 31)],
      ];
    case "UINT32":
    case "FIXED32":
      return [["the largest uint32", 2 ** 32 - 1]];
    case "INT64":
    case "SINT64":
    case "SFIXED64":
      if (limit?.fullRange64) return [];
      return [
        ["the largest int64", 2n ** 63n - 1n],
        ["the smallest int64", -(2n ** 63n)],
        ["2^53", pick([2n ** 53n, -(2n ** 53n)])],
      ];
    case "UINT64":
    case "FIXED64":
      if (limit?.fullRange64) return [];
      return [
        ["the largest uint64", 2n ** 64n - 1n],
        ["2^53", 2n ** 53n + BigInt(Math.floor(rand() * 1000))],
      ];
    case "DOUBLE":
    case "FLOAT":
      return [
        ["NaN", Number.NaN],
        ["infinity", pick([Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY])],
      ];
    case "BOOL":
      return [];
    case "enum":
      return [
        ["an unknown enum value", pick([99, 999, 2 ** 31 - 1])],
        ["a negative enum value", -1],
      ];
    case "google.protobuf.Timestamp":
      return [
        ["year 0", create(TimestampSchema, { seconds: -62_135_596_801n })],
        ["the largest int64 seconds", create(TimestampSchema, { seconds: 2n ** 63n - 1n })],
        ["negative nanos", create(TimestampSchema, { seconds: 1n, nanos: -1 })],
        ["a billion nanos", create(TimestampSchema, { seconds: 1n, nanos: 1_000_000_000 })],
      ];
    case "google.protobuf.Duration":
      return [
        ["the largest int64 seconds", create(DurationSchema, { seconds: 2n ** 63n - 1n })],
        ["a negative duration", create(DurationSchema, { seconds: -BigInt(1 + Math.floor(rand() * 100)) })],
        ["nanos of the wrong sign", create(DurationSchema, { seconds: 1n, nanos: -1 })],
        ["a billion nanos", create(DurationSchema, { seconds: 0n, nanos: 1_000_000_000 })],
      ];
    case "google.protobuf.Struct":
      return [
        ["a payload 40 levels deep", nested(40)],
        ["a payload 300 levels deep", nested(300)],
        [
          "a payload of 20,000 keys",
          Object.fromEntries(Array.from({ length: 20_000 }, (_, i) => [`k${i}`, i])),
        ],
        ["a payload of 1.5 MiB", { blob: "x".repeat(1.5 * MiB) }],
        ["a payload key with NUL", { [withNul()]: 1 }],
        ["a payload string with NUL", { a: [1, { b: withNul() }] }],
        ["a payload string of invalid UTF-8", { a: MARKER }],
        ["a payload key of invalid UTF-8", { [MARKER]: 1 }],
        ["a payload with NaN", { a: pick([Number.NaN, Number.POSITIVE_INFINITY]) }],
      ];
  }
  throw new Error(`no bad values for ${target.path} (${type})`);
}

/** Every mutation of a request with base `base`. */
/**
 * The mutations of `base`: each bad value of each field, then the whole-message ones. With `only`,
 * just the fields whose path it accepts (and no whole-message ones unless `whole`): building a
 * mutation costs an encoding, and Connect's oneof holds every kind of message.
 */
function mutations(
  desc: DescMessage,
  base: MessageShape<DescMessage>,
  only?: { path: (path: string) => boolean; whole: boolean },
): Mutation[] {
  const out: Mutation[] = [];
  const encodedBase = Buffer.from(toBinary(desc, base));
  for (const target of targets(desc)) {
    if (only && !only.path(target.path)) continue;
    for (const [name, value] of badValues(target)) {
      out.push({
        name: `${target.path}: ${name}`,
        path: target.path,
        bytes: encodeWith(desc, base, target, value),
      });
    }
    // Deeper than protobuf-es can encode: only for payload fields of the request itself.
    if (
      target.steps.length === 0 &&
      target.field.fieldKind === "message" &&
      target.field.message.typeName === "google.protobuf.Struct"
    ) {
      const field = new BinaryWriter()
        .tag(target.field.number, WireType.LengthDelimited)
        .bytes(nestedStructBytes(2000))
        .finish();
      out.push({
        name: `${target.path}: a payload 2,000 levels deep`,
        path: target.path,
        bytes: Buffer.concat([encodedBase, field]),
      });
    }
  }
  if (only && !only.whole) return out;
  // An unknown field of 5 MiB: over the server's receive limit (the file limit + 1 MiB).
  const huge = new BinaryWriter()
    .tag(1000, WireType.LengthDelimited)
    .bytes(new Uint8Array(5 * MiB))
    .finish();
  out.push({
    name: "a message over the receive limit",
    path: undefined,
    bytes: Buffer.concat([encodedBase, huge]),
  });
  out.push({ name: "bytes that are no message", path: undefined, bytes: Buffer.from([0x0a, 0xff, 0xff]) });
  return out;
}

// --- The test ------------------------------------------------------------------------------

const HEALTH_CHECK = "/grpc.health.v1.Health/Check";
/** HealthCheckResponse{status: SERVING}. */
const SERVING = Buffer.from([0x08, 0x01]);

describe(`every RPC refuses bad input with a status naming the field (seed ${SEED})`, () => {
  let t: TestServer;
  let db: Db | undefined;
  let raw: ReturnType<typeof rawClient>;
  let bases: ReturnType<typeof baseRequests>;
  let streams = 0;

  let countQuery: ReturnType<typeof sql.raw> | undefined;
  /** Rows per table of the public schema, in one query. */
  const countRows = async (): Promise<Record<string, number>> => {
    if (!countQuery) {
      const tables = await queryRows<{ name: string }>(
        db as Db,
        sql`select table_name as name from information_schema.tables
            where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`,
      );
      countQuery = sql.raw(
        `select ${tables.map(({ name }) => `(select count(*) from "${name}") as "${name}"`).join(", ")}`,
      );
    }
    const [row] = await queryRows<Record<string, unknown>>(db as Db, countQuery);
    return Object.fromEntries(Object.entries(row ?? {}).map(([k, v]) => [k, Number(v)]));
  };
  const lastEventSequence = async () => {
    const [row] = await queryRows<{ s: unknown }>(
      db as Db,
      sql`select coalesce(max(sequence), 0) as s from events`,
    );
    return Number(row?.s);
  };
  const eventKindsSince = async (sequence: number) =>
    (
      await queryRows<{ kind: string }>(
        db as Db,
        sql`select kind from events where sequence > ${sequence} order by sequence`,
      )
    ).map((e) => e.kind);

  beforeAll(async () => {
    console.log(`fuzz seed ${SEED} (set LEASEHOLD_FUZZ_SEED to vary it)`);
    t = await startTestServer({
      overrides: {
        // No loops: nothing but the calls under test writes while rows are counted.
        timers: false,
        wrapDb: (handle) => {
          db = handle;
          return handle;
        },
      },
    });
    raw = rawClient(t.address);
    const file = await t
      .client(ResourceService)
      .createFile({ name: "input.txt", content: new Uint8Array(3) });
    bases = baseRequests({ fileId: file.resource?.id ?? "" });
  });
  afterAll(async () => {
    raw?.close();
    await t?.[Symbol.asyncDispose]();
  });

  /** What is wrong with an outcome, or undefined if it is a fine refusal of `mutation`. */
  const judge = (outcome: RawOutcome, mutation: Mutation): string | undefined => {
    const { details, metadata } = outcome.status;
    const code = outcome.status.code as number;
    if (!ACCEPTED_CODES.has(code)) return `${Code[code] ?? code}: ${details.slice(0, 200)}`;
    if (mutation.path !== undefined && (code === Code.InvalidArgument || code === Code.ResourceExhausted)) {
      const { fields } = statusDetails(metadata);
      const p = mutation.path;
      const named = fields.some((f) => f === p || f.startsWith(`${p}.`) || f.startsWith(`${p}[`));
      if (!named) return `${Code[code]} without naming ${p}: fields ${JSON.stringify(fields)}, ${details}`;
    }
    if (details.length > 1100) return `a message of ${details.length} characters`;
    return undefined;
  };

  const unaryOrStream = (method: DescMethod) => (path: string, bytes: Buffer) =>
    method.methodKind === "unary"
      ? raw.unary(path, bytes, DEADLINE_MS)
      : raw.serverStream(path, bytes, DEADLINE_MS);

  for (const service of services) {
    for (const method of service.methods) {
      const name = `${service.typeName}.${method.name}`;
      const path = `/${service.typeName}/${method.name}`;

      it(`${service.name}.${method.name} refuses every mutated field`, { timeout: 60_000 }, async () => {
        const failures: string[] = [];
        if (method.methodKind === "bidi_streaming") {
          await fuzzConnect(method, path, failures);
        } else {
          const init = bases[name] as Init | undefined;
          expect(init, `a base request for ${name}`).toBeDefined();
          const base = create(method.input, init as never);
          const call = unaryOrStream(method);
          if (method.methodKind === "unary") {
            // The base must not be the reason for a refusal.
            const outcome = await call(path, Buffer.from(toBinary(method.input, base)));
            expect(
              [0 /* OK */, Code.NotFound, Code.FailedPrecondition],
              `the base request of ${name}: ${outcome.status.details}`,
            ).toContain(outcome.status.code);
          }
          let rows = await countRows();
          for (const mutation of mutations(method.input, base)) {
            const outcome = await call(path, mutation.bytes);
            const problem = judge(outcome, mutation);
            if (problem) failures.push(`${mutation.name}: ${problem}`);
            const after = await countRows();
            if (JSON.stringify(after) !== JSON.stringify(rows)) {
              failures.push(
                `${mutation.name}: wrote rows ${JSON.stringify(rows)} → ${JSON.stringify(after)}`,
              );
              rows = after;
            }
          }
        }
        // Same connection: nothing above stalled it.
        const health = await raw.unary(HEALTH_CHECK, Buffer.alloc(0), DEADLINE_MS);
        expect(health.messages[0]).toEqual(SERVING);
        expect(failures).toEqual([]);
      });
    }
  }

  /**
   * Connect: a bad hello ends the stream at once; a bad later message ends a
   * welcomed stream. Either way with a status naming the field; the only row
   * a refused later message leaves is the stream-loss event of its session.
   */
  /**
   * A report's field, within a batch or not, holding a value that breaks the checks, or a string
   * of invalid UTF-8 (which protobuf cannot decode, but the server reads around).
   */
  const answeredInvalid = (mutation: Mutation) =>
    mutation.path !== undefined &&
    /^(batch\.messages\[\d+\]\.)?(grant_ack|progress|completion|release)\./.test(mutation.path) &&
    !/(300|2,000) levels deep/.test(mutation.name);

  /** What is wrong with the answer to such a report: it must be a ReportResult INVALID naming the field. */
  async function judgeAnswer(
    stream: { next(): Promise<Buffer | undefined>; ended: Promise<RawOutcome> },
    mutation: Mutation,
  ): Promise<string | undefined> {
    for (;;) {
      const bytes = await stream.next();
      if (!bytes)
        return `ended the stream (${(await stream.ended).status.details.slice(0, 200)}), not answered INVALID`;
      const m = fromBinary(ConnectResponseSchema, bytes).message;
      if (m.case !== "reportResult") continue;
      const r = m.value;
      if (r.rejectReason !== RejectReason.INVALID)
        return `answered ${RejectReason[r.rejectReason]}, not INVALID`;
      if (!r.message.startsWith(`${mutation.path}`))
        return `answered INVALID without naming ${mutation.path}: ${r.message.slice(0, 200)}`;
      if (r.message.length > 1100) return `a message of ${r.message.length} characters`;
      return undefined;
    }
  }

  async function fuzzConnect(method: DescMethod, path: string, failures: string[]): Promise<void> {
    const perMessage = bases["leasehold.v1.WorkerService.Connect"] as Record<string, Init>;
    const request = (messageCase: string, value: Init) =>
      create(method.input, { message: { case: messageCase, value } } as never);
    const hello = () => ({ ...perMessage.hello, workerId: `fuzz-w-${++streams}` });
    const all: [string, Mutation][] = [];
    for (const field of method.input.fields) {
      const init = perMessage[field.localName];
      expect(init, `a base ${field.name} for Connect`).toBeDefined();
      // The mutations of this message's fields; whole-message ones once, as the first message.
      // A hello inside a batch is refused as a whole, whatever its fields (see below).
      const own = (path: string) =>
        (path === field.name || path.startsWith(`${field.name}.`)) &&
        !path.startsWith("batch.messages[0].hello");
      const only = { path: own, whole: field.localName === "hello" };
      for (const m of mutations(method.input, request(field.localName, init as Init), only)) {
        all.push([field.localName, m]);
      }
    }
    // A heartbeat listing more leases than twice the capacity (2 in the base
    // hello): wrong only after that hello, so it always runs there.
    const held = Array.from({ length: 5 }, (_, i) => ({ actionId: `a${i}`, epoch: 1n }));
    const tooManyHeld: Mutation = {
      name: "heartbeat.held_leases: more than twice the capacity",
      path: "heartbeat.held_leases",
      bytes: Buffer.from(toBinary(method.input, request("heartbeat", { sequence: 1n, heldLeases: held }))),
    };
    // Batches that are wrong as a whole, after the hello.
    const batchOf = (messages: Init[]) =>
      Buffer.from(toBinary(method.input, request("batch", { messages } as Init)));
    const heartbeat = { message: { case: "heartbeat", value: perMessage.heartbeat } } as Init;
    const badBatches: Mutation[] = [
      { name: "batch: no messages", path: "batch.messages", bytes: batchOf([]) },
      {
        name: "batch: 1,025 messages",
        path: "batch.messages",
        bytes: batchOf(Array.from({ length: 1025 }, () => heartbeat)),
      },
      {
        name: "batch: a hello inside",
        path: "batch.messages[1].hello",
        bytes: batchOf([heartbeat, { message: { case: "hello", value: hello() } } as Init]),
      },
      {
        name: "batch: a batch inside",
        path: "batch.messages[0].batch",
        bytes: batchOf([{ message: { case: "batch", value: { messages: [heartbeat] } } } as Init]),
      },
    ];
    // The first message must be a hello.
    all.push([
      "hello",
      {
        name: "a heartbeat as the first message",
        path: "message",
        bytes: Buffer.from(toBinary(method.input, request("heartbeat", perMessage.heartbeat as Init))),
      },
    ]);

    // As the first message, every mutation is refused before any session
    // exists, and writes nothing at all.
    const rows = await countRows();
    const since = await lastEventSequence();
    for (const [, mutation] of all) {
      const stream = raw.bidi(path, DEADLINE_MS);
      stream.write(mutation.bytes);
      const problem = judge(await stream.ended, mutation);
      if (problem) failures.push(`first message ${mutation.name}: ${problem}`);
    }
    expect(await countRows()).toEqual(rows);
    expect(await eventKindsSince(since)).toEqual([]);

    // A refused later message ends a welcomed stream: its session sees a stream
    // loss, and nothing else is written (no action, attempt, lease or resource).
    // A report whose own fields break the checks (it decodes, but fails them, or one of
    // its strings is not UTF-8) is answered INVALID naming the field instead, and its
    // stream goes on.
    // Each needs a session of its own (two writes), so the seed picks one bad
    // value per field here; every value ran as a first message above.
    const later = new Map<string, Mutation[]>();
    for (const [first, mutation] of all) {
      if (first === "hello") continue;
      const key = mutation.path ?? mutation.name;
      later.set(key, [...(later.get(key) ?? []), mutation]);
    }
    for (const mutation of [
      ...[...later.values()].map((choices) => pick(choices)),
      tooManyHeld,
      ...badBatches,
    ]) {
      const stream = raw.bidi(path, DEADLINE_MS);
      stream.write(Buffer.from(toBinary(method.input, request("hello", hello()))));
      if (!(await stream.next())) {
        failures.push(`${mutation.name}: the base hello was refused: ${(await stream.ended).status.details}`);
        continue;
      }
      stream.write(mutation.bytes);
      if (answeredInvalid(mutation)) {
        const problem = await judgeAnswer(stream, mutation);
        if (problem) failures.push(`${mutation.name}: ${problem}`);
        stream.cancel();
        continue;
      }
      const problem = judge(await stream.ended, mutation);
      if (problem) failures.push(`${mutation.name}: ${problem}`);
    }
    const after = await countRows();
    const sessionTables = new Set(["clusters", "workers", "sessions", "events"]);
    for (const table of Object.keys(after)) {
      if (!sessionTables.has(table)) expect(after[table], table).toBe(rows[table]);
    }
    const kinds = new Set(await eventKindsSince(since));
    expect([...kinds].sort()).toEqual(["session_started", "stream_lost"]);
  }

  it("leaves the server SERVING, having logged no unexpected error", async () => {
    const health = healthClient(t.address);
    try {
      expect(await health.check()).toBe("SERVING");
    } finally {
      health.close();
    }
    expect(t.logs.filter((l) => l.level === 50)).toEqual([]);
  });
});
