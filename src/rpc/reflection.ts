import { readFileSync } from "node:fs";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import type * as grpc from "@grpc/grpc-js";
import { ReflectionService } from "@grpc/reflection";

/**
 * Descriptor sets built by `npm run generate` with `buf build`. Unlike the
 * descriptors embedded in the generated code, they keep source info, so
 * `grpcurl describe` shows the proto comments.
 */
const DESCRIPTOR_SETS = ["../gen/descriptors.binpb", "../gen/health.binpb", "../gen/google-rpc.binpb"];

/**
 * Adds gRPC server reflection (v1 and v1alpha) for the given services, fed
 * from our descriptor sets rather than from proto-loader.
 */
export function addReflection(
  server: Pick<grpc.Server, "addService">,
  serviceNames: readonly string[],
): void {
  const fileDescriptorProtos: Buffer[] = [];
  for (const relative of DESCRIPTOR_SETS) {
    const set = fromBinary(FileDescriptorSetSchema, readFileSync(new URL(relative, import.meta.url)));
    for (const file of set.file) {
      fileDescriptorProtos.push(Buffer.from(toBinary(FileDescriptorProtoSchema, file)));
    }
  }
  // @grpc/reflection reads only `fileDescriptorProtos` of each package entry.
  const packageDefinition = {
    leasehold: { format: "Protocol Buffer 3 FileDescriptorProto", type: {}, fileDescriptorProtos },
  };
  new ReflectionService(packageDefinition as never, { services: [...serviceNames] }).addToServer(server);
}
