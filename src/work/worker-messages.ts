import type { JsonObject } from "./action.js";

/**
 * The messages of a worker stream, as the lease manager sees them. The rpc
 * layer converts them to and from ConnectRequest / ConnectResponse.
 */

/** A lease as (action id, epoch): the fencing token. */
export interface LeaseToken {
  readonly actionId: string;
  readonly epoch: number;
}

/** Worker → server, after the hello. */
export type WorkerMessage =
  | { readonly type: "heartbeat"; readonly sequence: bigint; readonly held: readonly LeaseToken[] }
  | {
      readonly type: "grant_ack";
      readonly reportId: bigint;
      readonly actionId: string;
      readonly epoch: number;
    }
  | {
      readonly type: "progress";
      readonly reportId: bigint;
      readonly actionId: string;
      readonly epoch: number;
      readonly phase: string;
      readonly details?: JsonObject | undefined;
      readonly checkpoint?: JsonObject | undefined;
    }
  | {
      readonly type: "completion";
      readonly reportId: bigint;
      readonly actionId: string;
      readonly epoch: number;
      /** The agent's span for the work (W3C traceparent), if it sent one. */
      readonly traceParent?: string | undefined;
      readonly outcome:
        | { readonly kind: "succeeded"; readonly output?: JsonObject | undefined }
        | {
            readonly kind: "failed";
            readonly message: string;
            readonly retryable: boolean;
            readonly details?: JsonObject | undefined;
          };
    }
  | {
      readonly type: "release";
      readonly reportId: bigint;
      readonly actionId: string;
      readonly epoch: number;
      readonly reason: string;
      /** The worker stopped it on its self-fence (ReleaseReport.self_fenced). */
      readonly selfFenced: boolean;
    }
  | { readonly type: "goodbye"; readonly reason: string }
  /** The worker takes no more grants on this stream (it is stopping). */
  | { readonly type: "stop_grants"; readonly reason: string };

/** Why a lease is taken away from a worker. */
export type RevokeReason =
  | "EXPIRED"
  | "CANCELLED"
  | "SUPERSEDED"
  | "ROLLED_BACK"
  | "COLLECT_OUTPUTS"
  | "DRAINED";

/** Why a report was not applied. */
export type RejectReason = "FENCED" | "INVALID" | "NOT_FOUND" | "UNAVAILABLE";

/** Server → worker. */
export type ServerMessage =
  | {
      readonly type: "welcome";
      readonly sessionId: string;
      readonly heartbeatIntervalMs: number;
      readonly gracePeriodMs: number;
      readonly resumed: readonly LeaseToken[];
      readonly revoked: readonly LeaseToken[];
      readonly sessionResumed: boolean;
      readonly serverId: string;
    }
  | {
      readonly type: "grant";
      readonly actionId: string;
      readonly epoch: number;
      readonly attempt: number;
      readonly payload: JsonObject | null;
      readonly runId: string;
      readonly checkpoint: JsonObject | null;
      /** W3C traceparent of the grant's span (tracing on, action traced). */
      readonly traceParent?: string | undefined;
    }
  | {
      readonly type: "heartbeat_ack";
      readonly sequence: bigint;
      readonly remainingMs: number;
      /** This process cannot reach its database (HeartbeatAck.database_unreachable). */
      readonly databaseUnreachable: boolean;
    }
  | {
      readonly type: "revoke";
      readonly actionId: string;
      readonly epoch: number;
      readonly reason: RevokeReason;
      readonly message: string;
    }
  | {
      readonly type: "report_result";
      readonly reportId: bigint;
      readonly actionId: string;
      readonly epoch: number;
      readonly accepted: boolean;
      readonly rejectReason?: RejectReason | undefined;
      readonly message: string;
    }
  | { readonly type: "drain"; readonly reason: string };

/** How the lease manager talks to one open stream. */
export interface WorkerLink {
  /** Queues a message to the worker. */
  send(message: ServerMessage): void;
  /** Ends the stream from the server side, with an error status if given. */
  close(error?: Error): void;
  /**
   * Bytes sent and not yet taken by the transport (the worker reads slowly or
   * not at all). Grants wait while it is at the high-water mark.
   */
  bufferedBytes(): number;
  /**
   * Stops (true) or resumes reading the worker's messages, for the lease
   * manager's own reason (too many of its reports unanswered); unlike a
   * worker that does not read, this never ends the stream.
   */
  throttle(on: boolean): void;
}
