import { createHash } from "node:crypto";
import { LeaseholdError } from "../errors.js";

/**
 * Opaque page tokens for keyset pagination. A token carries the last key of
 * the previous page and a fingerprint of the listing and its filters (see
 * {@link issuedFor}), so a token reused with other filters, or in another
 * List call, is refused instead of silently returning the wrong page.
 */
export interface PageCursor {
  /** Last key of the previous page. */
  readonly after: string;
}

const fingerprint = (filter: unknown) =>
  createHash("sha256").update(JSON.stringify(filter)).digest("base64url").slice(0, 16);

/**
 * What a token is issued for: the listing (`actions`, `events`, …) and its
 * filters. A ListLeases token given to ListActions with the same (empty)
 * filters was taken, and paged from a lease id.
 */
export const issuedFor = (listing: string, filter: unknown) => ({ listing, filter });

/** Encodes the cursor after `lastKey` for a listing with `filter`. */
export function encodePageToken(lastKey: string, filter: unknown): string {
  return Buffer.from(JSON.stringify({ a: lastKey, f: fingerprint(filter) })).toString("base64url");
}

const notIssued = () =>
  LeaseholdError.invalidArgument(
    "page_token",
    "is not a token this server issued; pass next_page_token from the previous page, or empty for the first page",
  );

/** Longest key a token may carry: keys are ids, names or sequence numbers. */
const MAX_KEY_LENGTH = 256;

/** Decodes a page token; empty means the first page. INVALID_ARGUMENT on a bad or mismatched token. */
export function decodePageToken(token: string, filter: unknown): PageCursor | undefined {
  if (token === "") return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(token, "base64url").toString("utf8"));
  } catch {
    parsed = undefined;
  }
  const p = parsed as { a?: unknown; f?: unknown } | undefined;
  // The key goes into SQL: a forged token must not carry what no key holds.
  if (
    typeof p?.a !== "string" ||
    typeof p.f !== "string" ||
    p.a.length > MAX_KEY_LENGTH ||
    p.a.includes("\u0000") ||
    Buffer.from(p.a, "utf8").toString("utf8") !== p.a // a lone surrogate from a JSON escape
  ) {
    throw notIssued();
  }
  if (p.f !== fingerprint(filter)) {
    throw LeaseholdError.invalidArgument(
      "page_token",
      "was issued for different filters or another List call; keep the call and filters of the first page, or start again without a token",
    );
  }
  return { after: p.a };
}

/** Decodes a page token whose key is a sequence number (0 for the first page). */
export function decodeSequencePageToken(token: string, filter: unknown): number {
  const cursor = decodePageToken(token, filter);
  if (!cursor) return 0;
  const after = Number(cursor.after);
  if (!/^\d{1,16}$/.test(cursor.after) || !Number.isSafeInteger(after)) throw notIssued();
  return after;
}

/** Page size with the default (100) and bounds (1–1000) of every List call. */
export function pageSize(requested: number): number {
  if (requested < 0) throw LeaseholdError.invalidArgument("page_size", "must not be negative (0 means 100)");
  if (requested > 1000) throw LeaseholdError.invalidArgument("page_size", "must be at most 1000");
  return requested === 0 ? 100 : requested;
}
