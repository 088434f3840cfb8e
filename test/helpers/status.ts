import { fromBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import type { Metadata, ServiceError } from "@grpc/grpc-js";
import { expect } from "vitest";
import type { Code } from "../../src/errors.js";
import { BadRequestSchema, ErrorInfoSchema } from "../../src/gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../../src/gen/google/rpc/status_pb.js";

/** What a failed call carried. */
export interface CallFailure {
  readonly code: number;
  readonly message: string;
  /** ErrorInfo.reason from grpc-status-details-bin. */
  readonly reason: string | undefined;
  /** BadRequest field names from grpc-status-details-bin. */
  readonly fields: string[];
  /** ErrorInfo.metadata from grpc-status-details-bin. */
  readonly info: Record<string, string>;
}

/** ErrorInfo's reason and metadata, and BadRequest field names, from a status's `grpc-status-details-bin`. */
export function statusDetails(metadata: Metadata | undefined): {
  reason: string | undefined;
  fields: string[];
  info: Record<string, string>;
} {
  const bin = metadata?.get("grpc-status-details-bin")[0];
  let reason: string | undefined;
  const fields: string[] = [];
  let info: Record<string, string> = {};
  if (bin instanceof Buffer) {
    const status = fromBinary(StatusSchema, bin);
    for (const detail of status.details) {
      const errorInfo = anyUnpack(detail, ErrorInfoSchema);
      if (errorInfo) {
        reason = errorInfo.reason;
        info = errorInfo.metadata;
      }
      const bad = anyUnpack(detail, BadRequestSchema);
      if (bad) fields.push(...bad.fieldViolations.map((v) => v.field));
    }
  }
  return { reason, fields, info };
}

/** Awaits a call expected to fail; returns its status and decoded details. */
export async function failure(call: Promise<unknown> | (() => Promise<unknown>)): Promise<CallFailure> {
  let error: ServiceError | undefined;
  try {
    await (typeof call === "function" ? call() : call);
  } catch (e) {
    error = e as ServiceError;
  }
  expect(error, "the call should have failed").toBeDefined();
  const e = error as ServiceError;
  return { code: e.code, message: e.details, ...statusDetails(e.metadata) };
}

/** Expects a call to fail with `code` and a message matching `message`. */
export async function expectStatus(
  call: Promise<unknown> | (() => Promise<unknown>),
  code: Code,
  message: RegExp,
): Promise<CallFailure> {
  const f = await failure(call);
  expect({ code: f.code, message: f.message }).toEqual({ code, message: expect.stringMatching(message) });
  return f;
}
