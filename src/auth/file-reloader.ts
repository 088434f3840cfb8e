import { readFileSync } from "node:fs";
import { open } from "node:fs/promises";
import type { Logger } from "pino";
import { LeaseholdError } from "../errors.js";

/**
 * What a reload did: `applied` new contents, found nothing new
 * (`unchanged`), found new contents it refused (`rejected`: the old ones
 * stay in force), or found contents that changed since the last look
 * (`pending`: they may still be being written; the next look that finds them
 * as they are judges them).
 */
export type ReloadOutcome = "applied" | "unchanged" | "rejected" | "pending";

/**
 * Credential files are small (PEMs, a JWKS, a token list); a bigger file is
 * the wrong file, and reading it every poll would cost.
 */
export const MAX_CREDENTIAL_FILE_BYTES = 1024 * 1024;

/** How often credential files are looked at by default. */
export const DEFAULT_POLL_MS = 1000;

/**
 * Reads a credential file at start; a missing, unreadable or oversized file
 * is INVALID_ARGUMENT naming `flag` and the path.
 */
export function readCredentialFileSync(path: string, flag: string): Buffer {
  let content: Buffer;
  try {
    content = readFileSync(path);
  } catch (error) {
    throw LeaseholdError.invalidArgument(flag, `cannot read ${path}: ${(error as Error).message}`);
  }
  if (content.length > MAX_CREDENTIAL_FILE_BYTES)
    throw LeaseholdError.invalidArgument(flag, tooBig(path, content.length));
  return content;
}

const tooBig = (path: string, bytes: number) =>
  `${path} has ${bytes} bytes, more than the ${MAX_CREDENTIAL_FILE_BYTES} a credential file may have; is it the right file?`;

/** Options of {@link createFileReloader}. */
export interface FileReloaderOptions<T> {
  /** The files, read together; `parse` gets their contents in this order. */
  readonly files: readonly string[];
  /** What was read at start (and is in force), in the order of `files`. */
  readonly initial: readonly Buffer[];
  /**
   * Builds the new value from all contents, or throws with a message that
   * names the bad file. Must not have side effects: a throw keeps the old value.
   */
  readonly parse: (contents: readonly Buffer[]) => T;
  /** Puts a parsed value in force. */
  readonly apply: (value: T, contents: readonly Buffer[]) => void;
  readonly log: Logger;
  /** What the files hold, for log lines ("TLS certificate", "static tokens"). */
  readonly what: string;
  /** Poll interval; {@link DEFAULT_POLL_MS} by default; 0 turns polling off. */
  readonly pollMs?: number | undefined;
}

/** Re-reads a set of files on demand and on a poll. */
export interface FileReloader {
  /**
   * Looks at the files now: applies them if they changed, the previous look
   * read them just as they are, and they are valid (see {@link createFileReloader}).
   */
  reload(): Promise<ReloadOutcome>;
  /**
   * Calls `listener` each time new contents are put in force (after
   * `apply`), e.g. to check open streams against them. Returns its off.
   */
  onApplied(listener: () => void): () => void;
  /** Stops polling; later reloads do nothing. */
  close(): void;
}

const sameContents = (a: readonly Buffer[], b: readonly Buffer[]) =>
  a.length === b.length && a.every((buffer, i) => b[i]?.equals(buffer));

/** What one look read: each file's contents, and its size and modification time before the read. */
interface Snapshot {
  readonly contents: Buffer[];
  readonly stamps: string[];
}

const sameSnapshot = (a: Snapshot, b: Snapshot) =>
  sameContents(a.contents, b.contents) && a.stamps.every((stamp, i) => b.stamps[i] === stamp);

async function readSnapshot(files: readonly string[]): Promise<Snapshot> {
  const read = await Promise.all(
    files.map(async (file) => {
      const handle = await open(file, "r");
      try {
        const { size, mtimeMs } = await handle.stat();
        if (size > MAX_CREDENTIAL_FILE_BYTES) throw new Error(tooBig(file, size));
        const content = await handle.readFile();
        if (content.length > MAX_CREDENTIAL_FILE_BYTES) throw new Error(tooBig(file, content.length));
        return { content, stamp: `${size}@${mtimeMs}` };
      } finally {
        await handle.close();
      }
    }),
  );
  return { contents: read.map((r) => r.content), stamps: read.map((r) => r.stamp) };
}

/**
 * Polls `files` and applies their contents when they change and then stay
 * as they are.
 *
 * Changes are found by comparing contents, not modification times: the files
 * are small, mtime can be coarse, and rotations by rename or by a symlink
 * swap (Kubernetes secret volumes) can leave an old mtime behind.
 *
 * A file written in place can be read while it is being written, and what
 * has been written of it so far may well parse: a policy cut after a
 * binding's `role:` line is valid YAML. So a change is judged only when two
 * looks in a row (a poll apart) read the same contents, sizes and
 * modification times: the first look that finds new contents reports
 * `pending`, the next one applies them if nothing moved in between. A change
 * is thus applied within two polls of its last write, and a writer that
 * stops for longer than a poll halfway through is not caught; writing a new
 * file and renaming it into place is the way that is never read half done.
 * The first contents, read at start by the caller, are applied at once.
 *
 * A change that fails to read or to parse (a half-written file, a key that
 * does not match its certificate yet) is logged once and the old value stays;
 * the next change is tried again, so a rotation written in several steps is
 * applied once it is complete. Reloads run one at a time.
 */
export function createFileReloader<T>(options: FileReloaderOptions<T>): FileReloader {
  const { files, log, what } = options;
  let applied: readonly Buffer[] = options.initial;
  // What the last look saw (a snapshot, or a read error), and whether it was
  // judged: a state already judged is not judged (nor warned about) again.
  let seen: Snapshot | string | undefined;
  let judged = false;
  let closed = false;
  let queue: Promise<unknown> = Promise.resolve();
  const listeners = new Set<() => void>();

  const look = async (): Promise<ReloadOutcome> => {
    if (closed) return "unchanged";
    let snapshot: Snapshot;
    try {
      snapshot = await readSnapshot(files);
    } catch (error) {
      const message = (error as Error).message;
      if (seen === message) return "unchanged";
      seen = message;
      log.warn({ files }, `${what}: cannot read the files (${message}); keeping the current one`);
      return "rejected";
    }
    if (closed) return "unchanged";
    const previous = seen;
    seen = snapshot;
    if (sameContents(applied, snapshot.contents)) return "unchanged";
    if (previous === undefined || typeof previous === "string" || !sameSnapshot(previous, snapshot)) {
      judged = false;
      return "pending";
    }
    if (judged) return "unchanged";
    judged = true;
    let value: T;
    try {
      value = options.parse(snapshot.contents);
    } catch (error) {
      log.warn(
        { files },
        `${what}: the changed files are not valid, keeping the current one (${(error as Error).message})`,
      );
      return "rejected";
    }
    options.apply(value, snapshot.contents);
    applied = snapshot.contents;
    for (const listener of [...listeners]) {
      try {
        listener();
      } catch (error) {
        log.error({ err: error }, `${what}: a listener of the reload failed`);
      }
    }
    return "applied";
  };

  const reload = () => {
    const run = queue.then(look);
    queue = run.catch(() => {});
    return run;
  };

  const pollMs = options.pollMs ?? DEFAULT_POLL_MS;
  const timer =
    pollMs > 0
      ? setInterval(() => {
          reload().catch((error: unknown) => log.error({ err: error }, `${what}: reload failed`));
        }, pollMs)
      : undefined;
  // The poll never keeps the process alive on its own.
  timer?.unref();

  return {
    reload,
    onApplied(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    close() {
      closed = true;
      listeners.clear();
      if (timer) clearInterval(timer);
    },
  };
}
