/**
 * Clients built independently of our own descriptors: the reflection and
 * health protos as their packages ship them, loaded with proto-loader. Tests
 * use them to check what a third-party client sees.
 */
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const require = createRequire(import.meta.url);

function load(protoFile: string, includeDir: string): grpc.GrpcObject {
  const definition = protoLoader.loadSync(protoFile, {
    includeDirs: [includeDir],
    longs: String,
    enums: String,
    keepCase: true,
  });
  return grpc.loadPackageDefinition(definition);
}

// biome-ignore lint/suspicious/noExplicitAny: proto-loader clients are untyped; each call site casts its method.
type Method = (...args: any[]) => any;
type Ctor = new (address: string, creds: grpc.ChannelCredentials) => grpc.Client & Record<string, Method>;

/** A grpc.reflection.v1 client; `metadata` goes with every stream (e.g. a bearer token). */
export function reflectionClient(address: string, metadata?: grpc.Metadata) {
  const root = join(dirname(require.resolve("@grpc/reflection/package.json")), "build", "proto");
  const pkg = load("grpc/reflection/v1/reflection.proto", root) as unknown as {
    grpc: { reflection: { v1: { ServerReflection: Ctor } } };
  };
  const client = new pkg.grpc.reflection.v1.ServerReflection(address, grpc.credentials.createInsecure());
  /** Sends one request on a fresh stream and returns the one response. */
  const ask = (request: Record<string, string>) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const call = (
        client.ServerReflectionInfo as (
          metadata?: grpc.Metadata,
        ) => grpc.ClientDuplexStream<unknown, Record<string, unknown>>
      )(metadata ?? new grpc.Metadata());
      call.once("data", (response) => {
        resolve(response);
        call.end();
      });
      call.once("error", reject);
      call.write(request);
    });
  return { ask, close: () => client.close() };
}

/** A grpc.health.v1 client. */
export function healthClient(address: string) {
  const root = join(dirname(require.resolve("grpc-health-check/package.json")), "proto");
  const pkg = load("health/v1/health.proto", root) as unknown as {
    grpc: { health: { v1: { Health: Ctor } } };
  };
  const client = new pkg.grpc.health.v1.Health(address, grpc.credentials.createInsecure());
  const check = (service = "") =>
    new Promise<string>((resolve, reject) =>
      client.Check?.({ service }, (error: grpc.ServiceError | null, response: { status: string }) =>
        error ? reject(error) : resolve(response.status),
      ),
    );
  return { check, close: () => client.close() };
}

/** How a call ended, as a raw client sees it. */
export interface RawOutcome {
  readonly status: grpc.StatusObject;
  /** Messages received before the status. */
  readonly messages: Buffer[];
}

const identity = (bytes: Buffer) => bytes;

/**
 * A client that sends and receives raw bytes on any method path, all on one
 * channel (one HTTP/2 connection): for requests our own encoder cannot build
 * (invalid UTF-8, truncated messages) and for statuses read without decoding.
 */
export function rawClient(address: string) {
  const client = new grpc.Client(address, grpc.credentials.createInsecure(), {
    "grpc.max_receive_message_length": -1,
  });
  const options = (deadlineMs: number) => ({ deadline: Date.now() + deadlineMs });
  const collect = (call: grpc.ClientReadableStream<Buffer>) => {
    const messages: Buffer[] = [];
    call.on("data", (m: Buffer) => messages.push(m));
    call.on("error", () => {});
    return new Promise<RawOutcome>((resolve) => call.on("status", (status) => resolve({ status, messages })));
  };
  return {
    /** A unary call. */
    unary(path: string, request: Buffer, deadlineMs: number): Promise<RawOutcome> {
      return new Promise((resolve) => {
        const messages: Buffer[] = [];
        const call = client.makeUnaryRequest(
          path,
          identity,
          identity,
          request,
          new grpc.Metadata(),
          options(deadlineMs),
          (_error, response) => {
            if (response) messages.push(response);
          },
        );
        call.on("status", (status) => resolve({ status, messages }));
      });
    },
    /** A server-streaming call, read to its end. */
    serverStream(path: string, request: Buffer, deadlineMs: number): Promise<RawOutcome> {
      return collect(
        client.makeServerStreamRequest(
          path,
          identity,
          identity,
          request,
          new grpc.Metadata(),
          options(deadlineMs),
        ),
      );
    },
    /** A bidi call: write raw messages, wait for each message received, and for the end. */
    bidi(path: string, deadlineMs: number) {
      const call = client.makeBidiStreamRequest(
        path,
        identity,
        identity,
        new grpc.Metadata(),
        options(deadlineMs),
      );
      const received: Buffer[] = [];
      let finished = false;
      const waiters = new Set<() => void>();
      const wake = () => {
        for (const w of [...waiters]) w();
      };
      call.on("data", (m: Buffer) => {
        received.push(m);
        wake();
      });
      call.on("error", () => {});
      const ended = new Promise<RawOutcome>((resolve) =>
        call.on("status", (status) => {
          finished = true;
          resolve({ status, messages: received });
          wake();
        }),
      );
      let taken = 0;
      return {
        write: (bytes: Buffer) => call.write(bytes),
        /** The next message not taken yet, or undefined once the call ended without one. */
        next: () =>
          new Promise<Buffer | undefined>((resolve) => {
            const look = () => {
              if (taken < received.length) {
                waiters.delete(look);
                resolve(received[taken++]);
              } else if (finished) {
                waiters.delete(look);
                resolve(undefined);
              }
            };
            waiters.add(look);
            look();
          }),
        ended,
        cancel: () => call.cancel(),
      };
    },
    close: () => client.close(),
  };
}
