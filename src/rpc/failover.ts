import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { Code } from "../errors.js";
import type { Client } from "./client.js";
import { errorReasonOf } from "./status.js";

/**
 * ErrorInfo reasons of an UNAVAILABLE call that the server refused before
 * serving it: it is starting and waits for its database (STARTING), or it
 * has found its database unreachable (DATABASE_UNREACHABLE). Nothing was
 * done, so another server of the same database may take the call as it is.
 * OUTCOME_UNKNOWN (the database was lost while the call was served) is not
 * among them: that call may still take effect.
 */
const NOT_SERVED = new Set(["STARTING", "DATABASE_UNREACHABLE"]);

/** Whether `error` is a call refused unserved (see {@link NOT_SERVED}). */
export function refusedUnserved(error: unknown): boolean {
  return (
    (error as { code?: unknown })?.code === Code.Unavailable && NOT_SERVED.has(errorReasonOf(error) ?? "")
  );
}

/**
 * `primary` (a client of every address, which grpc-js moves along only when
 * a connection fails), whose unary calls refused unserved by the server it
 * reached are made again on each address in turn (`at(address)`, made on
 * first need), until one serves the call or refuses it otherwise. A server
 * that lost its database still accepts connections and answers health
 * checks, so without this the CLI stayed on it though the others served.
 * Streams are left to `primary`: the commands that follow one reconnect.
 */
export function withFailover<S extends GenServiceMethods>(
  service: GenService<S>,
  primary: Client<S>,
  addresses: readonly string[],
  at: (address: string) => Client<S>,
): Client<S> {
  if (addresses.length < 2) return primary;
  const made = new Map<string, Client<S>>();
  const clientAt = (address: string) => {
    let client = made.get(address);
    if (client === undefined) {
      client = at(address);
      made.set(address, client);
    }
    return client as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
  };
  const first = primary as unknown as Record<string, (...args: unknown[]) => unknown>;
  const client: Record<string, unknown> = {
    close() {
      primary.close();
      for (const c of made.values()) c.close();
    },
  };
  for (const method of service.methods) {
    const name = method.localName;
    const call = first[name] as (...args: unknown[]) => unknown;
    if (method.methodKind !== "unary") {
      client[name] = call;
      continue;
    }
    client[name] = async (...args: unknown[]) => {
      try {
        return await call(...args);
      } catch (error) {
        if (!refusedUnserved(error)) throw error;
        let last = error;
        for (const address of addresses) {
          try {
            return await (clientAt(address)[name] as (...a: unknown[]) => Promise<unknown>)(...args);
          } catch (next) {
            if (!refusedUnserved(next)) throw next;
            last = next;
          }
        }
        throw last;
      }
    };
  }
  return client as unknown as Client<S>;
}
