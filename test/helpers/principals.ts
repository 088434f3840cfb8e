import * as grpc from "@grpc/grpc-js";
import { type Access, accessOf, type RoleBinding } from "../../src/auth/access.js";

/**
 * The server's test seam for principals: `accessOf` (a startTestServer
 * override) takes the caller's principal from the `x-test-principal` header
 * and gives it the bindings `policy` names for it (none for one it does not
 * name, or "nobody" without the header).
 */
export const policyAccess =
  (policy: Readonly<Record<string, RoleBinding[]>>) =>
  (metadata: grpc.Metadata): Access => {
    const principal = String(metadata.get("x-test-principal")[0] ?? "nobody");
    return accessOf(principal, policy[principal] ?? []);
  };

/** Call options that make a call `principal`'s, through {@link policyAccess}. */
export const as = (principal: string) => {
  const metadata = new grpc.Metadata();
  metadata.set("x-test-principal", principal);
  return { metadata };
};
