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

/** A grpc.reflection.v1 client. */
export function reflectionClient(address: string) {
  const root = join(dirname(require.resolve("@grpc/reflection/package.json")), "build", "proto");
  const pkg = load("grpc/reflection/v1/reflection.proto", root) as unknown as {
    grpc: { reflection: { v1: { ServerReflection: Ctor } } };
  };
  const client = new pkg.grpc.reflection.v1.ServerReflection(address, grpc.credentials.createInsecure());
  /** Sends one request on a fresh stream and returns the one response. */
  const ask = (request: Record<string, string>) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const call = (
        client.ServerReflectionInfo as () => grpc.ClientDuplexStream<unknown, Record<string, unknown>>
      )();
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
