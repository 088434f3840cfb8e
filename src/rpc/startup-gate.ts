import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import { Code, LeaseholdError } from "../errors.js";
import type { HandlerContext } from "./adapter.js";
import type { ServiceBinding } from "./server.js";

type Impl = Record<string, ((...args: never[]) => unknown) | undefined>;

/**
 * Lets the gRPC port accept calls before the services behind it exist. The
 * server binds its port first, so that agents can reconnect while it waits
 * for the database and the restart extension counts from the moment they can
 * (SPEC rule 6). Until {@link StartupGate.open}:
 *
 * - while the server is starting normally (database connected, migrations,
 *   the restart extension), calls wait and are served once it is ready;
 * - while it waits for its database ({@link StartupGate.block}), calls fail at
 *   once with UNAVAILABLE (reason `STARTING`) naming the cause, and so do the
 *   calls that were waiting: clients retry, nothing hangs for the whole outage;
 * - if startup fails or the server stops first ({@link StartupGate.close}),
 *   waiting calls get that error.
 *
 * Once open, {@link StartupGate.pause} makes new calls fail at once while
 * the database is unreachable, as they do while a start waits for it.
 */
export interface StartupGate {
  /** A binding for `service` that forwards each call to the implementation given to `open`. */
  defer(service: GenService<GenServiceMethods>): ServiceBinding;
  /**
   * Calls fail at once with UNAVAILABLE naming `cause` (the server waits for
   * its database); called again, with the latest attempt's cause.
   */
  block(cause: string): void;
  /** Calls wait for `open` again (the database answered; the rest is quick). */
  unblock(): void;
  /** The real implementations: every deferred service must be among them. Waiting calls proceed. */
  open(bindings: readonly ServiceBinding[]): void;
  /** Startup failed or was stopped before `open`: waiting and later calls get `error`. */
  close(error: LeaseholdError): void;
  /**
   * After `open`: the database is unreachable (`cause`), and new calls fail at
   * once with UNAVAILABLE (reason DATABASE_UNREACHABLE) until `resume`. A
   * database that hangs rather than refuses kept every call waiting until
   * its deadline, or for the whole hang without one. Unary calls already
   * being served are answered UNAVAILABLE at once too, with reason
   * OUTCOME_UNKNOWN: their statements may still commit when the database
   * comes back; but those that only read (Get*, List*, ExplainAction,
   * DebugLease) with DATABASE_UNREACHABLE, as new calls. DATABASE_UNREACHABLE
   * says nothing was done (another server may take the call as it is);
   * OUTCOME_UNKNOWN does not. Streams are left to run: a watch waits for the
   * database as its client would, and worker streams have rules of their own.
   * Called again while paused (a later check failed otherwise: a database
   * shutting down, then stopped), the calls from then on name the new cause.
   */
  pause(cause: string): void;
  resume(): void;
}

/** The unary methods that change nothing (Get*, List*, ExplainAction, DebugLease), by name. */
const READS = /^(Get|List|Explain|Debug)[A-Z]/;

export function createStartupGate(): StartupGate {
  let impls: Map<string, Impl> | undefined;
  let blocked: LeaseholdError | undefined;
  let closed: LeaseholdError | undefined;
  let paused: LeaseholdError | undefined;
  const waiters = new Set<{ resolve(): void; reject(error: LeaseholdError): void }>();
  const deferred: string[] = [];
  /**
   * How to answer each unary call being served, were the database found
   * unreachable, and whether the call only reads (then nothing it did can
   * commit later, and it is answered as a new call would be).
   */
  const serving = new Map<(error: LeaseholdError) => void, boolean>();

  /** The answer of `call`, or the error given to `pause` if that comes first. */
  const servedUnlessPaused = (call: Promise<unknown>, readOnly: boolean) =>
    new Promise<unknown>((resolve, reject) => {
      serving.set(reject, readOnly);
      call.then(resolve, reject).finally(() => serving.delete(reject));
    });

  const failWaiters = (error: LeaseholdError) => {
    for (const w of waiters) w.reject(error);
    waiters.clear();
  };

  /** Resolves with the implementation of `typeName` once open; rejects as described above. */
  async function implOf(typeName: string, ctx: HandlerContext): Promise<Impl> {
    if (impls && paused) throw paused;
    if (!impls) {
      if (closed) throw closed;
      if (blocked) throw blocked;
      await new Promise<void>((resolve, reject) => {
        const onAbort = () => {
          waiters.delete(waiter);
          reject(ctx.signal.reason);
        };
        const waiter = {
          resolve: () => {
            ctx.signal.removeEventListener("abort", onAbort);
            resolve();
          },
          reject: (error: LeaseholdError) => {
            ctx.signal.removeEventListener("abort", onAbort);
            reject(error);
          },
        };
        if (ctx.signal.aborted) {
          reject(ctx.signal.reason);
          return;
        }
        ctx.signal.addEventListener("abort", onAbort, { once: true });
        waiters.add(waiter);
      });
    }
    if (closed) throw closed;
    return impls?.get(typeName) ?? {};
  }

  const unimplemented = (service: GenService<GenServiceMethods>, name: string) =>
    new LeaseholdError(
      Code.Unimplemented,
      `${service.typeName}.${name} is not implemented by this server yet`,
      {
        reason: "NOT_IMPLEMENTED",
      },
    );

  return {
    defer(service) {
      deferred.push(service.typeName);
      const proxy: Impl = {};
      for (const method of service.methods) {
        const name = method.localName;
        const target = async (ctx: HandlerContext) => {
          const fn = (await implOf(service.typeName, ctx))[name];
          if (!fn) throw unimplemented(service, method.name);
          return fn as (...args: unknown[]) => unknown;
        };
        proxy[name] =
          method.methodKind === "server_streaming"
            ? async function* (request: unknown, ctx: HandlerContext) {
                const fn = await target(ctx);
                yield* fn(request, ctx) as AsyncIterable<unknown>;
              }
            : method.methodKind === "unary"
              ? async (request: unknown, ctx: HandlerContext) =>
                  servedUnlessPaused(
                    Promise.resolve((await target(ctx))(request, ctx)),
                    READS.test(method.name),
                  )
              : // Bidi handlers return a promise too.
                async (request: unknown, ctx: HandlerContext) => (await target(ctx))(request, ctx);
      }
      return { service, impl: proxy } as unknown as ServiceBinding;
    },
    block(cause) {
      if (impls || closed) return;
      blocked = new LeaseholdError(
        Code.Unavailable,
        `the server is starting and waits for its database (${cause}); retry shortly`,
        { reason: "STARTING" },
      );
      failWaiters(blocked);
    },
    unblock() {
      blocked = undefined;
    },
    open(bindings) {
      const map = new Map(bindings.map((b) => [b.service.typeName, b.impl as unknown as Impl]));
      // Both lists are written by hand in the composition root: a mismatch is a bug.
      const missing = deferred.filter((name) => !map.has(name));
      const extra = [...map.keys()].filter((name) => !deferred.includes(name));
      if (missing.length > 0 || extra.length > 0) {
        throw new Error(
          `deferred services and implementations differ: missing [${missing}], extra [${extra}]`,
        );
      }
      impls = map;
      blocked = undefined;
      for (const w of waiters) w.resolve();
      waiters.clear();
    },
    pause(cause) {
      paused = new LeaseholdError(
        Code.Unavailable,
        `the database cannot be reached (${cause}); retry later`,
        { reason: "DATABASE_UNREACHABLE" },
      );
      const lost = new LeaseholdError(
        Code.Unavailable,
        `the database stopped answering while this call was served (${cause}); ` +
          "a change it asked for may or may not have been made: retry later (a request_id makes a retry safe)",
        { reason: "OUTCOME_UNKNOWN" },
      );
      for (const [fail, readOnly] of serving) fail(readOnly ? paused : lost);
      serving.clear();
    },
    resume() {
      paused = undefined;
    },
    close(error) {
      if (impls) return;
      closed ??= error;
      failWaiters(closed);
    },
  };
}
