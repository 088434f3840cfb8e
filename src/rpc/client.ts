import type { DescMessage, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import * as grpc from "@grpc/grpc-js";
import { createServiceDefinition } from "./adapter.js";

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
};

function callOptions(options: CallOptions | undefined): grpc.CallOptions {
  return options?.deadline ? { deadline: options.deadline } : {};
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
 * descriptors as the server: no proto-loader, no hand-written codecs.
 * `interceptors` run on every call (e.g. the token interceptor of
 * `clientChannel` in ./client-security.ts, whose three parts go into the last
 * three parameters).
 */
export function createClient<S extends GenServiceMethods>(
  service: GenService<S>,
  address: string,
  credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
  channelOptions: grpc.ChannelOptions = {},
  interceptors: readonly grpc.Interceptor[] = [],
): Client<S> {
  const Ctor = grpc.makeGenericClientConstructor(createServiceDefinition(service), service.typeName);
  const clientOptions: grpc.ClientOptions =
    interceptors.length > 0 ? { ...channelOptions, interceptors: [...interceptors] } : channelOptions;
  const raw = new Ctor(address, credentials, clientOptions) as unknown as Record<
    string,
    (...args: unknown[]) => unknown
  > &
    grpc.Client;
  const client: Record<string, unknown> = { close: () => raw.close() };
  for (const method of service.methods) {
    const fn = raw[method.localName]?.bind(raw) as (...args: unknown[]) => unknown;
    const metadataOf = (o: CallOptions | undefined) => o?.metadata ?? new grpc.Metadata();
    switch (method.methodKind) {
      case "unary":
        client[method.localName] = (request: MessageInitShape<DescMessage>, options?: CallOptions) =>
          new Promise((resolve, reject) => {
            let unlink = () => {};
            const call = fn(
              create(method.input, request),
              metadataOf(options),
              callOptions(options),
              (error: grpc.ServiceError | null, response: unknown) => {
                unlink();
                if (error) reject(error);
                else resolve(response);
              },
            ) as grpc.ClientUnaryCall;
            unlink = linkAbort(call, options?.signal);
          });
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
