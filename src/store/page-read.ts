/**
 * JSON (payloads, outputs, bodies, results) a page of a listing carries at
 * most, beyond its first item: well under gRPC's default 4 MiB receive limit.
 * A thousand actions of 1 MiB each made a page of 1 GB, which no default
 * client can even receive, and held the server for seconds.
 */
export const PAGE_JSON_BYTES = 2 * 1024 * 1024;

/** First number of rows {@link readPage} reads, then four times as many each time, up to its limit. */
const FIRST_READ = 8;

/** A row read for a page, with the size of its JSON as text. */
export interface SizedRow<T> {
  readonly item: T;
  readonly jsonBytes: number;
}

/**
 * One page of a keyset listing after `afterKey`: up to `limit` items, fewer
 * (`cut`) where the next would take the page's JSON past
 * {@link PAGE_JSON_BYTES}. `read` returns up to `limit` rows after a key, in
 * key order; it is called in growing steps (8, 32, 128, …), so a page of
 * large items reads few more rows than it returns.
 */
export async function readPage<T>(
  read: (afterKey: string | undefined, limit: number) => Promise<SizedRow<T>[]>,
  keyOf: (item: T) => string,
  afterKey: string | undefined,
  limit: number,
): Promise<{ items: T[]; cut: boolean }> {
  const items: T[] = [];
  let bytes = 0;
  let after = afterKey;
  for (let step = Math.min(limit, FIRST_READ); ; step = Math.min(limit - items.length, step * 4)) {
    const rows = await read(after, step);
    for (const row of rows) {
      bytes += row.jsonBytes;
      if (items.length > 0 && bytes > PAGE_JSON_BYTES) return { items, cut: true };
      items.push(row.item);
    }
    const last = items.at(-1);
    if (rows.length < step || items.length >= limit || last === undefined) return { items, cut: false };
    after = keyOf(last);
  }
}
