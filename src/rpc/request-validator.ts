import { type DescEnum, type DescField, type DescMessage, ScalarType } from "@bufbuild/protobuf";
import { isWrapperDesc } from "@bufbuild/protobuf/wkt";
import { Code, type FieldViolation, LeaseholdError, quote } from "../errors.js";
import { charactersOver, DEFAULT_LIMITS, FIELD_LIMITS, type FieldLimit, PAYLOAD_LIMITS } from "./limits.js";

/**
 * The one validation step every request goes through before its handler
 * runs (unary and server-streaming requests, and every message of a bidi
 * stream): a walk of the decoded message driven by its descriptor, checking
 * the limits of `limits.ts`. What is checked, and which status a violation
 * gets, is documented there.
 *
 * Cheap on the hot path (heartbeats of 10,000 streams, SPEC §6): the walk of
 * each message type is compiled once from its descriptor into closures that
 * skip every field with nothing to check (bools, bounded numbers, messages
 * without such fields), and a valid message allocates nothing: the field
 * path is a shared stack and turns into a string only for a violation.
 */

/** Checks a decoded request: undefined if it is valid, else the error to answer with. */
export type RequestCheck = (message: object) => LeaseholdError | undefined;

/** Violations reported per request, at most; the walk stops after these. */
const MAX_VIOLATIONS = 16;

/** Proto Timestamp range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z. */
const MIN_TIMESTAMP_SECONDS = -62_135_596_800n;
const MAX_TIMESTAMP_SECONDS = 253_402_300_799n;
/** Proto Duration range: about ±10,000 years. */
const MAX_DURATION_SECONDS = 315_576_000_000n;
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const NUL = "\u0000";

// The state of the one walk in progress. Validation is synchronous, so one
// set of module-level state serves every call.
const SEGMENT_FIELD = 0;
const SEGMENT_INDEX = 1;
const SEGMENT_KEY = 2;
const segmentKinds: number[] = [];
const segments: (string | number)[] = [];
let violations: (FieldViolation & { size: boolean })[] | undefined;
let stopped = false;
let payloadNodes = 0;
let payloadChars = 0;
let payloadOver = false;
/** How many path segments lead to the payload being walked. */
let payloadBase = 0;

function enter(kind: number, segment: string | number): void {
  segmentKinds.push(kind);
  segments.push(segment);
}

function leave(): void {
  segmentKinds.pop();
  segments.pop();
}

/** The current field path (its first `length` segments), e.g. `spec.containers[0].command.env["PATH"]`. */
function currentPath(length = segments.length): string {
  let path = "";
  for (let i = 0; i < length; i++) {
    const segment = segments[i] as string | number;
    if (segmentKinds[i] === SEGMENT_INDEX) path += `[${segment}]`;
    else if (segmentKinds[i] === SEGMENT_KEY) path += `[${quote(String(segment))}]`;
    else path += path === "" ? segment : `.${segment}`;
  }
  return path === "" ? "request" : path;
}

/** Records a violation of the current field; size violations of a payload are the whole payload's. */
function violation(description: string, size = false): void {
  violations ??= [];
  violations.push({ field: currentPath(size ? payloadBase : segments.length), description, size });
  if (violations.length >= MAX_VIOLATIONS) stopped = true;
}

type Check = (value: unknown) => void;
type MessageCheck = (message: Record<string, unknown>) => void;

function stringCheck(maxLength: number): Check {
  return (value) => {
    const s = value as string;
    const over = charactersOver(s, maxLength);
    if (over !== undefined) violation(`must be at most ${maxLength} characters (got ${over})`);
    else if (s.includes(NUL)) violation("must not contain NUL (\\u0000) characters");
  };
}

function bytesCheck(maxLength: number): Check {
  return (value) => {
    const b = value as Uint8Array;
    if (b.byteLength > maxLength) violation(`must be at most ${maxLength} bytes (got ${b.byteLength})`);
  };
}

function int64Check(unsigned: boolean): Check {
  const range = unsigned
    ? `between 0 and ${Number.MAX_SAFE_INTEGER}`
    : `between -${Number.MAX_SAFE_INTEGER} and ${Number.MAX_SAFE_INTEGER}`;
  return (value) => {
    // protobuf-es gives 64-bit integers as bigint (or string with jstype = JS_STRING).
    const v = typeof value === "bigint" ? value : BigInt(value as string);
    if (v > MAX_SAFE || v < -MAX_SAFE) violation(`must be ${range} (got ${quote(String(v), 24)})`);
  };
}

const finiteCheck: Check = (value) => {
  if (!Number.isFinite(value as number)) violation(`must be a finite number (got ${value})`);
};

function enumCheck(desc: DescEnum): Check {
  return (value) => {
    if (desc.value[value as number] === undefined) {
      violation(`is not a known ${desc.name} (${value})`);
    }
  };
}

const timestampCheck: Check = (value) => {
  const t = value as { seconds: bigint; nanos: number };
  if (t.seconds < MIN_TIMESTAMP_SECONDS || t.seconds > MAX_TIMESTAMP_SECONDS) {
    violation(
      `must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z (got ${quote(String(t.seconds), 24)} seconds)`,
    );
  } else if (t.nanos < 0 || t.nanos > 999_999_999) {
    violation(`nanos must be between 0 and 999999999 (got ${t.nanos})`);
  }
};

const durationCheck: Check = (value) => {
  const d = value as { seconds: bigint; nanos: number };
  if (d.seconds < -MAX_DURATION_SECONDS || d.seconds > MAX_DURATION_SECONDS) {
    violation(`must be within ±${MAX_DURATION_SECONDS} seconds (got ${quote(String(d.seconds), 24)})`);
  } else if (
    d.nanos < -999_999_999 ||
    d.nanos > 999_999_999 ||
    (d.seconds > 0n && d.nanos < 0) ||
    (d.seconds < 0n && d.nanos > 0)
  ) {
    violation("is not a valid duration (nanos out of range or of the wrong sign)");
  }
};

/**
 * One JSON value of a Struct payload. Counts nodes and size in the payload
 * counters and stops at the first limit passed, so a hostile payload costs
 * at most a bounded walk.
 */
function walkJson(value: unknown, depth: number): void {
  if (payloadOver || stopped) return;
  payloadNodes += 1;
  if (payloadNodes > PAYLOAD_LIMITS.nodes) {
    payloadOver = true;
    violation(`must have at most ${PAYLOAD_LIMITS.nodes} values and keys`, true);
    return;
  }
  switch (typeof value) {
    case "string":
      payloadChars += value.length + 2;
      if (value.includes(NUL)) violation("must not contain NUL (\\u0000) characters");
      break;
    case "number":
      payloadChars += 8;
      if (!Number.isFinite(value)) violation(`must be a finite number (got ${value})`);
      break;
    case "object": {
      if (value === null) {
        payloadChars += 4;
        break;
      }
      if (depth > PAYLOAD_LIMITS.depth) {
        payloadOver = true;
        violation(`must be nested at most ${PAYLOAD_LIMITS.depth} levels deep`, true);
        return;
      }
      payloadChars += 2;
      if (Array.isArray(value)) {
        for (let i = 0; i < value.length && !payloadOver && !stopped; i++) {
          enter(SEGMENT_INDEX, i);
          walkJson(value[i], depth + 1);
          leave();
        }
      } else {
        const object = value as Record<string, unknown>;
        for (const key in object) {
          if (payloadOver || stopped) break;
          enter(SEGMENT_KEY, key);
          payloadNodes += 1;
          payloadChars += key.length + 3;
          if (key.includes(NUL)) violation("keys must not contain NUL (\\u0000) characters");
          walkJson(object[key], depth + 1);
          leave();
        }
      }
      break;
    }
    default:
      payloadChars += 5;
  }
  if (!payloadOver && payloadChars > PAYLOAD_LIMITS.jsonChars) {
    payloadOver = true;
    violation(`must be at most ${PAYLOAD_LIMITS.jsonChars / (1024 * 1024)} MiB as JSON`, true);
  }
}

/** A Struct payload (JsonObject in protobuf-es), with counters of its own. */
const payloadCheck: Check = (value) => {
  payloadNodes = 0;
  payloadChars = 0;
  payloadOver = false;
  payloadBase = segments.length;
  walkJson(value, 1);
};

const limitOf = (field: DescField): FieldLimit =>
  FIELD_LIMITS[`${field.parent.typeName}.${field.name}`] ?? {};

function scalarCheck(type: ScalarType, field: DescField): Check | undefined {
  const limit = limitOf(field);
  switch (type) {
    case ScalarType.STRING:
      return stringCheck(limit.maxLength ?? DEFAULT_LIMITS.stringLength);
    case ScalarType.BYTES:
      return limit.maxLength === undefined ? undefined : bytesCheck(limit.maxLength);
    case ScalarType.INT64:
    case ScalarType.SINT64:
    case ScalarType.SFIXED64:
      return limit.fullRange64 ? undefined : int64Check(false);
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return limit.fullRange64 ? undefined : int64Check(true);
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return finiteCheck;
    default:
      // 32-bit integers and bools are range-checked by the decoder; their
      // meaning (a page size, a capacity) is the handler's business.
      return undefined;
  }
}

/** The check of one message-typed value (not a list or map), or undefined if nothing can be wrong. */
function messageValueCheck(
  desc: DescMessage,
  field: DescField,
  compiling: Set<DescMessage>,
): Check | undefined {
  switch (desc.typeName) {
    case "google.protobuf.Timestamp":
      return timestampCheck;
    case "google.protobuf.Duration":
      return durationCheck;
    case "google.protobuf.Struct":
      // JsonObject wherever it is used in a field (protobuf-es represents it so).
      return payloadCheck;
    case "google.protobuf.Value":
    case "google.protobuf.ListValue":
      throw new Error(
        `${field.parent.typeName}.${field.name}: google.protobuf.Value and ListValue fields are not supported by the request validator; use a Struct`,
      );
  }
  if (field.fieldKind === "message" && !field.oneof && isWrapperDesc(desc)) {
    // Singular wrappers outside a oneof are unboxed to their scalar.
    const inner = desc.fields[0] as DescField & { fieldKind: "scalar" };
    return scalarCheck(inner.scalar, field);
  }
  const check = compileMessage(desc, compiling);
  return check as Check | undefined;
}

function listCheck(field: DescField & { fieldKind: "list" }, compiling: Set<DescMessage>): Check {
  const maxItems = limitOf(field).maxItems ?? DEFAULT_LIMITS.repeatedItems;
  const element =
    field.listKind === "scalar"
      ? scalarCheck(field.scalar, field)
      : field.listKind === "enum"
        ? enumCheck(field.enum)
        : messageValueCheck(field.message, field, compiling);
  return (value) => {
    const list = value as unknown[];
    if (list.length > maxItems) {
      violation(`must have at most ${maxItems} elements (got ${list.length})`);
      return;
    }
    if (!element) return;
    for (let i = 0; i < list.length && !stopped; i++) {
      enter(SEGMENT_INDEX, i);
      element(list[i]);
      leave();
    }
  };
}

function mapCheck(field: DescField & { fieldKind: "map" }, compiling: Set<DescMessage>): Check {
  const limit = limitOf(field);
  const maxItems = limit.maxItems ?? DEFAULT_LIMITS.mapEntries;
  const maxKeyLength = limit.maxKeyLength ?? DEFAULT_LIMITS.mapKeyLength;
  const stringKeys = field.mapKey === ScalarType.STRING;
  const element =
    field.mapKind === "scalar"
      ? scalarCheck(field.scalar, field)
      : field.mapKind === "enum"
        ? enumCheck(field.enum)
        : messageValueCheck(field.message, field, compiling);
  return (value) => {
    const record = value as Record<string, unknown>;
    let count = 0;
    for (const _ in record) count++;
    if (count > maxItems) {
      violation(`must have at most ${maxItems} entries (got ${count})`);
      return;
    }
    for (const key in record) {
      if (stopped) return;
      enter(SEGMENT_KEY, key);
      const over = stringKeys ? charactersOver(key, maxKeyLength) : undefined;
      if (over !== undefined) {
        violation(`keys must be at most ${maxKeyLength} characters (got ${over})`);
      } else if (stringKeys && key.includes(NUL)) {
        violation("keys must not contain NUL (\\u0000) characters");
      } else if (element) {
        element(record[key]);
      }
      leave();
    }
  };
}

function fieldCheck(field: DescField, compiling: Set<DescMessage>): Check | undefined {
  switch (field.fieldKind) {
    case "scalar":
      return scalarCheck(field.scalar, field);
    case "enum":
      return enumCheck(field.enum);
    case "message":
      return messageValueCheck(field.message, field, compiling);
    case "list":
      return listCheck(field, compiling);
    case "map":
      return mapCheck(field, compiling);
  }
}

/** A compiled message check, or NONE for a message type with nothing to check. */
const compiled = new WeakMap<DescMessage, MessageCheck | "none">();

function compileMessage(desc: DescMessage, compiling: Set<DescMessage>): MessageCheck | undefined {
  const known = compiled.get(desc);
  if (known !== undefined) return known === "none" ? undefined : known;
  if (compiling.has(desc)) {
    // A recursive message (a ConnectRequest's batch holds ConnectRequests):
    // checked through its compiled check once that exists. The decoder's
    // recursion limit bounds how deep a request can nest, so the walk is
    // bounded by the request's size.
    return (message) => {
      const check = compiled.get(desc);
      if (check !== undefined && check !== "none") check(message);
    };
  }
  compiling.add(desc);
  const checks: MessageCheck[] = [];
  for (const field of desc.fields) {
    if (field.oneof) continue;
    const check = fieldCheck(field, compiling);
    if (!check) continue;
    const { localName, name } = field;
    checks.push((message) => {
      const value = message[localName];
      if (value === undefined || stopped) return;
      enter(SEGMENT_FIELD, name);
      check(value);
      leave();
    });
  }
  for (const oneof of desc.oneofs) {
    const cases: string[] = [];
    const names: string[] = [];
    const caseChecks: Check[] = [];
    for (const field of oneof.fields) {
      const check = fieldCheck(field, compiling);
      if (!check) continue;
      cases.push(field.localName);
      names.push(field.name);
      caseChecks.push(check);
    }
    if (caseChecks.length === 0) continue;
    const { localName } = oneof;
    checks.push((message) => {
      const selected = message[localName] as { case: string | undefined; value?: unknown };
      if (selected.case === undefined || stopped) return;
      for (let i = 0; i < cases.length; i++) {
        if (cases[i] !== selected.case) continue;
        enter(SEGMENT_FIELD, names[i] as string);
        (caseChecks[i] as Check)(selected.value);
        leave();
        return;
      }
    });
  }
  compiling.delete(desc);
  const check: MessageCheck | undefined =
    checks.length === 0
      ? undefined
      : checks.length === 1
        ? checks[0]
        : (message) => {
            for (let i = 0; i < checks.length; i++) (checks[i] as MessageCheck)(message);
          };
  compiled.set(desc, check ?? "none");
  return check;
}

/** The error for a list of violations: RESOURCE_EXHAUSTED if a payload is too large, else INVALID_ARGUMENT. */
export function violationError(list: readonly (FieldViolation & { size?: boolean })[]): LeaseholdError {
  const fieldViolations = list.map(({ field, description }) => ({ field, description }));
  if (!list.some((v) => v.size)) return LeaseholdError.invalidFields(fieldViolations);
  return new LeaseholdError(
    Code.ResourceExhausted,
    fieldViolations.map((v) => `${v.field}: ${v.description}`).join("; "),
    { reason: "PAYLOAD_TOO_LARGE", fieldViolations },
  );
}

/**
 * The violations of one Struct payload (a result, an action payload, an
 * object body) against {@link PAYLOAD_LIMITS}, as the server finds them in
 * any request that carries it, each at `name` and its path below
 * (`--result["rows"][3]`); empty when it is within them. For clients that
 * check what they send before sending it.
 */
export function payloadViolations(name: string, payload: object): FieldViolation[] {
  segments.length = 0;
  segmentKinds.length = 0;
  violations = undefined;
  stopped = false;
  enter(SEGMENT_FIELD, name);
  payloadCheck(payload);
  leave();
  const found = violations ?? [];
  violations = undefined;
  return found.map(({ field, description }) => ({ field, description }));
}

/**
 * The check of requests of type `desc`, compiled on first use. Throws at
 * compile time for message shapes it cannot bound (Value and ListValue
 * fields), so a new proto field of that kind fails the tests rather than
 * passing unchecked. Recursive messages are walked as deep as they nest
 * (the decoder bounds that).
 */
export function requestValidator(desc: DescMessage): RequestCheck {
  const check = compileMessage(desc, new Set());
  if (!check) return () => undefined;
  return (message) => {
    segments.length = 0;
    segmentKinds.length = 0;
    violations = undefined;
    stopped = false;
    check(message as Record<string, unknown>);
    if (violations === undefined) return undefined;
    const found = violations;
    violations = undefined;
    return violationError(found);
  };
}
