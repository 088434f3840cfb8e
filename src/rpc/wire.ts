/**
 * Protobuf's binary format written and read by hand, for the few messages on
 * hot paths where protobuf-es's generic `toBinary` and `fromBinary` cost more
 * than the rest of the work (worker-wire.ts, action-wire.ts). Writing: sizes
 * are computed first and the bytes written into a buffer of exactly that
 * size. Reading: {@link Reader}. Each encoder and decoder built on these has
 * unit tests comparing it with protobuf-es.
 */

import type { JsonValue, JsonObject as ProtoJsonObject } from "@bufbuild/protobuf";
import type { JsonObject } from "../work/action.js";

/** Bytes of a varint holding `n`, a non-negative safe integer. */
export function varintSize(n: number): number {
  let size = 1;
  while (n >= 0x80) {
    n = Math.floor(n / 0x80);
    size += 1;
  }
  return size;
}

/** Writes `n` (a non-negative safe integer) as a varint at `at`; returns the next offset. */
export function writeVarint(into: Uint8Array, at: number, n: number): number {
  while (n >= 0x80) {
    into[at++] = (n % 0x80) | 0x80;
    n = Math.floor(n / 0x80);
  }
  into[at++] = n;
  return at;
}

/** Whether `n` can be written as a varint here: a non-negative safe integer. */
export const isCount = (n: number): boolean => Number.isSafeInteger(n) && n >= 0;

/** Bytes of the tag of field number `field` (any wire type). */
export const tagSize = (field: number): number => varintSize(field << 3);

/** Bytes of proto3 string field `field` holding `bytes` bytes (none when empty). */
export const stringFieldSize = (field: number, bytes: number): number =>
  bytes === 0 ? 0 : tagSize(field) + varintSize(bytes) + bytes;

/** Bytes of proto3 integer (or bool, enum) field `field` holding `n` (none when zero). */
export const uintFieldSize = (field: number, n: number): number =>
  n === 0 ? 0 : tagSize(field) + varintSize(n);

/** Bytes of message field `field` whose message is `bytes` long (present even when empty). */
export const messageFieldSize = (field: number, bytes: number): number =>
  tagSize(field) + varintSize(bytes) + bytes;

/*
 * google.protobuf.Struct from JSON, in two passes: the first computes the
 * length of every length-delimited part (map entries, keys, values, strings,
 * nested structs and lists) and pushes them in the order the second pass
 * writes them, so no length is computed twice. Keys go in Object.keys order,
 * as protobuf-es writes a map. A value that is not JSON (undefined, a
 * function, a non-finite number) makes the size -1: the caller falls back.
 */

/** Bytes of a Struct's fields; pushes the lengths its writing needs. */
export function structSize(o: JsonObject, sizes: number[]): number {
  // protobuf-es writes an array or a string given as a Struct as an empty one: leave it to it.
  if (typeof o !== "object" || o === null || Array.isArray(o)) return -1;
  let total = 0;
  for (const key of Object.keys(o)) {
    const at = sizes.length;
    sizes.push(0, 0, 0); // entry, key, value
    const k = Buffer.byteLength(key);
    const v = valueSize(o[key], sizes);
    if (v < 0) return -1;
    // A map entry writes its key even when empty, as protobuf-es does.
    const entry = messageFieldSize(1, k) + messageFieldSize(2, v);
    sizes[at] = entry;
    sizes[at + 1] = k;
    sizes[at + 2] = v;
    total += messageFieldSize(1, entry);
  }
  return total;
}

/** Bytes of a google.protobuf.Value holding `v`; pushes the lengths its writing needs. */
function valueSize(v: unknown, sizes: number[]): number {
  switch (typeof v) {
    case "string": {
      const n = Buffer.byteLength(v);
      sizes.push(n);
      return messageFieldSize(3, n);
    }
    case "number":
      return Number.isFinite(v) ? 9 : -1;
    case "boolean":
      return 2;
    case "object": {
      if (v === null) return 2;
      const at = sizes.length;
      sizes.push(0);
      const inner = Array.isArray(v) ? listSize(v, sizes) : structSize(v as JsonObject, sizes);
      if (inner < 0) return -1;
      sizes[at] = inner;
      return messageFieldSize(5, inner); // struct_value, or list_value (6): the same size
    }
    default:
      return -1;
  }
}

function listSize(a: readonly unknown[], sizes: number[]): number {
  let total = 0;
  for (const x of a) {
    const at = sizes.length;
    sizes.push(0);
    const v = valueSize(x, sizes);
    if (v < 0) return -1;
    sizes[at] = v;
    total += messageFieldSize(1, v);
  }
  return total;
}

/**
 * Writes into a buffer of the exact size, taking the lengths of Struct parts
 * from their size pass ({@link structSize}) in order. `done` checks that the
 * sizes added up.
 */
export class Writer {
  private at = 0;
  private next = 0;
  constructor(
    private readonly bytes: Buffer,
    private readonly sizes: readonly number[],
  ) {}

  tag(tag: number): this {
    this.at = writeVarint(this.bytes, this.at, tag);
    return this;
  }

  /** The tag and length of message field `field`, whose message is `bytes` long. */
  message(field: number, bytes: number): this {
    return this.tag((field << 3) | 2).varint(bytes);
  }

  varint(n: number): this {
    this.at = writeVarint(this.bytes, this.at, n);
    return this;
  }

  /** A proto3 integer or bool field, left out when zero. */
  uint(field: number, n: number): this {
    return n === 0 ? this : this.tag(field << 3).varint(n);
  }

  /** A proto3 string field of `length` bytes, left out when empty. */
  string(field: number, s: string, length: number): this {
    if (length === 0) return this;
    this.tag((field << 3) | 2).varint(length);
    this.at += this.bytes.write(s, this.at, length, "utf8");
    return this;
  }

  struct(o: JsonObject): this {
    for (const key of Object.keys(o)) {
      const entry = this.take();
      const k = this.take();
      const v = this.take();
      this.tag((1 << 3) | 2).varint(entry); // Struct.fields: a map entry
      this.tag((1 << 3) | 2).varint(k);
      this.at += this.bytes.write(key, this.at, k, "utf8");
      this.tag((2 << 3) | 2).varint(v);
      this.value(o[key]);
    }
    return this;
  }

  /** The fields of a google.protobuf.Value (its oneof member is written even when zero). */
  private value(v: unknown): void {
    if (typeof v === "string") {
      const n = this.take();
      this.tag((3 << 3) | 2).varint(n);
      this.at += this.bytes.write(v, this.at, n, "utf8");
    } else if (typeof v === "number") {
      this.tag((2 << 3) | 1);
      this.at = this.bytes.writeDoubleLE(v, this.at);
    } else if (typeof v === "boolean") {
      this.tag(4 << 3).varint(v ? 1 : 0);
    } else if (v === null) {
      this.tag(1 << 3).varint(0);
    } else if (Array.isArray(v)) {
      this.tag((6 << 3) | 2).varint(this.take());
      for (const x of v) {
        this.tag((1 << 3) | 2).varint(this.take());
        this.value(x);
      }
    } else {
      this.tag((5 << 3) | 2).varint(this.take());
      this.struct(v as JsonObject);
    }
  }

  private take(): number {
    return this.sizes[this.next++] as number;
  }

  done(): Buffer {
    if (this.at !== this.bytes.length)
      throw new Error(`wire: wrote ${this.at} of ${this.bytes.length} bytes`);
    return this.bytes;
  }
}

/**
 * Reads the fields of a message ending at `end`, calling `field` with each
 * one's number and wire type; false when `field` declines one or a field
 * comes twice that is not in `repeated` (a bit mask of field numbers: a
 * message field twice is merged, a scalar's last value wins, none of which is
 * worth reading by hand).
 */
export function fields(
  r: Reader,
  end: number,
  field: (n: number, wireType: number) => boolean,
  repeated = 0,
): boolean {
  let seen = 0;
  while (r.at < end) {
    const tag = r.bytes[r.at++] as number;
    const n = tag >>> 3;
    // One-byte tags only: fields 1 to 15.
    if (tag >= 0x80 || n === 0 || seen & (1 << n) & ~repeated) return false;
    seen |= 1 << n;
    if (!field(n, tag & 7)) return false;
  }
  return r.at === end;
}

/** What a {@link Reader} read gives for bytes outside its patterns. */
export const DECLINE = -1;

/** Struct and list nesting past this is left to protobuf-es. */
const MAX_DEPTH = 32;

/**
 * protobuf-es decodes a proto3 string with a strict TextDecoder (it refuses
 * bytes that are not UTF-8, and keeps a leading U+FEFF): so does this.
 */
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/**
 * Reads the binary format for decoders of a few hot messages (worker-wire.ts),
 * giving exactly what protobuf-es's `fromBinary` gives for the byte patterns it
 * knows. Anything else — a value past 2^53 − 1, a field or wire type it does
 * not expect, a field twice, bytes cut short, a Struct that would not read
 * back as JSON — makes a read return {@link DECLINE} (or undefined), and the
 * caller decodes the message the ordinary way. Declining is never wrong, only
 * slower.
 */
export class Reader {
  /** The offset of the next byte to read. */
  at = 0;
  constructor(readonly bytes: Buffer) {}

  /** A varint that is a safe integer (at most 8 bytes: 56 bits, checked against 2^53 − 1), or DECLINE. */
  varint(end: number): number {
    const bytes = this.bytes;
    let n = 0;
    let scale = 1;
    for (let i = 0; i < 8 && this.at < end; i++) {
      const byte = bytes[this.at++] as number;
      n += (byte & 0x7f) * scale;
      if ((byte & 0x80) === 0) return n <= Number.MAX_SAFE_INTEGER ? n : DECLINE;
      scale *= 128;
    }
    return DECLINE;
  }

  /** The end of a length-delimited part whose length comes next, or DECLINE. */
  delimited(end: number): number {
    const length = this.varint(end);
    if (length === DECLINE || length > end - this.at) return DECLINE;
    return this.at + length;
  }

  /** A string of the bytes up to `to` (the end of its part); undefined when they are not UTF-8. */
  string(to: number): string | undefined {
    const bytes = this.bytes;
    const from = this.at;
    this.at = to;
    for (let i = from; i < to; i++) {
      if ((bytes[i] as number) >= 0x80) {
        try {
          return utf8.decode(bytes.subarray(from, to));
        } catch {
          return undefined;
        }
      }
    }
    return bytes.toString("latin1", from, to);
  }

  /**
   * A google.protobuf.Struct whose fields end at `end`, as the JSON object
   * protobuf-es makes of it; undefined for a value that is not plain JSON
   * (no kind, a non-finite number), a key `__proto__`, or deeper nesting
   * than {@link MAX_DEPTH}.
   */
  struct(end: number, depth = 0): ProtoJsonObject | undefined {
    if (depth > MAX_DEPTH) return undefined;
    const o: ProtoJsonObject = {};
    while (this.at < end) {
      if (this.bytes[this.at++] !== ((1 << 3) | 2)) return undefined; // Struct.fields
      const entryEnd = this.delimited(end);
      if (entryEnd === DECLINE) return undefined;
      let key: string | undefined = "";
      let keyed = false;
      let value: JsonValue | undefined;
      while (this.at < entryEnd) {
        const tag = this.bytes[this.at++];
        const to = this.delimited(entryEnd);
        if (to === DECLINE) return undefined;
        // A field twice in one entry: protobuf-es merges two values of one kind (lists are
        // joined, structs combined). Left to it.
        if (tag === ((1 << 3) | 2)) {
          if (keyed) return undefined;
          keyed = true;
          key = this.string(to);
          if (key === undefined) return undefined;
        } else if (tag === ((2 << 3) | 2)) {
          if (value !== undefined) return undefined;
          value = this.value(to, depth);
          if (value === undefined) return undefined;
        } else return undefined;
      }
      if (value === undefined || key === undefined || key === "__proto__") return undefined;
      o[key] = value;
    }
    return o;
  }

  /** A google.protobuf.Value ending at `end` holding exactly one kind, as JSON; undefined otherwise. */
  private value(end: number, depth: number): JsonValue | undefined {
    if (this.at >= end) return undefined;
    const tag = this.bytes[this.at++];
    let v: JsonValue | undefined;
    switch (tag) {
      case 1 << 3: // null_value
        if (this.varint(end) === DECLINE) return undefined;
        v = null;
        break;
      case (2 << 3) | 1: // number_value
        if (end - this.at < 8) return undefined;
        v = this.bytes.readDoubleLE(this.at);
        this.at += 8;
        if (!Number.isFinite(v)) return undefined;
        break;
      case (3 << 3) | 2: {
        // string_value
        const to = this.delimited(end);
        if (to === DECLINE) return undefined;
        v = this.string(to);
        if (v === undefined) return undefined;
        break;
      }
      case 4 << 3: {
        // bool_value: written as 0 or 1; any other varint is left to protobuf-es.
        const b = this.varint(end);
        if (b !== 0 && b !== 1) return undefined;
        v = b === 1;
        break;
      }
      case (5 << 3) | 2: {
        // struct_value
        const to = this.delimited(end);
        if (to === DECLINE) return undefined;
        v = this.struct(to, depth + 1);
        break;
      }
      case (6 << 3) | 2: {
        // list_value
        const to = this.delimited(end);
        if (to === DECLINE) return undefined;
        v = this.list(to, depth + 1);
        break;
      }
      default:
        return undefined;
    }
    // One kind, and nothing after it.
    return this.at === end ? v : undefined;
  }

  /** A google.protobuf.ListValue ending at `end`, as a JSON array; undefined as for {@link struct}. */
  private list(end: number, depth: number): JsonValue[] | undefined {
    if (depth > MAX_DEPTH) return undefined;
    const a: JsonValue[] = [];
    while (this.at < end) {
      if (this.bytes[this.at++] !== ((1 << 3) | 2)) return undefined; // ListValue.values
      const to = this.delimited(end);
      if (to === DECLINE) return undefined;
      const v = this.value(to, depth);
      if (v === undefined) return undefined;
      a.push(v);
    }
    return a;
  }
}
