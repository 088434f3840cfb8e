import type { DescMessage, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { create, fromBinary } from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import * as grpc from "@grpc/grpc-js";
import { ActionService } from "../gen/leasehold/v1/action_pb.js";
import { decodeBasicSubmitResults } from "./action-wire.js";
import { createServiceDefinition, encodeMessage, type FastDecoders, keepBytes } from "./adapter.js";
import { errorReasonOf } from "./status.js";

/** Decoders every client tries first for some unary answers, by service (see `FastDecoders`). */
const UNARY_DECODERS: Readonly<Record<string, FastDecoders>> = {
  // A bulk submit's 1,000 results in the basic view (action-wire.ts).
  [ActionService.typeName]: { submitActions: decodeBasicSubmitResults },
};

type Input<M> = M extends { input: infer I extends DescMessage } ? I : never;
type Output<M> = M extends { output: infer O extends DescMessage } ? O : never;

/** Per-call options. */
export interface CallOptions {
  /** Aborts the call (it fails with CANCELLED). */
  readonly signal?: AbortSignal;
  /** Absolute deadline. */
  readonly deadline?: Date;
  /** Request metadata. */
  readonly metadata?: grpc.Metadata;
}

/** The client-side shape of one method, by kind. */
export type ClientMethod<M> = M extends { methodKind: "unary" }
  ? (request: MessageInitShape<Input<M>>, options?: CallOptions) => Promise<MessageShape<Output<M>>>
  : M extends { methodKind: "server_streaming" }
    ? (request: MessageInitShape<Input<M>>, options?: CallOptions) => AsyncIterable<MessageShape<Output<M>>>
    : M extends { methodKind: "bidi_streaming" }
      ? (options?: CallOptions) => grpc.ClientDuplexStream<MessageShape<Input<M>>, MessageShape<Output<M>>>
      : never;

/** A promise-based client of a protobuf-es service. */
export type Client<S extends GenServiceMethods> = { [K in keyof S]: ClientMethod<S[K]> } & {
  /** Closes the channel. */
  close(): void;
  /** The grpc-js client underneath: calls of other services on the same connection (a health check). */
  readonly grpcClient: grpc.Client;
};

function callOptions(options: CallOptions | undefined): grpc.CallOptions {
  return options?.deadline ? { deadline: options.deadline } : {};
}

/**
 * The request, serialized before grpc-js sees it. grpc-js keeps what it is
 * given until the call ends: given the message, a bulk request of 1,000
 * actions stayed alive through the call, and the young-generation
 * collections meanwhile copied it (about 1 ms more of the client's garbage
 * collection per call).
 */
function requestBytes(desc: DescMessage, request: MessageInitShape<DescMessage>): Buffer {
  return encodeMessage(desc, create(desc, request));
}

/**
 * One unary call: sends `request` (already bytes), and decodes the answer
 * after the call ends. grpc-js, left to decode it, keeps the message until
 * the call's status follows, and a bulk submit's 1,000 results, decoded
 * there, survived young-generation collections: about 4 ms a call in the
 * client's garbage collector, against about 1 ms decoded here. An answer
 * that does not decode fails the call as grpc-js would, with INTERNAL.
 */
async function unaryCall(
  fn: (...args: unknown[]) => unknown,
  request: Buffer,
  metadata: grpc.Metadata,
  options: CallOptions | undefined,
  output: DescMessage,
  fast: ((bytes: Buffer) => object | undefined) | undefined,
): Promise<unknown> {
  const bytes = await new Promise<Buffer>((resolve, reject) => {
    let unlink = () => {};
    const call = fn(
      request,
      metadata,
      callOptions(options),
      (error: grpc.ServiceError | null, response: Buffer) => {
        unlink();
        if (error) reject(error);
        else resolve(response);
      },
    ) as grpc.ClientUnaryCall;
    unlink = linkAbort(call, options?.signal);
  });
  try {
    return fast?.(bytes) ?? fromBinary(output, bytes);
  } catch (error) {
    throw internalError(`Response message parsing error: ${(error as Error).message}`);
  }
}

/** An INTERNAL status shaped as grpc-js shapes a call's error (`ServiceError`). */
function internalError(details: string): grpc.ServiceError {
  return Object.assign(new Error(`${grpc.status.INTERNAL} INTERNAL: ${details}`), {
    code: grpc.status.INTERNAL,
    details,
    metadata: new grpc.Metadata(),
  });
}

function linkAbort(call: { cancel(): void }, signal: AbortSignal | undefined): () => void {
  if (!signal) return () => {};
  const onAbort = () => call.cancel();
  if (signal.aborted) onAbort();
  signal.addEventListener("abort", onAbort);
  return () => signal.removeEventListener("abort", onAbort);
}

/**
 * A client for `service` at `address` (host:port), built from the same
 * descriptors as the server: no proto-loader. `interceptors` run on every
 * call (e.g. the token interceptor of `clientChannel` in
 * ./client-security.ts, whose three parts go into the credentials, channel
 * options and interceptors parameters). In a unary call they see the request
 * and the answer as bytes (a Buffer in the binary format): see `unaryCall`.
 * `responseDecoders` are tried, by method, before `fromBinary` on each
 * message of a stream (the agent's Connect: worker-wire.ts); a few unary
 * answers have theirs built in (`UNARY_DECODERS`).
 */
export function createClient<S extends GenServiceMethods>(
  service: GenService<S>,
  address: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  channelOptions: grpc.ChannelOptions = {},
  interceptors: readonly grpc.Interceptor[] = [],
  responseDecoders: FastDecoders = {},
): Client<S> {
  const outputs = new Map(service.methods.map((m) => [m.localName, m.output]));
  const unaryDecoders = UNARY_DECODERS[service.typeName] ?? {};
  // A unary answer is decoded by `unaryCall`, not by grpc-js.
  const definition: grpc.ServiceDefinition = Object.fromEntries(
    Object.entries(createServiceDefinition(service)).map(([name, m]) => {
      if (!m.requestStream && !m.responseStream) return [name, { ...m, responseDeserialize: keepBytes }];
      const fast = responseDecoders[name];
      const output = outputs.get(name) as DescMessage;
      return [
        name,
        fast ? { ...m, responseDeserialize: (bytes: Buffer) => fast(bytes) ?? fromBinary(output, bytes) } : m,
      ];
    }),
  );
  const Ctor = grpc.makeGenericClientConstructor(definition, service.typeName);
  const clientOptions: grpc.ClientOptions =
    interceptors.length > 0 ? { ...channelOptions, interceptors: [...interceptors] } : channelOptions;
  const raw = new Ctor(address, credentials, clientOptions) as unknown as Record<
    string,
    (...args: unknown[]) => unknown
  > &
    grpc.Client;
  const client: Record<string, unknown> = { close: () => raw.close(), grpcClient: raw };
  for (const method of service.methods) {
    const fn = raw[method.localName]?.bind(raw) as (...args: unknown[]) => unknown;
    const metadataOf = (o: CallOptions | undefined) => o?.metadata ?? new grpc.Metadata();
    switch (method.methodKind) {
      case "unary":
        client[method.localName] = (request: MessageInitShape<DescMessage>, options?: CallOptions) => {
          // Serialized here, not in `unaryCall`: the async function would keep the request until the answer.
          let bytes: Buffer;
          try {
            bytes = requestBytes(method.input, request);
          } catch (error) {
            // As grpc-js fails a message it cannot serialize.
            return Promise.reject(
              internalError(`Request message serialization failure: ${(error as Error).message}`),
            );
          }
          return unaryCall(
            fn,
            bytes,
            metadataOf(options),
            options,
            method.output,
            unaryDecoders[method.localName],
          );
        };
        break;
      case "server_streaming":
        client[method.localName] = (request: MessageInitShape<DescMessage>, options?: CallOptions) => {
          const call = fn(
            create(method.input, request),
            metadataOf(options),
            callOptions(options),
          ) as grpc.ClientReadableStream<unknown>;
          const unlink = linkAbort(call, options?.signal);
          return (async function* () {
            try {
              yield* call as AsyncIterable<unknown>;
            } finally {
              unlink();
              call.cancel();
            }
          })();
        };
        break;
      case "bidi_streaming":
        client[method.localName] = (options?: CallOptions) => {
          const call = fn(metadataOf(options), callOptions(options)) as grpc.ClientDuplexStream<
            unknown,
            unknown
          >;
          const unlink = linkAbort(call, options?.signal);
          call.once("close", unlink);
          return call;
        };
        break;
      default:
        break;
    }
  }
  return client as Client<S>;
}

/**
 * `client` with a deadline `timeoutMs` after its start on every unary call
 * that brings none of its own (a call that waits on the server, such as
 * CollectOutputs, sets a longer one). Streams are left as they are: they
 * follow changes for as long as asked. A server that hangs (a stopped
 * process, a connection dead one way) otherwise holds a call forever.
 */
export function withDefaultDeadline<S extends GenServiceMethods>(
  service: GenService<S>,
  client: Client<S>,
  timeoutMs: number,
): Client<S> {
  if (!(timeoutMs > 0)) return client;
  const methods = client as unknown as Record<string, unknown>;
  const wrapped: Record<string, unknown> = { ...methods };
  for (const method of service.methods) {
    if (method.methodKind !== "unary") continue;
    const call = methods[method.localName] as (request: unknown, options?: CallOptions) => Promise<unknown>;
    wrapped[method.localName] = (request: unknown, options?: CallOptions) => {
      if (options?.deadline) return call(request, options);
      return call(request, { ...options, deadline: new Date(Date.now() + timeoutMs) }).catch(
        (error: unknown) => {
          // Only the client's own deadline: a server's DEADLINE_EXCEEDED gives a reason.
          if ((error as { code?: unknown })?.code === grpc.status.DEADLINE_EXCEEDED && !errorReasonOf(error))
            Object.assign(error as object, { defaultDeadlinePassed: true });
          throw error;
        },
      );
    };
  }
  return wrapped as unknown as Client<S>;
}

/** Whether `error` is a call's deadline set by {@link withDefaultDeadline} passing. */
export const defaultDeadlinePassed = (error: unknown): boolean =>
  (error as { defaultDeadlinePassed?: unknown } | undefined)?.defaultDeadlinePassed === true;
