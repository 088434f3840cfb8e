import type { Access } from "../auth/access.js";
import { addressOfPeer } from "./calls-per-address.js";

/**
 * Who sent a call, as the queues of calls waiting their turn tell callers
 * apart (unary-calls.ts, large-calls.ts): its authenticated principal, else
 * (authentication off) its peer's address. The unary handler knows both when
 * a call asks for a turn: the principal from the access the call
 * authorization interceptor gave it as it started, the peer from grpc-js.
 */
export interface Caller {
  /** `principal:<name>` or `address:<ip>`: calls of one key share one turn of the queue. */
  readonly key: string;
  /** The authenticated principal; undefined when authentication is off. */
  readonly principal: string | undefined;
  /** grpc-js's peer ("host:port"). */
  readonly peer: string;
  /** The method, "leasehold.v1.ActionService/ListActions". */
  readonly method: string;
}

/** The caller of a call whose access and peer these are. */
export function callerOf(access: Pick<Access, "actor" | "enforced">, peer: string, method: string): Caller {
  const principal = access.enforced ? access.actor : undefined;
  return {
    key: principal === undefined ? `address:${addressOfPeer(peer)}` : `principal:${principal}`,
    principal,
    peer,
    method,
  };
}

/** A caller for tests and for callers of the limits that do not tell callers apart. */
export const ANY_CALLER: Caller = Object.freeze({
  key: "",
  principal: undefined,
  peer: "",
  method: "",
});

/**
 * Calls waiting their turn, taken round-robin across callers: each caller's
 * calls in the order they came, and the callers in turn, one call each. A
 * caller with a thousand calls waiting takes one turn in each round, as a
 * caller with one does: the one call waits for at most one call of each
 * other caller, not for the whole of another's backlog. Every operation is a
 * Map lookup and an array push or shift, but {@link largest}, which looks at
 * every caller (callers with calls waiting: at most as many as wait).
 */
export class FairQueue<T> {
  /** Each caller's waiting calls, oldest first; the Map's order is the round (the next caller first). */
  private readonly byCaller = new Map<string, T[]>();
  private count = 0;

  /** Calls waiting, of every caller. */
  get size(): number {
    return this.count;
  }

  /** Callers with calls waiting. */
  get callers(): number {
    return this.byCaller.size;
  }

  /** Calls of `key` waiting. */
  waitingOf(key: string): number {
    return this.byCaller.get(key)?.length ?? 0;
  }

  /** Queues `entry` behind the calls of its caller; a caller with none waiting joins the round last. */
  push(key: string, entry: T): void {
    const calls = this.byCaller.get(key);
    if (calls) calls.push(entry);
    else this.byCaller.set(key, [entry]);
    this.count += 1;
  }

  /** The oldest call of the caller whose turn it is; the caller goes to the end of the round. */
  shift(): T | undefined {
    const next = this.byCaller.entries().next();
    if (next.done) return undefined;
    const [key, calls] = next.value;
    const entry = calls.shift() as T;
    this.count -= 1;
    this.byCaller.delete(key);
    if (calls.length > 0) this.byCaller.set(key, calls);
    return entry;
  }

  /** Takes `entry` of `key` out of the queue (a call that ended while it waited); false if not there. */
  remove(key: string, entry: T): boolean {
    const calls = this.byCaller.get(key);
    const at = calls ? calls.indexOf(entry) : -1;
    if (!calls || at < 0) return false;
    calls.splice(at, 1);
    this.count -= 1;
    if (calls.length === 0) this.byCaller.delete(key);
    return true;
  }

  /** Takes the newest call of `key` out of the queue. */
  popNewest(key: string): T | undefined {
    const calls = this.byCaller.get(key);
    if (!calls) return undefined;
    const entry = calls.pop();
    this.count -= 1;
    if (calls.length === 0) this.byCaller.delete(key);
    return entry;
  }

  /** The caller with the most calls waiting (the first in the round of those with as many), and how many. */
  largest(): { readonly key: string; readonly waiting: number } | undefined {
    let most: { key: string; waiting: number } | undefined;
    for (const [key, calls] of this.byCaller) {
      if (!most || calls.length > most.waiting) most = { key, waiting: calls.length };
    }
    return most;
  }
}
