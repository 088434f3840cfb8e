import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { type Access, accessOf, type RoleBinding } from "../../src/auth/access.js";
import { Code, LeaseholdError } from "../../src/errors.js";
import { withMethodRight } from "../../src/rpc/adapter.js";
import type { Authenticator } from "../../src/rpc/authenticator.js";
import { createStreamRegistry, type StreamRegistry } from "../../src/rpc/stream-registry.js";

const WATCH = "leasehold.v1.EventService/WatchEvents";
const reader = (clusters: string[]): RoleBinding => ({ role: "reader", clusters, workerIds: "*" });

/** An authenticator over a table the test edits: token → principal, bindings and expiry. */
function fakeAuthenticator() {
  const table = new Map<string, { principal: string; bindings: RoleBinding[]; expiresAtMs?: number }>();
  const listeners = new Set<() => void>();
  const cache = new Map<string, Access>();
  const authenticator: Authenticator = {
    authenticate(call) {
      const token = String(call.metadata.get("authorization")[0] ?? "").replace(/^Bearer /, "");
      const entry = table.get(token);
      if (!entry)
        throw new LeaseholdError(Code.Unauthenticated, "the bearer token is not known to this server", {
          reason: "TOKEN_UNKNOWN",
        });
      if (entry.expiresAtMs !== undefined && entry.expiresAtMs <= Date.now())
        throw new LeaseholdError(Code.Unauthenticated, "the token expired; get a new one", {
          reason: "TOKEN_EXPIRED",
        });
      // The same access while nothing changed, as the real cache gives.
      let access = cache.get(token);
      if (!access) {
        access = accessOf(entry.principal, entry.bindings, entry.expiresAtMs);
        cache.set(token, access);
      }
      return access;
    },
    onChange(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
  };
  return {
    authenticator,
    table,
    /** What a reload does: decisions made before are stale, and listeners hear of it. */
    reload() {
      cache.clear();
      for (const listener of listeners) listener();
    },
  };
}

function credentials(token: string) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return { metadata, getAuthContext: () => ({}) };
}

describe("stream registry", () => {
  let fake: ReturnType<typeof fakeAuthenticator>;
  let registry: StreamRegistry;
  beforeEach(() => {
    vi.useFakeTimers({ now: 1_000_000 });
    fake = fakeAuthenticator();
    registry = createStreamRegistry({
      authenticator: fake.authenticator,
      requireMethodRight: withMethodRight,
      log: pino({ level: "silent" }),
    });
  });
  afterEach(() => {
    registry.close();
    vi.useRealTimers();
  });

  /** Opens a call as the adapter does; `ended` holds the error it was ended with. */
  const open = (token: string) => {
    const creds = credentials(token);
    const access = fake.authenticator.authenticate(creds) as Access;
    const call: { ended: LeaseholdError | undefined; access: Access; close(): void } = {
      ended: undefined,
      access,
      close: () => {},
    };
    const opened = registry.open({
      credentials: creds,
      path: WATCH,
      access,
      end: (error) => {
        call.ended = error;
      },
    });
    call.access = opened.access;
    call.close = opened.close;
    return call;
  };

  it("ends a call when its credential expires, not before, with the reason a new call would get", async () => {
    fake.table.set("jwt-1", { principal: "r", bindings: [reader(["a"])], expiresAtMs: 1_005_000 });
    const call = open("jwt-1");
    call.access.requireListScope("event.read", "a");
    await vi.advanceTimersByTimeAsync(4_999);
    expect(call.ended).toBeUndefined();
    await vi.advanceTimersByTimeAsync(1);
    expect({ code: call.ended?.code, reason: call.ended?.reason }).toEqual({
      code: Code.Unauthenticated,
      reason: "TOKEN_EXPIRED",
    });
    expect(call.ended?.message).toMatch(/open it again with a valid credential$/);
  });

  it("keeps one timer for the earliest expiry: calls of later credentials end at theirs", async () => {
    fake.table.set("late", { principal: "r", bindings: [reader(["a"])], expiresAtMs: 1_009_000 });
    fake.table.set("early", { principal: "r", bindings: [reader(["a"])], expiresAtMs: 1_002_000 });
    const late = open("late");
    const early = open("early");
    await vi.advanceTimersByTimeAsync(2_000);
    expect([early.ended?.reason, late.ended]).toEqual(["TOKEN_EXPIRED", undefined]);
    await vi.advanceTimersByTimeAsync(7_000);
    expect(late.ended?.reason).toBe("TOKEN_EXPIRED");
  });

  it("on a reload, ends the calls whose token is gone as CREDENTIALS_REVOKED", async () => {
    fake.table.set("lh_a", { principal: "agent", bindings: [reader(["a"])] });
    const call = open("lh_a");
    fake.table.delete("lh_a");
    fake.reload();
    await registry.recheck();
    expect({
      code: call.ended?.code,
      reason: call.ended?.reason,
      was: call.ended?.metadata.refused_as,
    }).toEqual({ code: Code.Unauthenticated, reason: "CREDENTIALS_REVOKED", was: "TOKEN_UNKNOWN" });
  });

  it("on a reload, ends PERMISSION_DENIED the call that lost a right it checked, naming it; the others go on", async () => {
    fake.table.set("lh_r", { principal: "r", bindings: [reader(["a", "b"])] });
    const watchA = open("lh_r");
    watchA.access.requireListScope("event.read", "a");
    const watchB = open("lh_r");
    watchB.access.requireListScope("event.read", "b");
    fake.table.set("lh_r", { principal: "r", bindings: [reader(["a"])] });
    fake.reload();
    await registry.recheck();
    expect(watchA.ended).toBeUndefined();
    expect({ code: watchB.ended?.code, ...watchB.ended?.metadata }).toEqual({
      code: Code.PermissionDenied,
      principal: "r",
      right: "event.read",
      cluster: "b",
    });
    // Later checks of the call that stayed are made under the new policy.
    expect(watchA.access.can("event.read", "b")).toBe(false);
  });

  it("forgets a closed call: a reload after it ends nothing", async () => {
    fake.table.set("lh_c", { principal: "c", bindings: [reader(["a"])] });
    const call = open("lh_c");
    call.close();
    fake.table.delete("lh_c");
    fake.reload();
    await registry.recheck();
    expect(call.ended).toBeUndefined();
  });
});
