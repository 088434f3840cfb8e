import { sql } from "drizzle-orm";
import type { Db } from "../database.js";
import { queryRows, toNumber } from "../rows.js";

/** Some bytes of a file's content, and the size of the whole. */
export interface FileChunk {
  /** The bytes asked for: fewer at the end of the content, none past it. */
  readonly bytes: Uint8Array;
  /** Bytes in the file's whole content. */
  readonly sizeBytes: number;
}

/**
 * Up to `length` bytes of file `id`'s content from byte `offset` (0-based),
 * or undefined if there is no such file.
 *
 * A plain read, no locks: a file's content is written once, when the file is
 * created, and never changed, so chunks read by separate statements are
 * pieces of one content; a file deleted between them is simply gone. Only
 * the bytes asked for leave the database (`substring` on bytea, which
 * PostgreSQL and PGlite both slice), so a download holds one chunk at a time
 * however large the file. Base64, as the content went in: the two drivers
 * hand bytea back in different shapes.
 */
export async function readFileChunk(
  db: Db,
  id: string,
  offset: number,
  length: number,
): Promise<FileChunk | undefined> {
  const [row] = await queryRows<{ chunk: string | null; size: unknown }>(
    db,
    sql`select encode(substring(content from ${offset + 1}::int for ${length}::int), 'base64') as chunk,
               octet_length(content) as size
        from resources where id = ${id} and kind = 'file'`,
  );
  if (row === undefined || row.chunk === null) return undefined;
  return { bytes: Buffer.from(row.chunk, "base64"), sizeBytes: toNumber(row.size) };
}
