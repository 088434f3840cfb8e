import { createHash } from "node:crypto";

/**
 * A hash of a normalized request, independent of map and key order: what a
 * request id is stored with, to tell a retry (the same hash) from the id's
 * reuse for another request. JSON leaves out keys whose value is undefined.
 */
export function requestHash(value: unknown): string {
  const canonical = (x: unknown): unknown =>
    Array.isArray(x)
      ? x.map(canonical)
      : x !== null && typeof x === "object"
        ? Object.fromEntries(
            Object.keys(x)
              .sort()
              .map((k) => [k, canonical((x as Record<string, unknown>)[k])]),
          )
        : x;
  return createHash("sha256")
    .update(JSON.stringify(canonical(value)))
    .digest("hex");
}
