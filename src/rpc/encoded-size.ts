import { create, type DescMessage, type MessageInitShape, toBinary } from "@bufbuild/protobuf";

/**
 * Bytes a message of `schema` takes as sent: what pages and snapshots are
 * measured in against `PAGE_BYTES` (a Struct takes up to five times the bytes
 * of its JSON). Building and encoding it once more is fine for the calls
 * that use it, which are not hot.
 */
export const encodedSize = <Desc extends DescMessage>(
  schema: Desc,
  message: MessageInitShape<Desc>,
): number => toBinary(schema, create(schema, message)).byteLength;
