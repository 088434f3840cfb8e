import { encodePageToken } from "./page-token.js";

/** One page of a listing. */
export interface Page<T> {
  readonly items: readonly T[];
  /** Empty on the last page. */
  readonly nextPageToken: string;
}

/**
 * Most bytes a page of a listing (or a DebugLease snapshot) takes as sent,
 * beyond its first item: under gRPC's default 4 MiB receive limit. The
 * store's cut on the size of their JSON bounds what a listing reads; this
 * one, what is sent: a Struct takes up to five times the bytes of its JSON
 * (a number, 11 bytes).
 */
export const PAGE_BYTES = 3 * 1024 * 1024;

/** How a listing may end before its page size. */
export interface PageCut<T> {
  /** The store stopped reading before the page size (its JSON cut): more rows follow. */
  readonly more?: boolean;
  /**
   * An item's size as the caller sends it: the page also ends before these
   * add up past {@link PAGE_BYTES}, and always holds one item.
   */
  readonly sizeOf?: ((item: T) => number) | undefined;
}

/**
 * One page from `rows`, which were read with a limit of `size + 1`: the extra
 * row only says whether another page exists, and the next token points after
 * the last row kept. A page cut short (see {@link PageCut}) has more after it.
 */
export function toPage<T>(
  rows: readonly T[],
  size: number,
  keyOf: (row: T) => string,
  filter: unknown,
  { more = false, sizeOf }: PageCut<T> = {},
): Page<T> {
  let items = rows.slice(0, size);
  let after = more || rows.length > size;
  if (sizeOf) {
    const fit = Math.max(1, fittingPrefix(items.map(sizeOf), PAGE_BYTES).count);
    if (fit < items.length) {
      items = items.slice(0, fit);
      after = true;
    }
  }
  const last = items.at(-1);
  return { items, nextPageToken: after && last !== undefined ? encodePageToken(keyOf(last), filter) : "" };
}

/** How many of the first `sizes` add up to at most `budget` bytes, and the bytes they take. */
export function fittingPrefix(sizes: readonly number[], budget: number): { count: number; bytes: number } {
  let bytes = 0;
  for (let i = 0; i < sizes.length; i++) {
    const next = bytes + (sizes[i] as number);
    if (next > budget) return { count: i, bytes };
    bytes = next;
  }
  return { count: sizes.length, bytes };
}

/**
 * Which of `sizes` (by index) fit in `budget` bytes, taken smallest first so
 * that what is left out is the largest; and the bytes they take.
 */
export function smallestFitting(
  sizes: readonly number[],
  budget: number,
): { kept: Set<number>; bytes: number } {
  const bySize = sizes.map((_, i) => i).sort((a, b) => (sizes[a] as number) - (sizes[b] as number));
  const { count, bytes } = fittingPrefix(
    bySize.map((i) => sizes[i] as number),
    budget,
  );
  return { kept: new Set(bySize.slice(0, count)), bytes };
}
