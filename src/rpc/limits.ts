/**
 * The limits every request is checked against before its handler runs (see
 * `request-validator.ts`), in one table. The proto comments state the same
 * numbers; change both together.
 *
 * What is checked for every field of every request, without an entry here:
 * - strings: at most {@link DEFAULT_LIMITS.stringLength} characters (ids and
 *   names), no NUL character (PostgreSQL text and jsonb cannot hold one);
 *   invalid UTF-8 is refused while decoding;
 * - repeated fields: at most {@link DEFAULT_LIMITS.repeatedItems} elements; maps:
 *   at most {@link DEFAULT_LIMITS.mapEntries} entries with keys of at most
 *   {@link DEFAULT_LIMITS.mapKeyLength} characters;
 * - 64-bit integers: within ±(2^53 − 1), the range a JavaScript number and a
 *   PostgreSQL bigint both hold exactly;
 * - doubles and floats: finite;
 * - enums: one of the declared values (proto3 enums are open and would
 *   otherwise pass any number);
 * - Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, nanos
 *   0–999,999,999; Duration: ±10,000 years, nanos within ±999,999,999 with
 *   the sign of the seconds;
 * - Struct payloads (JSON): see {@link PAYLOAD_LIMITS}.
 *
 * Statuses: a payload over {@link PAYLOAD_LIMITS} is RESOURCE_EXHAUSTED (a
 * size limit, like a file over --max-file-size or a message over the receive
 * limit); every other violation, out-of-range numbers included, is
 * INVALID_ARGUMENT. Both carry a google.rpc.BadRequest naming each field.
 */

/** Limits of one field that differ from the defaults. */
export interface FieldLimit {
  /** Longest string, in characters (code points); for a map, of its values; for a list, of each element. */
  readonly maxLength?: number;
  /** Longest map key, in characters. */
  readonly maxKeyLength?: number;
  /** Most elements of a repeated field, or entries of a map. */
  readonly maxItems?: number;
  /**
   * A 64-bit integer the server only echoes and never turns into a number
   * (worker-chosen report ids and heartbeat sequences): any value is fine.
   */
  readonly fullRange64?: true;
}

/** The limits of fields without an entry in {@link FIELD_LIMITS}. */
export const DEFAULT_LIMITS = {
  /** Ids, names, kinds, request ids: every string not listed in {@link FIELD_LIMITS}. */
  stringLength: 128,
  repeatedItems: 1000,
  mapEntries: 64,
  mapKeyLength: 128,
} as const;

/** Free text: reasons, labels of people, page tokens, paths. */
const TEXT = 1024;
/** Long free text: failure messages, command arguments and environment values. */
const LONG_TEXT = 64 * 1024;

/**
 * Struct payloads (action payloads and outputs, progress details and
 * checkpoints, failure details, lease results, object bodies), each on its
 * own. Nesting and size are bounded so that no payload costs the server more
 * than a bounded walk, and every one fits a jsonb column.
 */
export const PAYLOAD_LIMITS = {
  /** Levels of objects and lists; the payload itself is level 1. */
  depth: 32,
  /** Values, keys included, across the whole payload. */
  nodes: 10_000,
  /**
   * Size as JSON text, counted in characters: the lengths of keys and strings
   * plus a few characters per value.
   */
  jsonChars: 1024 * 1024,
} as const;

/** Largest `Hello.capacity`: the most leases one worker stream may be granted at once. */
export const MAX_CAPACITY = 10_000;

/**
 * Most entries a hello's or a heartbeat's held leases may have: twice the
 * largest capacity. The only bound of a hello's list (a worker back with a
 * smaller capacity lists every lease it holds); a heartbeat's distinct leases
 * are bounded by its session too (worker-service.ts, `maxHeldLeases`).
 */
export const MAX_HELD_LEASES = 2 * MAX_CAPACITY;

/** Most messages in one ConnectRequest batch. */
export const MAX_BATCH_MESSAGES = 1024;

/** Labels and label selectors: 64 entries, keys of 128 and values of 256 characters. */
const LABELS: FieldLimit = { maxItems: 64, maxKeyLength: 128, maxLength: 256 };

/**
 * Every field whose limits differ from {@link DEFAULT_LIMITS}, by full name
 * (`package.Message.field`). A unit test checks that each name is a field.
 */
export const FIELD_LIMITS: Readonly<Record<string, FieldLimit>> = {
  // ActionService
  "leasehold.v1.SubmitActionRequest.label_selector": LABELS,
  "leasehold.v1.ListActionsRequest.page_token": { maxLength: TEXT },
  "leasehold.v1.CancelActionRequest.reason": { maxLength: TEXT },
  "leasehold.v1.CancelActionsRequest.reason": { maxLength: TEXT },
  // WorkerService
  "leasehold.v1.CompletionReport.trace_parent": { maxLength: 128 },
  // ClusterService
  "leasehold.v1.ListWorkersRequest.page_token": { maxLength: TEXT },
  "leasehold.v1.DrainWorkerRequest.reason": { maxLength: TEXT },
  "leasehold.v1.UndrainWorkerRequest.reason": { maxLength: TEXT },
  "leasehold.v1.ResumeExpiriesRequest.reason": { maxLength: TEXT },
  // EventService
  "leasehold.v1.ListEventsRequest.page_token": { maxLength: TEXT },
  // LeaseService
  "leasehold.v1.ListLeasesRequest.page_token": { maxLength: TEXT },
  // ResourceService
  "leasehold.v1.ListResourcesRequest.page_token": { maxLength: TEXT },
  "leasehold.v1.CreateFileRequest.name": { maxLength: 512 },
  "leasehold.v1.CreateFileRequest.content_type": { maxLength: 256 },
  "leasehold.v1.DeploymentSpec.containers": { maxItems: 32 },
  "leasehold.v1.DeploymentSpec.outputs_dir": { maxLength: TEXT },
  "leasehold.v1.DeploymentSpec.inputs": { maxItems: 256 },
  "leasehold.v1.FileMount.path": { maxLength: TEXT },
  "leasehold.v1.Command.argv": { maxItems: 1024, maxLength: LONG_TEXT },
  "leasehold.v1.Command.env": { maxItems: 256, maxKeyLength: 256, maxLength: LONG_TEXT },
  "leasehold.v1.Command.cwd": { maxLength: TEXT },
  "leasehold.v1.ReadinessProbe.http_get": { maxLength: 2048 },
  // WorkerService
  "leasehold.v1.ConnectRequestBatch.messages": { maxItems: MAX_BATCH_MESSAGES },
  "leasehold.v1.Hello.labels": LABELS,
  "leasehold.v1.Hello.held_leases": { maxItems: MAX_HELD_LEASES },
  "leasehold.v1.Hello.agent_version": { maxLength: 256 },
  "leasehold.v1.Heartbeat.sequence": { fullRange64: true },
  "leasehold.v1.Heartbeat.held_leases": { maxItems: MAX_HELD_LEASES },
  "leasehold.v1.GrantAck.report_id": { fullRange64: true },
  "leasehold.v1.ProgressReport.report_id": { fullRange64: true },
  "leasehold.v1.ProgressReport.phase": { maxLength: TEXT },
  "leasehold.v1.CompletionReport.report_id": { fullRange64: true },
  "leasehold.v1.ActionFailure.message": { maxLength: LONG_TEXT },
  "leasehold.v1.ReleaseReport.report_id": { fullRange64: true },
  "leasehold.v1.ReleaseReport.reason": { maxLength: TEXT },
  "leasehold.v1.Goodbye.reason": { maxLength: TEXT },
  "leasehold.v1.StopGrants.reason": { maxLength: TEXT },
};

/**
 * The characters (Unicode code points) of `s` when they are more than `max`,
 * else undefined. Limits count characters, as Python's `len` and Go's
 * `utf8.RuneCountInString` do, not UTF-16 units: an emoji is one character
 * and two units. A string of at most `max` units is never counted.
 */
export function charactersOver(s: string, max: number): number | undefined {
  if (s.length <= max) return undefined;
  let n = s.length;
  for (let i = 0; i < s.length - 1; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n--;
        i++;
      }
    }
  }
  return n > max ? n : undefined;
}
