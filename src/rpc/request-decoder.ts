import { isUtf8 } from "node:buffer";
import { type DescField, type DescMessage, fromBinary, ScalarType } from "@bufbuild/protobuf";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { type LeaseholdError, quote } from "../errors.js";
import { PAYLOAD_LIMITS } from "./limits.js";
import { requestValidator, violationError } from "./request-validator.js";

/**
 * A request message that failed to decode or to validate. The deserializer
 * returns it instead of throwing, because grpc-js answers a throwing
 * deserializer with INTERNAL "Error deserializing request"; the adapter
 * answers it with `error` before any handler runs.
 */
export class RejectedRequest {
  constructor(
    /** The status to answer with: INVALID_ARGUMENT or RESOURCE_EXHAUSTED, naming the field. */
    readonly error: LeaseholdError,
    /** The decoded message, when only validation failed. */
    readonly message?: unknown,
  ) {}
}

/**
 * Nesting of messages the decoder follows. Struct payloads nest two messages
 * per level (Struct, Value), so this leaves room for {@link PAYLOAD_LIMITS}
 * depth to be reported by the validator, naming the field; deeper than this
 * fails while decoding.
 */
const RECURSION_LIMIT = 256;

/** Unknown fields (from a newer client) are skipped, not kept: a request is never re-encoded. */
const READ_OPTIONS = { readUnknownFields: false, recursionLimit: RECURSION_LIMIT } as const;

/**
 * The request deserializer of a method: decodes with protobuf-es, then runs
 * the request validator. Never throws: failures come back as a
 * {@link RejectedRequest}.
 */
export function requestDecoder(desc: DescMessage): (bytes: Buffer) => unknown {
  const validate = requestValidator(desc);
  return (bytes) => {
    let message: object;
    try {
      message = fromBinary(desc, bytes, READ_OPTIONS);
    } catch (error) {
      return new RejectedRequest(decodeError(desc, bytes, error));
    }
    const invalid = validate(message);
    return invalid ? new RejectedRequest(invalid, message) : message;
  };
}

/**
 * `bytes` decoded though some of its strings are not valid UTF-8, with the
 * paths of those strings (as in a violation; inside a Struct payload, the
 * payload's field): each is read with its bytes over 0x7F as "?", so nothing
 * of it can be used but its path. For a caller that refuses only part of a
 * request (a worker stream's reports: each one is answered on its own).
 * Undefined when the bytes fail for another reason too. Copies the bytes:
 * meant for a request that already failed to decode, never the hot path.
 */
export function decodeMendingStrings(
  desc: DescMessage,
  bytes: Uint8Array,
): { message: object; badStrings: string[] } | undefined {
  const copy = Uint8Array.from(bytes);
  const badStrings: string[] = [];
  try {
    if (locateProblem(desc, copy, "", false, 1, (field) => badStrings.push(field))) return undefined;
    return { message: fromBinary(desc, copy, READ_OPTIONS), badStrings };
  } catch {
    return undefined;
  }
}

/** Makes the string `data` (bytes within a larger buffer) valid UTF-8 in place, its length kept. */
function mendString(data: Uint8Array): void {
  for (let i = 0; i < data.length; i++) if ((data[i] as number) > 0x7f) data[i] = 0x3f;
}

/** Why a request could not be decoded, naming the field where that can be found. */
function decodeError(desc: DescMessage, bytes: Uint8Array, error: unknown): LeaseholdError {
  let found: Problem | undefined;
  try {
    found = locateProblem(desc, bytes, "", false, 1);
  } catch {
    found = undefined;
  }
  const text = error instanceof Error ? error.message : String(error);
  if (found?.kind === "depth" || text.includes("maximum recursion depth")) {
    return violationError([
      {
        field: found?.field || "request",
        description: `nests messages deeper than ${RECURSION_LIMIT} levels (payloads may nest at most ${PAYLOAD_LIMITS.depth} levels)`,
        size: true,
      },
    ]);
  }
  if (found?.kind === "utf8") {
    return violationError([{ field: found.field || "request", description: "is not valid UTF-8" }]);
  }
  if (found?.kind === "wire type") {
    return violationError([
      {
        field: found.field || "request",
        description: `is sent as ${WIRE_TYPE_NAMES[found.got] ?? `wire type ${found.got}`}, but it is ${found.expected}: check the client's copy of the .proto`,
      },
    ]);
  }
  return violationError([
    {
      field: "request",
      description: `is not a valid ${desc.typeName} in the protobuf binary format (${quote(text, 120)})`,
    },
  ]);
}

const PAYLOAD_TYPES = new Set([
  "google.protobuf.Struct",
  "google.protobuf.Value",
  "google.protobuf.ListValue",
]);

const isString = (field: DescField) =>
  (field.fieldKind === "scalar" || (field.fieldKind === "list" && field.listKind === "scalar")) &&
  field.scalar === ScalarType.STRING;

/**
 * A field that made decoding fail: a string of invalid UTF-8, messages nested
 * too deep, or a field sent with a wire type its type never has (a client
 * built from another version of the .proto, or a hand-made message).
 */
type Problem =
  | {
      readonly kind: "utf8" | "depth";
      /** Its path; inside a Struct payload, the payload's field. */
      readonly field: string;
    }
  | { readonly kind: "wire type"; readonly field: string; readonly got: WireType; readonly expected: string };

const WIRE_TYPE_NAMES: Partial<Record<WireType, string>> = {
  [WireType.Varint]: "a varint (wire type 0)",
  [WireType.Bit64]: "64 bits (wire type 1)",
  [WireType.LengthDelimited]: "length-delimited (wire type 2)",
  [WireType.StartGroup]: "a group (wire type 3)",
  [WireType.EndGroup]: "a group end (wire type 4)",
  [WireType.Bit32]: "32 bits (wire type 5)",
};

/** The wire types `field` may come as, and its type in words; undefined for any. */
function wireTypesOf(field: DescField): { types: readonly WireType[]; expected: string } {
  if (field.fieldKind === "message" || field.fieldKind === "map")
    return { types: [WireType.LengthDelimited], expected: "a message (length-delimited)" };
  if (field.fieldKind === "list" && field.listKind === "message")
    return { types: [WireType.LengthDelimited], expected: "a list of messages (length-delimited)" };
  const scalar =
    field.fieldKind === "enum" || (field.fieldKind === "list" && field.listKind === "enum")
      ? ScalarType.INT32
      : (field as { scalar: ScalarType }).scalar;
  const one = scalarWireType(scalar);
  const name =
    field.fieldKind === "enum" || (field.fieldKind === "list" && field.listKind === "enum")
      ? "an enum"
      : `a ${ScalarType[scalar].toLowerCase()}`;
  // A repeated number may also come packed, length-delimited.
  if (field.fieldKind === "list" && one !== WireType.LengthDelimited)
    return { types: [one, WireType.LengthDelimited], expected: `a list of ${name.replace(/^an? /, "")}s` };
  return {
    types: [one],
    expected: field.fieldKind === "list" ? `a list of ${name.replace(/^an? /, "")}s` : name,
  };
}

function scalarWireType(scalar: ScalarType): WireType {
  switch (scalar) {
    case ScalarType.STRING:
    case ScalarType.BYTES:
      return WireType.LengthDelimited;
    case ScalarType.DOUBLE:
    case ScalarType.FIXED64:
    case ScalarType.SFIXED64:
      return WireType.Bit64;
    case ScalarType.FLOAT:
    case ScalarType.FIXED32:
    case ScalarType.SFIXED32:
      return WireType.Bit32;
    default:
      return WireType.Varint;
  }
}

/**
 * The first field that made decoding fail, found by walking the wire format
 * with the descriptor (protobuf-es only says that some string was invalid,
 * or that some message was too deep). Runs only for a request that failed to
 * decode. Inside a Struct payload the path stops at the payload's field.
 * With `mend`, a string of invalid UTF-8 is no problem: it is mended in
 * place (see {@link mendString}), its path given to `mend`, and the walk goes on.
 */
function locateProblem(
  desc: DescMessage,
  bytes: Uint8Array,
  path: string,
  inPayload: boolean,
  depth: number,
  mend?: (field: string) => void,
): Problem | undefined {
  if (depth > RECURSION_LIMIT) return { kind: "depth", field: path };
  const reader = new BinaryReader(bytes);
  const seen = new Map<number, number>();
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    const field = desc.fields.find((f) => f.number === number);
    if (!field) {
      reader.skip(wireType, number);
      continue;
    }
    let fieldPath = path;
    if (!inPayload) {
      fieldPath = path === "" ? field.name : `${path}.${field.name}`;
      if (field.fieldKind === "list") {
        const index = seen.get(number) ?? 0;
        seen.set(number, index + 1);
        fieldPath += `[${index}]`;
      }
    }
    const { types, expected } = wireTypesOf(field);
    if (!types.includes(wireType)) {
      return {
        kind: "wire type",
        field: fieldPath,
        got: wireType,
        expected,
      };
    }
    if (wireType !== WireType.LengthDelimited) {
      reader.skip(wireType, number);
      continue;
    }
    const data = reader.bytes();
    let found: Problem | undefined;
    if (isString(field)) {
      if (!isUtf8(data)) found = badString(data, fieldPath, mend);
    } else if (field.fieldKind === "map") {
      found = locateInMapEntry(field, data, fieldPath, inPayload, depth, mend);
    } else if (
      field.fieldKind === "message" ||
      (field.fieldKind === "list" && field.listKind === "message")
    ) {
      const child = field.message;
      found = locateProblem(
        child,
        data,
        fieldPath,
        inPayload || PAYLOAD_TYPES.has(child.typeName),
        depth + 1,
        mend,
      );
    }
    if (found) return found;
  }
  return undefined;
}

/** A string of invalid UTF-8 at `field`: the problem, or (with `mend`) none once mended. */
function badString(data: Uint8Array, field: string, mend?: (field: string) => void): Problem | undefined {
  if (!mend) return { kind: "utf8", field };
  mendString(data);
  mend(field);
  return undefined;
}

/** One map entry on the wire: key = 1, value = 2. */
function locateInMapEntry(
  field: DescField & { fieldKind: "map" },
  bytes: Uint8Array,
  path: string,
  inPayload: boolean,
  depth: number,
  mend?: (field: string) => void,
): Problem | undefined {
  const reader = new BinaryReader(bytes);
  let keyPath = path;
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    if (wireType !== WireType.LengthDelimited) {
      reader.skip(wireType, number);
      continue;
    }
    const data = reader.bytes();
    let found: Problem | undefined;
    if (number === 1 && field.mapKey === ScalarType.STRING) {
      if (!isUtf8(data)) found = badString(data, path, mend);
      if (!inPayload) keyPath = `${path}[${quote(Buffer.from(data).toString("utf8"))}]`;
    } else if (number === 2) {
      if (field.mapKind === "scalar" && field.scalar === ScalarType.STRING) {
        if (!isUtf8(data)) found = badString(data, keyPath, mend);
      } else if (field.mapKind === "message") {
        const child = field.message;
        found = locateProblem(
          child,
          data,
          keyPath,
          inPayload || PAYLOAD_TYPES.has(child.typeName),
          depth + 1,
          mend,
        );
      }
    }
    if (found) return found;
  }
  return undefined;
}
