/**
 * Pure formatting: enum names, ids, times and durations. Nothing here touches
 * the DOM or reads the clock; callers pass `now`.
 */
import type { DescEnum } from "@bufbuild/protobuf";
import { type Timestamp, timestampMs } from "@bufbuild/protobuf/wkt";

/**
 * The short name of an enum value as the descriptor spells it, without the
 * enum's prefix: `IN_GRACE` for WORKER_STATE_IN_GRACE. An unknown number (a
 * newer server) shows as the number.
 */
export function enumName(schema: DescEnum, value: number): string {
  return schema.value[value]?.localName ?? String(value);
}

/** The value of a short enum name (see enumName); undefined when the name is unknown. */
export function enumValue(schema: DescEnum, name: string | null): number | undefined {
  if (!name) return undefined;
  return schema.values.find((v) => v.localName === name)?.number;
}

/**
 * An enum as a select's [value, text] choices: `["", "any"]` first, then each
 * value but the UNSPECIFIED one by its short name, shown as `label` says.
 */
export function enumChoices(
  schema: DescEnum,
  label: (name: string) => string,
): readonly (readonly [string, string])[] {
  return [
    ["", "any"],
    ...schema.values.filter((v) => v.number !== 0).map((v) => [v.localName, label(v.localName)] as const),
  ];
}

/** `IN_GRACE` → `IN GRACE`: a state name as a badge shows it. */
export function spaced(name: string): string {
  return name.replaceAll("_", " ");
}

/** `LEASE_EXPIRED` → `lease expired`: an event kind as a label. */
export function kindLabel(name: string): string {
  return spaced(name).toLowerCase();
}

/**
 * A short form of a server-chosen id. Ids are UUIDv7: the leading digits are a
 * timestamp shared by ids made in the same minute, the trailing ones random,
 * so the tail is what tells two ids apart. Short ids (worker ids the operator
 * chose) are kept whole.
 */
export function shortId(id: string): string {
  return id.length <= 16 ? id : `…${id.slice(-8)}`;
}

/** A Timestamp in epoch milliseconds; undefined when unset. */
export function toMs(timestamp: Timestamp | undefined): number | undefined {
  return timestamp === undefined ? undefined : timestampMs(timestamp);
}

const pad = (n: number, width = 2): string => String(n).padStart(width, "0");

/** `14:03:07.215`, local time. */
export function clockTime(ms: number): string {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** `2025-01-31 14:03:07`, local time. */
export function dateTime(ms: number): string {
  const d = new Date(ms);
  const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  return `${date} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A span as people read it: `4.2 s` below a minute (tenths, rounded down), then `3m 05s`, `2h 10m`, `3d 4h`. */
export function span(ms: number): string {
  if (ms < 60_000) return `${(Math.floor(ms / 100) / 10).toFixed(1)} s`;
  const s = Math.floor(ms / 1000);
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h ${pad(Math.floor(s / 60) % 60)}m`;
  return `${Math.floor(s / 86_400)}d ${Math.floor(s / 3600) % 24}h`;
}

/** Time left until `deadlineMs`: `4.2 s`, or `expired` once it passed. */
export function timeLeft(deadlineMs: number, now: number): string {
  const left = deadlineMs - now;
  return left <= 0 ? "expired" : span(left);
}

/**
 * Time since `ms`: `3.1 s ago` for the first ten seconds (what matters in a
 * failover), then whole seconds and coarser units. A time slightly ahead of
 * the local clock reads `just now`.
 */
export function timeAgo(ms: number, now: number): string {
  const ago = now - ms;
  if (ago < 0) return "just now";
  if (ago < 10_000) return `${span(ago)} ago`;
  if (ago < 60_000) return `${Math.floor(ago / 1000)} s ago`;
  return `${span(ago)} ago`;
}
