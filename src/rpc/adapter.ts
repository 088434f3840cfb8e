import { constants as http2 } from "node:http2";
import { setImmediate as nextTurn } from "node:timers/promises";
import {
  create,
  type DescMessage,
  type DescMethod,
  type DescService,
  fromBinary,
  type MessageInitShape,
  type MessageShape,
  toBinary,
} from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import type * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { type Access, OPEN_ACCESS, permissionDenied } from "../auth/access.js";
import { Code, LeaseholdError } from "../errors.js";
import type { Authenticator, CallCredentials } from "./authenticator.js";
import type { CallAuthorization } from "./call-authorization.js";
import { callerOf } from "./fair-queue.js";
import type { LargeCallLimit } from "./large-calls.js";
import { METHOD_RIGHTS } from "./method-rights.js";
import { RejectedRequest, requestDecoder } from "./request-decoder.js";
import { toStatusObject } from "./status.js";
import type { StreamRegistry } from "./stream-registry.js";
import type { UnaryCallLimit } from "./unary-calls.js";
import type { UnsentAnswerLimit } from "./unsent-answers.js";

/** What every handler gets besides its request. */
export interface HandlerContext {
  /** Aborts when the client cancels, the deadline passes, or the call ends. */
  readonly signal: AbortSignal;
  /** The client's deadline, if it set one. */
  readonly deadline: Date | undefined;
  /** The client's address. */
  readonly peer: string;
  /** The request metadata (headers). */
  readonly metadata: grpc.Metadata;
  /**
   * What the caller may do, and the actor recorded on what it changes. The
   * adapter has checked the method's right already; handlers check the
   * cluster (and owner) of what the call touches.
   */
  readonly access: Access;
  /** Bytes of a unary call's request as it arrived; 0 for streams. */
  readonly requestBytes: number;
}

/** A bidirectional stream as a handler sees it. */
export interface BidiStream<I extends DescMessage, O extends DescMessage> {
  /**
   * The client's messages, in order; ends when the client half-closes (after
   * every message it sent before), the call ends, or `stop()`.
   */
  readonly requests: AsyncIterable<MessageShape<I>>;
  /**
   * The rest of the client's messages, pushed to `handler` as they arrive
   * (those already waiting first), instead of read from `requests`: no
   * promise per message, for streams that carry many small messages and
   * handle each synchronously. Resolves when the requests end as `requests`
   * would; rejects with the error of a message that failed decoding or
   * validation, or with what `handler` throws (the requests end then too).
   * Do not read `requests` once this is called.
   */
  consume(handler: (message: MessageShape<I>) => void): Promise<void>;
  /** Queues one message to the client; false means the transport buffer is full. */
  send(message: MessageInitShape<O>): boolean;
  /**
   * Queues one message the handler encoded itself (the binary form of an
   * `O`), e.g. a hot message encoded without building its object; counted in
   * `bufferedBytes` like `send`.
   */
  sendBinary(bytes: Uint8Array): boolean;
  /** Ends `requests` now (a pending read resolves as done), e.g. when the server closes the stream. */
  stop(): void;
  /**
   * The client half-closed its side: once `requests` ended, every message it
   * sent was handed over (a cancel, the call's end or `stop()` drop what is
   * still unread, and leave this as it was).
   */
  readonly halfClosed: boolean;
  /**
   * Serialized bytes of sent messages that the transport has not taken yet:
   * what a client that stops reading makes this process hold (HTTP/2 flow
   * control stops the transport once the client's window is full).
   */
  readonly bufferedBytes: number;
  /**
   * Nothing is read from the client now: too many sent messages wait for the
   * transport (see {@link READ_PAUSE_MESSAGES}).
   */
  readonly readingHeld: boolean;
  /**
   * While on, nothing more is read from the client, for the handler's own
   * reason (too much of what the client sent is still unanswered). Unlike
   * the hold for unread answers, this says nothing of the client:
   * `readingHeld` stays false.
   */
  throttle(on: boolean): void;
  /** Calls `listener` each time the transport takes a message (`bufferedBytes` shrank). Returns its off. */
  onFlushed(listener: () => void): () => void;
  /**
   * Ends the call at once with RESOURCE_EXHAUSTED and drops what is buffered
   * (a status sent the ordinary way would wait behind the buffered messages
   * forever when the client does not read). Ends `requests` too.
   */
  reset(): void;
}

/** Past this many unread messages the call is paused until the handler catches up. */
const HIGH_WATER = 64;

/**
 * A bidi stream reads nothing more from its client while this many of its
 * own messages, or {@link READ_PAUSE_BYTES}, wait for the transport: a client
 * that sends but does not read is held back by HTTP/2 flow control instead
 * of making the server answer into a growing buffer (a heartbeat flood made
 * a million tiny acks: 350 MB, and a 10 s stall of the whole process to
 * drop them). Reading goes on once a quarter of each is left.
 */
export const READ_PAUSE_MESSAGES = 1024;
/** See {@link READ_PAUSE_MESSAGES}. */
export const READ_PAUSE_BYTES = 1024 * 1024;

/**
 * The client's messages as an async iterable that can be ended from the
 * server side. Built on 'data' events with one pending read at a time, so a
 * stream that lives for days allocates nothing per message beyond the
 * message itself (racing each read against a "stop" promise would leak a
 * reaction per message). A message that failed decoding or validation
 * (a {@link RejectedRequest}) makes its read reject with the rejection's
 * error, in order, and ends the iterable: unless the handler catches it, the
 * stream ends with that status. A half-close ends the iterable only once
 * the messages that came before it are read: a worker that sends its hello
 * and a report in one write and half-closes gets both handled, as it would
 * without the half-close. A cancel or an error of the call, or `stop()`,
 * drops what is unread.
 */
function requestQueue<T>(call: grpc.ServerDuplexStream<T | RejectedRequest, unknown>): {
  iterable: AsyncIterable<T>;
  consume(handler: (message: T) => void): Promise<void>;
  stop(): void;
  /** While on, nothing more is read from the client (the server's answers are backed up). */
  hold(on: boolean): void;
  /** While on, nothing more is read from the client (the handler's own reason; not `held`). */
  throttle(on: boolean): void;
  readonly held: () => boolean;
  /** The client half-closed (see {@link BidiStream.halfClosed}). */
  readonly halfClosed: () => boolean;
} {
  const buffer: (T | RejectedRequest)[] = [];
  let pending: ((result: IteratorResult<T>) => void) | undefined;
  let pendingReject: ((error: unknown) => void) | undefined;
  let done = false;
  /** The client half-closed: what is in `buffer` is still handed over, then the requests end. */
  let halfClosed = false;
  /** Set by `consume`: messages go straight to it. */
  let consumer: ((message: T) => void) | undefined;
  /** `buffer` passed HIGH_WATER and has not drained to a quarter of it yet. */
  let unread = false;
  /** The server holds reading back (see `hold`). */
  let held = false;
  /** The handler holds reading back (see `throttle`). */
  let throttled = false;
  /** The call is paused: for any of the reasons above. */
  let paused = false;
  const sync = () => {
    const pause = (unread || held || throttled) && !done;
    if (pause === paused) return;
    paused = pause;
    if (pause) call.pause();
    else call.resume();
  };
  let consumed: { resolve(): void; reject(error: unknown): void } | undefined;
  const finish = () => {
    done = true;
    buffer.length = 0;
    const resolve = pending;
    pending = undefined;
    pendingReject = undefined;
    resolve?.({ done: true, value: undefined });
    const end = consumed;
    consumed = undefined;
    end?.resolve();
  };
  /** Hands one message to the consumer; a rejected message or a throw ends the requests with that error. */
  const deliver = (message: T | RejectedRequest) => {
    let error: unknown;
    if (message instanceof RejectedRequest) error = message.error;
    else {
      try {
        (consumer as (message: T) => void)(message);
        return;
      } catch (thrown) {
        error = thrown;
      }
    }
    const end = consumed;
    consumed = undefined;
    finish();
    end?.reject(error);
  };
  call.on("data", (message: T | RejectedRequest) => {
    if (done) return;
    if (consumer) {
      deliver(message);
      return;
    }
    if (pending) {
      const resolve = pending;
      const reject = pendingReject;
      pending = undefined;
      pendingReject = undefined;
      if (message instanceof RejectedRequest) {
        finish();
        reject?.(message.error);
      } else resolve({ done: false, value: message });
      return;
    }
    buffer.push(message);
    if (buffer.length >= HIGH_WATER && !unread) {
      unread = true;
      sync();
    }
  });
  call.on("end", () => {
    if (done) return;
    halfClosed = true;
    // A pending read or a consumer means nothing is buffered; else the last read ends it.
    if (buffer.length === 0) finish();
  });
  call.on("error", finish);
  call.on("cancelled", finish);
  const iterator: AsyncIterator<T> = {
    next() {
      if (buffer.length > 0) {
        const value = buffer.shift() as T | RejectedRequest;
        if (value instanceof RejectedRequest) {
          finish();
          return Promise.reject(value.error);
        }
        if (unread && buffer.length <= HIGH_WATER / 4) {
          unread = false;
          sync();
        }
        return Promise.resolve({ done: false, value });
      }
      if (halfClosed) finish();
      if (done) return Promise.resolve({ done: true, value: undefined });
      return new Promise((resolve, reject) => {
        pending = resolve;
        pendingReject = reject;
      });
    },
    return() {
      finish();
      return Promise.resolve({ done: true, value: undefined });
    },
  };
  const consume = (handler: (message: T) => void) =>
    new Promise<void>((resolve, reject) => {
      if (done) {
        resolve();
        return;
      }
      consumer = handler;
      consumed = { resolve, reject };
      while (buffer.length > 0 && !done) deliver(buffer.shift() as T | RejectedRequest);
      if (halfClosed) finish();
      if (unread && !done) {
        unread = false;
        sync();
      }
    });
  const hold = (on: boolean) => {
    if (held === on) return;
    held = on;
    sync();
  };
  return {
    iterable: { [Symbol.asyncIterator]: () => iterator },
    consume,
    stop: finish,
    hold,
    throttle(on) {
      if (throttled === on) return;
      throttled = on;
      sync();
    },
    held: () => held,
    halfClosed: () => halfClosed,
  };
}

type Input<M> = M extends { input: infer I extends DescMessage } ? I : never;
type Output<M> = M extends { output: infer O extends DescMessage } ? O : never;

/**
 * A unary answer a hot path encoded itself (`rpc/wire.ts`), exactly the bytes
 * `toBinary` would give for it: sent as it is, not built into a message and
 * encoded again. The console's Connect routes decode it.
 */
export class EncodedResponse {
  constructor(readonly bytes: Buffer) {}
}

/** The handler type of one method, by its kind. */
export type MethodImpl<M> = M extends { methodKind: "unary" }
  ? (
      request: MessageShape<Input<M>>,
      ctx: HandlerContext,
    ) => Promise<MessageInitShape<Output<M>> | EncodedResponse>
  : M extends { methodKind: "server_streaming" }
    ? (request: MessageShape<Input<M>>, ctx: HandlerContext) => AsyncIterable<MessageInitShape<Output<M>>>
    : M extends { methodKind: "bidi_streaming" }
      ? (stream: BidiStream<Input<M>, Output<M>>, ctx: HandlerContext) => Promise<void>
      : never;

/**
 * A service implementation keyed by method localName. Methods left out answer
 * UNIMPLEMENTED with a message that says so.
 */
export type ServiceImpl<S extends GenServiceMethods> = { [K in keyof S]?: MethodImpl<S[K]> };

/** `message` in the binary format, as a Buffer over the same bytes. */
export function encodeMessage(desc: DescMessage, message: MessageShape<DescMessage>): Buffer {
  const bytes = toBinary(desc, message);
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

// Already a Buffer: a bidi stream's `send` (to count the bytes it buffers) or a client's
// request (see rpc/client.ts) was serialized before grpc-js saw it. No message is a Buffer.
const encoder = (desc: DescMessage) => (value: unknown) =>
  Buffer.isBuffer(value) ? value : encodeMessage(desc, value as MessageShape<DescMessage>);
const decoder = (desc: DescMessage) => (bytes: Buffer) => fromBinary(desc, bytes);

/** A codec that hands the bytes on: the message is decoded later, by our code. */
export const keepBytes = (bytes: Buffer): Buffer => bytes;

/**
 * Decoders tried before the ordinary one for a method's requests (each
 * message of a stream, or a unary call's request), by method (`localName`):
 * each gives the decoded message for the byte patterns it knows (exactly what
 * `fromBinary` gives, and nothing the request validator refuses), and
 * undefined for everything else.
 */
export type FastDecoders = Readonly<Record<string, (bytes: Buffer) => object | undefined>>;

/**
 * The grpc-js ServiceDefinition of a protobuf-es service: paths, stream flags
 * and binary codecs all come from the descriptor. Requests are decoded and
 * validated in one step (`requestDecoder`): every request of every method,
 * each message of a stream included, is checked against `limits.ts` before a
 * handler sees it, and a bad one arrives as a {@link RejectedRequest}. A
 * unary request reaches grpc-js's handler as bytes and is decoded by
 * `unaryHandler`: grpc-js keeps what its deserializer returns until the call
 * ends, and a bulk submit's 1,000 decoded items, kept that long, were copied
 * by every young-generation collection while the insert ran.
 */
export function createServiceDefinition(
  service: DescService,
  fastDecoders: FastDecoders = {},
): grpc.ServiceDefinition {
  const definition: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const method of service.methods) {
    const kind = method.methodKind;
    definition[method.localName] = {
      path: `/${service.typeName}/${method.name}`,
      requestStream: kind === "client_streaming" || kind === "bidi_streaming",
      responseStream: kind === "server_streaming" || kind === "bidi_streaming",
      requestSerialize: encoder(method.input),
      requestDeserialize:
        kind === "unary" ? keepBytes : streamDecoder(method.input, fastDecoders[method.localName]),
      responseSerialize: encoder(method.output),
      responseDeserialize: decoder(method.output),
      originalName: method.name,
    };
  }
  return definition;
}

/** The deserializer of a stream's messages: `fast` first, if the method has one. */
function streamDecoder(
  desc: DescMessage,
  fast: ((bytes: Buffer) => object | undefined) | undefined,
): (bytes: Buffer) => unknown {
  const decode = requestDecoder(desc);
  return fast ? (bytes) => fast(bytes) ?? decode(bytes) : decode;
}

interface CallLike extends CallCredentials {
  getDeadline(): grpc.Deadline;
  getPeer(): string;
  metadata: grpc.Metadata;
  on(event: "cancelled", listener: () => void): unknown;
  off(event: "cancelled", listener: () => void): unknown;
}

/**
 * Listeners of each shutdown signal, called by one listener of its own.
 * EventTarget's addEventListener walks the listeners already added (to skip
 * duplicates), so one per call made every new stream slower than the last:
 * with 10,000 streams open, most of a hello's time.
 */
const shutdownListeners = new WeakMap<AbortSignal, Set<() => void>>();

/** Calls `fn` when `signal` aborts; returns the function that forgets it. */
function onShutdownOf(signal: AbortSignal, fn: () => void): () => void {
  let listeners = shutdownListeners.get(signal);
  if (!listeners) {
    const set = new Set<() => void>();
    signal.addEventListener("abort", () => {
      for (const f of [...set]) f();
    });
    shutdownListeners.set(signal, set);
    listeners = set;
  }
  const own = listeners;
  own.add(fn);
  return () => own.delete(fn);
}

/**
 * A context whose signal follows the call and the server's shutdown; `done()`
 * releases its timer and listeners.
 */
function createContext(
  call: CallLike,
  shutdown: AbortSignal,
): HandlerContext & { access: Access; requestBytes: number; done(): void; end(reason: unknown): void } {
  const controller = new AbortController();
  const onCancelled = () =>
    controller.abort(new LeaseholdError(Code.Canceled, "the client cancelled the call"));
  const onShutdown = () => controller.abort(shutdown.reason);
  call.on("cancelled", onCancelled);
  const forgetShutdown = onShutdownOf(shutdown, onShutdown);
  const rawDeadline = call.getDeadline();
  const deadlineMs = rawDeadline instanceof Date ? rawDeadline.getTime() : rawDeadline;
  let timer: NodeJS.Timeout | undefined;
  let deadline: Date | undefined;
  if (Number.isFinite(deadlineMs)) {
    deadline = new Date(deadlineMs);
    const passed = () =>
      controller.abort(new LeaseholdError(Code.DeadlineExceeded, "the call's deadline passed"));
    // Passed as it arrived (a deadline of a microsecond, or spent in transit): aborted now, so
    // that a unary handler is never started for it (see unaryHandler).
    if (deadlineMs <= Date.now()) passed();
    // setTimeout takes at most 2^31-1 ms; longer deadlines never fire in practice.
    else timer = setTimeout(passed, Math.min(deadlineMs - Date.now(), 2 ** 31 - 1));
  }
  return {
    signal: controller.signal,
    deadline,
    peer: call.getPeer(),
    metadata: call.metadata,
    access: OPEN_ACCESS,
    requestBytes: 0,
    /** Aborts the signal with `reason`: the handler stops as if its client had gone. */
    end(reason) {
      controller.abort(reason);
    },
    done() {
      clearTimeout(timer);
      call.off("cancelled", onCancelled);
      forgetShutdown();
      if (!controller.signal.aborted) controller.abort(new LeaseholdError(Code.Canceled, "the call ended"));
    },
  };
}

/**
 * A server stream's handler is asked for its next message only while less
 * than this many bytes of its earlier ones wait for the transport (and
 * grpc-js's buffer of 16 messages is not full): a client that does not read
 * holds the handler at its `yield`, so what the server keeps for it stays
 * small. For DownloadFile's 64 KiB chunks that is two: the one HTTP/2 is
 * sending and the one behind it (16 of them, grpc-js's own limit, made a
 * MiB per stream that nobody reads).
 */
export const SERVER_STREAM_AHEAD_BYTES = 128 * 1024;

/**
 * The writes of a server stream, counted until HTTP/2 takes them: `room`
 * resolves once the handler may give its next message (see
 * {@link SERVER_STREAM_AHEAD_BYTES}), or the call ends.
 */
function serverWrites(call: grpc.ServerWritableStream<unknown, unknown>, signal: AbortSignal) {
  let bytes = 0;
  let wake: (() => void) | undefined;
  const full = () => call.writableNeedDrain || bytes >= SERVER_STREAM_AHEAD_BYTES;
  return {
    write(message: Buffer): void {
      bytes += message.length;
      // The callback runs once HTTP/2 took the message; 'drain', if it was due, came just before it.
      call.write(message, () => {
        bytes -= message.length;
        wake?.();
      });
    },
    async room(): Promise<void> {
      while (full() && !signal.aborted) {
        await new Promise<void>((resolve) => {
          const done = () => {
            wake = undefined;
            signal.removeEventListener("abort", done);
            resolve();
          };
          wake = done;
          signal.addEventListener("abort", done);
        });
      }
    },
  };
}

function unimplemented(method: DescMethod): () => never {
  return () => {
    throw new LeaseholdError(
      Code.Unimplemented,
      `${method.parent.typeName}.${method.name} is not implemented by this server yet`,
      { reason: "NOT_IMPLEMENTED" },
    );
  };
}

/**
 * Wraps a typed implementation into grpc-js handlers. Every handler runs
 * inside try/catch: grpc-js only catches synchronous throws, so a rejected
 * promise would otherwise never answer the call. Errors become statuses in
 * one place (`toStatusObject`).
 */
export function createServiceHandlers<S extends GenServiceMethods>(
  service: GenService<S>,
  impl: ServiceImpl<S>,
  deps: HandlerDeps,
  fastDecoders: FastDecoders = {},
): grpc.UntypedServiceImplementation {
  const handlers: grpc.UntypedServiceImplementation = {};
  for (const method of service.methods) {
    const path = `${service.typeName}/${method.name}`;
    const fn: unknown = (impl as Record<string, unknown>)[method.localName] ?? unimplemented(method);
    if (method.methodKind === "client_streaming") {
      throw new Error(`client-streaming method ${path} is not supported by the adapter`);
    }
    const calls = deps.calls?.method(method.methodKind, service.typeName, method.name) ?? UNOBSERVED;
    switch (method.methodKind) {
      case "unary":
        handlers[method.localName] = unaryHandler(
          method,
          fn as UnaryFn,
          // Only the calls that wait long are checked again while they run: the rest are over
          // within their own moments.
          UNLIMITED_UNARY.has(path) ? { ...deps, unaryCalls: undefined } : { ...deps, streams: undefined },
          path,
          calls,
          fastDecoders[method.localName],
        );
        break;
      case "server_streaming":
        handlers[method.localName] = serverStreamHandler(method, fn as ServerStreamFn, deps, path, calls);
        break;
      case "bidi_streaming":
        handlers[method.localName] = bidiHandler(method, fn as BidiFn, deps, path, calls);
        break;
    }
  }
  return handlers;
}

/** The kinds of call the adapter serves. */
export type CallKind = "unary" | "server_streaming" | "bidi_streaming";

/** Counts calls (the metrics); asked once per method for the recorder of its calls. */
export interface CallObserver {
  method(kind: CallKind, service: string, method: string): MethodCalls;
}

/** Records the calls of one method: each start, and each end with its status code. */
export interface MethodCalls {
  started(): void;
  ended(code: number, seconds: number): void;
}

const UNOBSERVED: MethodCalls = { started() {}, ended() {} };

/** The status code of a call that succeeded (`Code` names only failures). */
const OK = 0;

/** What the wrapped handlers need from the server. */
export interface HandlerDeps {
  readonly log: Logger;
  /**
   * Aborted when the server shuts down: every handler's signal aborts, and
   * open streams end with this signal's reason (UNAVAILABLE) so that clients
   * reconnect elsewhere.
   */
  readonly shutdown: AbortSignal;
  /**
   * Authentication; without it every call gets {@link OPEN_ACCESS} (no
   * credentials configured).
   */
  readonly authenticator?: Authenticator | undefined;
  /**
   * The calls authorized as they started, before their request was read
   * (call-authorization.ts); a call it did not see is authorized by its
   * handler.
   */
  readonly authorization?: Pick<CallAuthorization, "accessOf"> | undefined;
  /** Logs one refused call (UNAUTHENTICATED or PERMISSION_DENIED). */
  readonly onRefused?: ((refusal: Refusal) => void) | undefined;
  /** Counts every call and its status; none: nothing is counted. */
  readonly calls?: CallObserver | undefined;
  /** Turns for large unary requests (large-calls.ts); none: every call runs at once. */
  readonly largeCalls?: LargeCallLimit | undefined;
  /**
   * The budget of unary answers not yet sent (unsent-answers.ts); none: not
   * bounded. (Open calls per address are counted before the handler, by
   * callsPerAddressInterceptor.)
   */
  readonly answers?: Pick<UnsentAnswerLimit, "hold"> | undefined;
  /** Unary calls served at once by the process (unary-calls.ts); none: no limit. */
  readonly unaryCalls?: UnaryCallLimit | undefined;
  /**
   * Open streams (and unary calls that wait long), checked again when the
   * credentials are reloaded or the one a call opened with expires
   * (stream-registry.ts); none: checked once, when they open.
   */
  readonly streams?: Pick<StreamRegistry, "open"> | undefined;
}

/** A call refused for want of credentials or rights, as the log line names it. */
export interface Refusal {
  readonly principal: string;
  readonly method: string;
  readonly code: Code;
  readonly reason: string;
  readonly message: string;
  readonly peer: string;
}

/**
 * The caller's access, checked against the method's right: UNAUTHENTICATED
 * without valid credentials, PERMISSION_DENIED when the principal holds the
 * method's right in no cluster. Runs before the request is read (see
 * call-authorization.ts), so an anonymous caller learns nothing from the
 * shape of its request, and makes the server hold none of it. Throws, or
 * returns the access at once when the credential's check was cached.
 */
export function authorize(
  call: CallCredentials,
  deps: Pick<HandlerDeps, "authenticator">,
  path: string,
): Access | Promise<Access> {
  if (!deps.authenticator) return OPEN_ACCESS;
  const access = deps.authenticator.authenticate(call);
  return access instanceof Promise
    ? access.then((a) => withMethodRight(a, path))
    : withMethodRight(access, path);
}

/**
 * Passes `access` on when it holds the right of the method at `path` in some
 * cluster; PERMISSION_DENIED naming the right otherwise.
 */
export function withMethodRight(access: Access, path: string): Access {
  const right = METHOD_RIGHTS[path];
  if (right === undefined) throw permissionDenied(access.actor, `to call ${path}`, "(no right grants it)");
  const rights = typeof right === "string" ? [right] : right;
  if (!rights.some((r) => access.holdsAnywhere(r)))
    throw permissionDenied(access.actor, rights.join(" or "), "in any cluster");
  return access;
}

/**
 * The access given to the call when it started (`HandlerDeps.authorization`),
 * else its authorization now.
 */
function accessOfCall(call: CallLike, deps: HandlerDeps, path: string): Access | Promise<Access> {
  return deps.authorization?.accessOf(call.metadata) ?? authorize(call, deps, path);
}

/** A call's registration in `HandlerDeps.streams`: why it was ended, if it was. */
interface Watched {
  /** Set when the registry ended the call: its status, whatever the handler did after. */
  error: LeaseholdError | undefined;
  /** Forgets the call (when it ends). */
  close(): void;
}

/**
 * Registers a long-lived call in `deps.streams`, when credentials are
 * checked: the access its handler is to use (recording what it checks), and
 * the registration. Ending it aborts the handler's signal (for a worker
 * stream, as a lost stream: its session enters grace), and the call ends
 * with the registry's error.
 */
function watchCredentials(
  deps: HandlerDeps,
  call: CallCredentials,
  path: string,
  access: Access,
  ctx: { end(reason: unknown): void },
): { access: Access; watched: Watched } {
  if (!deps.streams || !access.enforced) return { access, watched: UNWATCHED };
  const watched: Watched = { error: undefined, close: () => {} };
  const open = deps.streams.open({
    credentials: call,
    path,
    access,
    end(error) {
      watched.error ??= error;
      ctx.end(error);
    },
  });
  watched.close = open.close;
  return { access: open.access, watched };
}

/** The registration of a call not tracked (never ended by the registry): shared. */
const UNWATCHED: Watched = Object.freeze({ error: undefined, close: () => {} });

/** The status of a failed call; refusals are reported to `onRefused` first. */
function failure(
  error: unknown,
  deps: HandlerDeps,
  path: string,
  call: CallLike,
  access: Access | undefined,
) {
  reportRefusal(error, deps.onRefused, { path, peer: call.getPeer(), access });
  return toStatusObject(error, deps.log, path);
}

/** Passes an UNAUTHENTICATED or PERMISSION_DENIED error to `onRefused`; other errors are not refusals. */
export function reportRefusal(
  error: unknown,
  onRefused: ((refusal: Refusal) => void) | undefined,
  call: { readonly path: string; readonly peer: string; readonly access: Access | undefined },
): void {
  if (
    onRefused &&
    error instanceof LeaseholdError &&
    (error.code === Code.Unauthenticated || error.code === Code.PermissionDenied)
  ) {
    onRefused({
      principal: call.access?.actor ?? error.metadata.principal ?? "",
      method: call.path,
      code: error.code,
      reason: error.reason ?? "",
      message: error.message,
      peer: call.peer,
    });
  }
}

/** How a stream ends: OK, or the shutdown's status if the server is going away. */
function endStream(
  call: { emit(event: "error", status: grpc.StatusObject): unknown; end(): unknown },
  deps: HandlerDeps,
  path: string,
): number {
  if (!deps.shutdown.aborted) {
    call.end();
    return OK;
  }
  const status = toStatusObject(deps.shutdown.reason, deps.log, path);
  call.emit("error", status);
  return status.code;
}

/** The code a stream ended with: CANCELLED when its client went away first. */
const endedWith = (call: { readonly cancelled: boolean }, code: number) =>
  call.cancelled ? Code.Canceled : code;

/** Seconds since `start` (a `performance.now()`). */
const since = (start: number) => (performance.now() - start) / 1000;

type UnaryFn = (request: unknown, ctx: HandlerContext) => Promise<unknown>;
type ServerStreamFn = (request: unknown, ctx: HandlerContext) => AsyncIterable<unknown>;
type BidiFn = (stream: BidiStream<DescMessage, DescMessage>, ctx: HandlerContext) => Promise<void>;

function unaryHandler(
  method: DescMethod,
  fn: UnaryFn,
  deps: HandlerDeps,
  path: string,
  calls: MethodCalls,
  fast: ((bytes: Buffer) => object | undefined) | undefined,
): grpc.handleUnaryCall<unknown, unknown> {
  const decode = requestDecoder(method.input);
  return (call, callback) => {
    const start = performance.now();
    calls.started();
    const ctx = createContext(call, deps.shutdown);
    let access: Access | undefined;
    let watched = UNWATCHED;
    let turnEnded = NO_TURN;
    let slotEnded = NO_TURN;
    (async () => {
      access = await accessOfCall(call, deps, path);
      ({ access: ctx.access, watched } = watchCredentials(deps, call, path, access, ctx));
      // A request grpc-js could not frame (message-push.ts: refuseMalformedFraming).
      if (call.request instanceof RejectedRequest) throw call.request.error;
      const bytes = call.request as Buffer;
      ctx.requestBytes = bytes.length;
      // Whose turn a waiting call takes: its principal, or its address without authentication.
      const caller = callerOf(access, call.getPeer(), path);
      if (deps.largeCalls) {
        const turn = deps.largeCalls.admit(bytes.length, ctx.signal, caller);
        turnEnded = typeof turn === "function" ? turn : await turn;
      }
      const request = fast?.(bytes) ?? decode(bytes);
      if (request instanceof RejectedRequest) throw request.error;
      // The handler starts on the next turn of the event loop. grpc-js hands a request on while
      // Node is still reading the network chunk it came in, before the frames behind it: a client
      // that sent HEADERS, DATA and RST_STREAM together (a "rapid reset") had its call run in full,
      // its cancel seen only once the handler had started. By the next turn the whole chunk has been
      // read. (Decoding a large request took a turn of its own, and heartbeats go first.)
      await nextTurn();
      // Its deadline passed, or its client cancelled, before it was served (in transit, or while it
      // waited its turn): not started, so the answer can say that nothing was done. A client that
      // retries without a request_id then makes no duplicate.
      if (ctx.signal.aborted) throw unserved(ctx.signal.reason);
      if (deps.unaryCalls) {
        const turn = deps.unaryCalls.admit(ctx.signal, caller);
        if (turn instanceof LeaseholdError) throw turn;
        slotEnded =
          typeof turn === "function"
            ? turn
            : await turn.catch((reason: unknown) => Promise.reject(unserved(reason)));
        // Its client went away while it waited.
        if (ctx.signal.aborted) throw unserved(ctx.signal.reason);
      }
      const response = await fn(request, ctx);
      if (watched.error) throw watched.error;
      // Encoded here to be counted until it is sent; a Buffer passes the response serializer as it is.
      const answer =
        response instanceof EncodedResponse
          ? response.bytes
          : encodeMessage(method.output, create(method.output, response as MessageInitShape<DescMessage>));
      const overBudget = deps.answers?.hold(call.metadata, answer.length);
      if (overBudget) throw overBudget;
      return answer;
    })()
      .then(
        (response) => {
          calls.ended(OK, since(start));
          callback(null, response);
        },
        (error: unknown) => {
          const status = failure(watched.error ?? error, deps, path, call, access);
          calls.ended(status.code, since(start));
          callback(status);
        },
      )
      .finally(() => {
        watched.close();
        turnEnded();
        slotEnded();
        ctx.done();
      });
  };
}

const NO_TURN = () => {};

/**
 * Unary methods that do not count against the process's unary calls
 * (unary-calls.ts): they spend their time waiting, not working, and would
 * hold turns other calls need. CollectOutputs waits up to an hour for a
 * deployment to save its files.
 */
const UNLIMITED_UNARY: ReadonlySet<string> = new Set(["leasehold.v1.LeaseService/CollectOutputs"]);

/** Why a unary call was not started: its deadline or its client's cancel, saying nothing was done. */
function unserved(reason: unknown): unknown {
  if (!(reason instanceof LeaseholdError)) return reason;
  if (reason.code === Code.DeadlineExceeded)
    return new LeaseholdError(
      Code.DeadlineExceeded,
      "the call's deadline passed before it was served: nothing was done; retry with a longer deadline",
      { reason: "DEADLINE_PASSED_UNSERVED" },
    );
  if (reason.code === Code.Canceled)
    return new LeaseholdError(
      Code.Canceled,
      "the client cancelled the call before it was served: nothing was done",
    );
  return reason;
}

function serverStreamHandler(
  method: DescMethod,
  fn: ServerStreamFn,
  deps: HandlerDeps,
  path: string,
  calls: MethodCalls,
): grpc.handleServerStreamingCall<unknown, unknown> {
  return (call) => {
    const start = performance.now();
    calls.started();
    const ctx = createContext(call, deps.shutdown);
    let access: Access | undefined;
    let watched = UNWATCHED;
    (async () => {
      access = await accessOfCall(call, deps, path);
      if (call.request instanceof RejectedRequest) throw call.request.error;
      ({ access: ctx.access, watched } = watchCredentials(deps, call, path, access, ctx));
      const writes = serverWrites(call, ctx.signal);
      for await (const message of fn(call.request, ctx)) {
        if (ctx.signal.aborted) break;
        // Encoded here to be counted; a Buffer passes the response serializer as it is.
        writes.write(
          encodeMessage(method.output, create(method.output, message as MessageInitShape<DescMessage>)),
        );
        await writes.room();
        if (ctx.signal.aborted) break;
      }
      if (watched.error) throw watched.error;
    })()
      .then(
        () => calls.ended(endedWith(call, endStream(call, deps, path)), since(start)),
        (error: unknown) => {
          const status = failure(watched.error ?? error, deps, path, call, access);
          calls.ended(status.code, since(start));
          call.emit("error", status);
        },
      )
      .finally(() => {
        watched.close();
        ctx.done();
      });
  };
}

function bidiHandler(
  method: DescMethod,
  fn: BidiFn,
  deps: HandlerDeps,
  path: string,
  calls: MethodCalls,
): grpc.handleBidiStreamingCall<unknown, unknown> {
  return (call) => {
    const start = performance.now();
    calls.started();
    const ctx = createContext(call, deps.shutdown);
    const queue = requestQueue(call as grpc.ServerDuplexStream<MessageShape<DescMessage>, unknown>);
    const encode = encoder(method.output);
    const flushed = new Set<() => void>();
    let bufferedBytes = 0;
    let bufferedMessages = 0;
    let reset = false;
    const write = (bytes: Buffer) => {
      bufferedBytes += bytes.length;
      if (++bufferedMessages >= READ_PAUSE_MESSAGES || bufferedBytes >= READ_PAUSE_BYTES) queue.hold(true);
      // The callback runs once HTTP/2 took the message (or the call failed).
      return call.write(bytes, () => {
        bufferedBytes -= bytes.length;
        bufferedMessages--;
        if (bufferedMessages <= READ_PAUSE_MESSAGES / 4 && bufferedBytes <= READ_PAUSE_BYTES / 4) {
          queue.hold(false);
        }
        for (const listener of flushed) listener();
      });
    };
    const stream: BidiStream<DescMessage, DescMessage> = {
      requests: queue.iterable,
      consume: queue.consume,
      send: (message) => write(encode(create(method.output, message))),
      sendBinary: (bytes) =>
        write(Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)),
      stop: queue.stop,
      get halfClosed() {
        return queue.halfClosed();
      },
      get bufferedBytes() {
        return bufferedBytes;
      },
      get readingHeld() {
        return queue.held();
      },
      throttle: queue.throttle,
      onFlushed(listener) {
        flushed.add(listener);
        return () => flushed.delete(listener);
      },
      reset() {
        if (reset) return;
        reset = true;
        queue.stop();
        flushed.clear();
        // grpc-js has no public way to reset a server stream with a code: its
        // HTTP/2 stream is reached through the call's internals, checked here.
        // ENHANCE_YOUR_CALM reaches grpc-js clients as RESOURCE_EXHAUSTED.
        const h2 = (call as unknown as { call?: { stream?: { close?: unknown } } }).call?.stream;
        if (typeof h2?.close === "function") h2.close(http2.NGHTTP2_ENHANCE_YOUR_CALM);
        else deps.log.warn({ path }, "could not reset a stream; it ends when its client goes");
        // Frees the buffered messages now.
        call.destroy();
      },
    };
    ctx.signal.addEventListener("abort", queue.stop, { once: true });
    let access: Access | undefined;
    let watched = UNWATCHED;
    (async () => {
      // Decided when the stream opens, and again when credentials are reloaded or expire.
      access = await accessOfCall(call, deps, path);
      ({ access: ctx.access, watched } = watchCredentials(deps, call, path, access, ctx));
      await fn(stream, ctx);
      if (watched.error) throw watched.error;
    })()
      .then(
        () =>
          calls.ended(
            reset ? Code.ResourceExhausted : endedWith(call, endStream(call, deps, path)),
            since(start),
          ),
        (error: unknown) => {
          if (reset) return calls.ended(Code.ResourceExhausted, since(start));
          const status = failure(watched.error ?? error, deps, path, call, access);
          calls.ended(status.code, since(start));
          call.emit("error", status);
        },
      )
      .finally(() => {
        watched.close();
        ctx.done();
      });
  };
}
