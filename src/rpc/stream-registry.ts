import type { Logger } from "pino";
import { type Access, PERMISSION_DENIED_REASON } from "../auth/access.js";
import { type RecordedAccess, recordChecks } from "../auth/recorded-access.js";
import { Code, LeaseholdError, quote } from "../errors.js";
import type { Authenticator, CallCredentials } from "./authenticator.js";

/** The ErrorInfo reason of a stream ended because its credential no longer authenticates. */
export const CREDENTIALS_REVOKED = "CREDENTIALS_REVOKED";

/** One open call, as the adapter registers it. */
export interface OpenCall {
  /** The call's credentials, authenticated again at each check. */
  readonly credentials: CallCredentials;
  /** `package.Service/Method`: the method's right is checked again too. */
  readonly path: string;
  /** The access the call was given when it started. */
  readonly access: Access;
  /** Ends the call with `error` (UNAUTHENTICATED or PERMISSION_DENIED). */
  end(error: LeaseholdError): void;
}

/** Open streams, checked again when credentials may have changed. */
export interface StreamRegistry {
  /**
   * Tracks `call` until `close()`. Its handler is to use the returned
   * access: the checks it passes (the rights in the clusters it touches)
   * are what must still pass after a reload.
   */
  open(call: OpenCall): { readonly access: Access; close(): void };
  /** Checks every open call again now (what a reload of tokens, JWKS or policy does). */
  recheck(): Promise<void>;
  /** Stops the expiry timer and the reload listener. */
  close(): void;
}

/** Options of {@link createStreamRegistry}. */
export interface StreamRegistryOptions {
  readonly authenticator: Authenticator;
  /**
   * Throws PERMISSION_DENIED unless `access` holds the right of the method at
   * `path` somewhere, as a call that starts is checked (the adapter's).
   */
  readonly requireMethodRight: (access: Access, path: string) => void;
  readonly log: Logger;
  /** Clock of expiries (tests). Default Date.now. */
  readonly now?: () => number;
}

interface Entry {
  readonly credentials: CallCredentials;
  readonly path: string;
  readonly recorded: RecordedAccess;
  readonly end: (error: LeaseholdError) => void;
  ended: boolean;
}

/** The open calls of one credential (a bearer token, or a client certificate). */
interface Group {
  readonly key: string;
  readonly entries: Set<Entry>;
  /** When the credential is refused from (epoch ms), if it expires. */
  expiresAtMs: number | undefined;
}

/** setTimeout's longest delay; a later expiry re-arms on the way. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Which credential a call proved itself with: the same key for every call
 * made with it, so that its calls are checked together (one verification
 * of a JWT, then cache hits) and share one expiry.
 */
function credentialKey(credentials: CallCredentials): string {
  const header = credentials.metadata.get("authorization")[0];
  if (header !== undefined) return `bearer:${String(header)}`;
  const certificate = credentials.getAuthContext().sslPeerCertificate;
  return certificate ? `cert:${certificate.fingerprint256}` : "";
}

/**
 * Keeps long-lived calls (worker streams, watches, downloads, waits) true to
 * the credentials in force. A call is authenticated when it starts; this
 * registry checks it again, as if it started anew, when the token file, a
 * JWKS file or the policy is reloaded (`Authenticator.onChange`), and when
 * its credential expires (one timer, for the earliest expiry of all). A call
 * whose credential no longer authenticates ends UNAUTHENTICATED (reason
 * CREDENTIALS_REVOKED, or TOKEN_EXPIRED / CERT_EXPIRED at its expiry); one
 * whose principal lost a right the call checked ends PERMISSION_DENIED
 * naming it. Nothing is checked per message. A check that cannot be made
 * now (a JWKS URL that does not answer) leaves the call open; at its
 * credential's expiry it ends regardless.
 */
export function createStreamRegistry(options: StreamRegistryOptions): StreamRegistry {
  const { log } = options;
  const now = options.now ?? Date.now;
  const groups = new Map<string, Group>();
  let timer: NodeJS.Timeout | undefined;
  let timerAt = Number.POSITIVE_INFINITY;
  let closed = false;

  /** Sets the timer for the earliest expiry of the open calls. */
  const arm = () => {
    let earliest = Number.POSITIVE_INFINITY;
    for (const group of groups.values())
      if (group.expiresAtMs !== undefined && group.expiresAtMs < earliest) earliest = group.expiresAtMs;
    armAt(earliest);
  };
  const armAt = (at: number) => {
    if (closed || (at === timerAt && timer !== undefined)) return;
    clearTimeout(timer);
    timer = undefined;
    timerAt = at;
    if (at === Number.POSITIVE_INFINITY) return;
    timer = setTimeout(expire, Math.min(Math.max(at - now(), 0), MAX_TIMER_MS));
    // Never keeps the process alive on its own.
    timer.unref();
  };
  const expire = () => {
    timer = undefined;
    timerAt = Number.POSITIVE_INFINITY;
    const due = [...groups.values()].filter((g) => g.expiresAtMs !== undefined && g.expiresAtMs <= now());
    for (const group of due) {
      // Checked once for this expiry: a check that renews the credential's expiry sets it again.
      group.expiresAtMs = undefined;
      void checkGroup(group, true).then(() => {
        report("expired");
        arm();
      });
    }
    arm();
  };

  // Each ended call is logged as a refused call (the adapter's refusal log, rate-limited); this
  // counts them for one line per check.
  let endedCalls = 0;
  const finish = (entry: Entry, error: LeaseholdError) => {
    if (entry.ended) return;
    entry.ended = true;
    endedCalls++;
    entry.end(error);
  };
  const report = (why: string) => {
    if (endedCalls > 0)
      log.info({ calls: endedCalls }, `ended ${endedCalls} open call(s) whose credentials ${why}`);
    endedCalls = 0;
  };

  /**
   * Checks one call as if it started now; `expired`: its credential's expiry
   * passed, so a check that cannot be made ends it anyway.
   */
  const checkEntry = async (entry: Entry, group: Group, expired: boolean) => {
    let next: Access;
    try {
      next = await options.authenticator.authenticate(entry.credentials);
    } catch (error) {
      if (entry.ended) return;
      if (error instanceof LeaseholdError && error.code === Code.Unauthenticated)
        return finish(entry, noLongerAuthenticated(error));
      if (error instanceof LeaseholdError && error.code === Code.PermissionDenied)
        return finish(entry, rightLost(error));
      if (expired) return finish(entry, expiredError(group));
      log.warn(
        { err: error, principal: entry.recorded.current.actor, method: entry.path },
        "could not check an open call's credentials again; it stays open until the next check",
      );
      return;
    }
    if (entry.ended) return;
    const was = entry.recorded.current.actor;
    if (next.actor !== was)
      return finish(
        entry,
        new LeaseholdError(
          Code.Unauthenticated,
          `the credential this call was opened with now names principal ${quote(next.actor)}, not ${quote(was)}; the call is ended: open it again`,
          { reason: CREDENTIALS_REVOKED, metadata: { principal: was } },
        ),
      );
    if (next.expiresAtMs !== undefined && next.expiresAtMs <= now())
      return finish(entry, expiredError(group));
    try {
      // The rights in the clusters the call touches first: their refusal names the cluster.
      entry.recorded.renew(next);
      options.requireMethodRight(next, entry.path);
    } catch (error) {
      if (!(error instanceof LeaseholdError)) throw error;
      return finish(entry, rightLost(error));
    }
    group.expiresAtMs = next.expiresAtMs;
  };

  /** The calls of one credential, one after another: the first verifies it, the rest hit the cache. */
  const checkGroup = async (group: Group, expired: boolean) => {
    for (const entry of [...group.entries]) {
      if (!entry.ended) await checkEntry(entry, group, expired);
    }
  };

  let pending: Promise<void> | undefined;
  let queue: Promise<void> = Promise.resolve();
  /** Reloads that come while a check runs make one more check after it. */
  const recheck = () => {
    pending ??= queue.then(async () => {
      pending = undefined;
      await Promise.all([...groups.values()].map((group) => checkGroup(group, false)));
      report("no longer allow them after a reload");
      arm();
    });
    queue = pending.catch((error: unknown) => log.error({ err: error }, "checking open calls failed"));
    return pending;
  };
  const offChange =
    options.authenticator.onChange?.(() => {
      void recheck().catch(() => {});
    }) ?? (() => {});

  return {
    open(call) {
      const key = credentialKey(call.credentials);
      let group = groups.get(key);
      if (!group) {
        group = { key, entries: new Set(), expiresAtMs: call.access.expiresAtMs };
        groups.set(key, group);
      }
      const own = group;
      const entry: Entry = {
        credentials: call.credentials,
        path: call.path,
        recorded: recordChecks(call.access),
        end: call.end,
        ended: false,
      };
      own.entries.add(entry);
      if (own.expiresAtMs !== undefined && own.expiresAtMs < timerAt) armAt(own.expiresAtMs);
      // Authorized when the call started, maybe before a reload this registry has already
      // announced: asked again now (a cache hit gives the same access at once).
      let again: Access | Promise<Access> | undefined;
      try {
        again = options.authenticator.authenticate(call.credentials);
      } catch {
        again = undefined;
      }
      if (again !== call.access) {
        if (again === undefined || again instanceof Promise) void checkEntry(entry, own, false);
        // No check recorded yet: nothing to make again.
        else entry.recorded.renew(again);
      }
      return {
        access: entry.recorded.access,
        close() {
          entry.ended = true;
          own.entries.delete(entry);
          if (own.entries.size === 0 && groups.get(key) === own) groups.delete(key);
        },
      };
    },
    recheck,
    close() {
      closed = true;
      offChange();
      clearTimeout(timer);
      timer = undefined;
      groups.clear();
    },
  };
}

/** UNAUTHENTICATED for an open call whose credential is refused now (`refusal`: what a new call gets). */
function noLongerAuthenticated(refusal: LeaseholdError): LeaseholdError {
  const expired = refusal.reason === "TOKEN_EXPIRED" || refusal.reason === "CERT_EXPIRED";
  return new LeaseholdError(
    Code.Unauthenticated,
    `${refusal.message}; this call was opened with that credential and is ended: open it again with a valid credential`,
    {
      reason: expired ? refusal.reason : CREDENTIALS_REVOKED,
      metadata: { ...refusal.metadata, ...(expired ? {} : { refused_as: refusal.reason ?? "" }) },
    },
  );
}

/** PERMISSION_DENIED for an open call whose principal lost a right it checked (`denial` names it). */
function rightLost(denial: LeaseholdError): LeaseholdError {
  return new LeaseholdError(
    Code.PermissionDenied,
    `${denial.message}, which this call needs: the credentials or the policy changed since it opened, and it is ended`,
    { reason: denial.reason ?? PERMISSION_DENIED_REASON, metadata: denial.metadata },
  );
}

/** UNAUTHENTICATED at a credential's expiry, when checking it again told nothing. */
function expiredError(group: Group): LeaseholdError {
  const certificate = group.key.startsWith("cert:");
  return new LeaseholdError(
    Code.Unauthenticated,
    `the ${certificate ? "client certificate" : "token"} this call was opened with has expired; the call is ended: open it again with a valid credential`,
    { reason: certificate ? "CERT_EXPIRED" : "TOKEN_EXPIRED" },
  );
}
