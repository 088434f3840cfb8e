import type { Logger } from "pino";
import { createBatcher } from "../../store/batcher.js";
import type { Clock } from "../../store/clock.js";
import type { Db } from "../../store/database.js";
import {
  type HelloInput,
  lostFirstSessionRace,
  type OpenedSession,
  openSession,
} from "../../store/queries/open-session.js";
import { type BatchOutcome, type HelloOfBatch, openSessions } from "../../store/queries/open-sessions.js";
import type { KeepHosted } from "../../store/queries/reap-sessions.js";
import { createGate } from "../gate.js";

/** Opens the sessions of validated hellos (SPEC rules 6 and 8: resume, take over, or start). */
export interface HelloOpener {
  /**
   * Opens or resumes the session `hello` asks for, as `principal`, who may
   * run its worker id in the clusters `mayRunIn` allows. Rejects with the
   * refusal (a session another principal owns, a worker of a cluster the
   * principal may not run it in…) or the database's error.
   */
  open(hello: HelloInput, principal: string, mayRunIn: (cluster: string) => boolean): Promise<OpenedSession>;
  /** Resolves once the hellos already received are opened. */
  close(): Promise<void>;
}

/** Hellos opened one transaction each at once, outside the batches. */
const ALONE_AT_ONCE = 8;
/**
 * Tries of a hello, or of a batch, whose transaction lost the race for a new
 * worker's first session ({@link lostFirstSessionRace}). The next try finds
 * the winner's session and answers as the rules say; only another session
 * started and ended in between could make it lose again.
 */
const RACE_TRIES = 3;

export function createHelloOpener(deps: {
  db: Db;
  clock: Clock;
  log: Logger;
  serverId: string;
  limits: { graceMs: number; partitionShare: number; maxSilenceMs: number };
  /** The renewal's promise about hosted deadlines, for a hello that finds its earlier session due. */
  keepHosted: () => KeepHosted | undefined;
}): HelloOpener {
  const { db, clock, log, serverId, limits } = deps;
  const { graceMs } = limits;
  /**
   * One hello the common way, or the way of a batch that failed as a whole.
   * One that raced another hello for the worker's first session is tried
   * again: its answer is the winner's (WORKER_ID_IN_USE for another instance,
   * a takeover for the same), never the unique violation.
   */
  const openAlone = async (b: HelloOfBatch) => {
    for (let attempt = 1; ; attempt++) {
      try {
        return await openSession(
          db,
          clock,
          serverId,
          limits,
          b.hello,
          b.principal,
          b.mayRunIn,
          deps.keepHosted(),
        );
      } catch (error) {
        if (attempt >= RACE_TRIES || !lostFirstSessionRace(error)) throw error;
        log.debug(
          { workerId: b.hello.workerId, attempt },
          "another hello started the worker's session first; opening this one again",
        );
      }
    }
  };
  /**
   * Hellos a batch leaves alone, opened at most {@link ALONE_AT_ONCE} at a time
   * (each holds a pooled connection) and outside the batches, so that the
   * hellos a batch opened are answered at once and the next batch goes on.
   */
  const aloneGate = createGate(ALONE_AT_ONCE);
  const alone = async (b: HelloOfBatch): Promise<OpenedSession | Error> => {
    const release = await aloneGate.enter();
    try {
      return await openAlone(b);
    } catch (error) {
      return error as Error;
    } finally {
      release();
    }
  };
  /**
   * Hellos arriving while a batch is being opened are opened together in the
   * next (group commit, as for reports): thousands of workers reconnecting at
   * once cost a few transactions, not one each. A hello left alone resolves
   * with the promise of its own transaction.
   */
  type Opened = OpenedSession | Error;
  const opens = createBatcher<HelloOfBatch, Opened | Promise<Opened>>(async (batch) => {
    let outcomes: BatchOutcome[] | undefined;
    for (let attempt = 1; outcomes === undefined; attempt++) {
      try {
        outcomes = await openSessions(db, clock, serverId, graceMs, batch);
      } catch (error) {
        const raced = lostFirstSessionRace(error);
        // A hello of the batch raced another (on this server or another) for a new worker's first
        // session, and the batch wrote nothing: tried again, it finds that session and answers as
        // the rules say, and the batch's other hellos are opened with it.
        if (raced && attempt < RACE_TRIES) {
          log.debug(
            { hellos: batch.length, attempt },
            "a hello of the batch raced another; opening the batch again",
          );
          continue;
        }
        // A deadlock with another process, or races again and again: each hello goes alone (a
        // hello alone tries a race again too), and fails alone if it must.
        if (batch.length === 1 && !raced) throw error;
        log.warn({ err: error, hellos: batch.length }, "a batch of hellos failed; opening them one by one");
        outcomes = batch.map(() => ({ alone: true }));
      }
    }
    return outcomes.map((outcome, i) => {
      if ("opened" in outcome) return outcome.opened;
      if ("refused" in outcome) return outcome.refused;
      return alone(batch[i] as HelloOfBatch);
    });
  });

  return {
    async open(hello, principal, mayRunIn) {
      const opened = await opens.add({ hello, principal, mayRunIn });
      if (opened instanceof Error) throw opened;
      return opened;
    },
    close: () => opens.close(),
  };
}
