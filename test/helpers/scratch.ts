import { accessSync, constants, statfsSync, statSync } from "node:fs";
import { tmpdir } from "node:os";

/**
 * Where tests put PGlite data directories: `/dev/shm` (memory) where the
 * machine has one we may write to, else the system temp dir. Every test
 * server on PGlite starts from a copy of a 40 MB directory and writes to it;
 * on a disk the copy alone took 0.2–0.8 s a server in CI's PGlite pass, in
 * memory about 0.15 s. What PGlite does with the files is the same. Not
 * when it has less than 2 GiB free (Docker gives containers 64 MiB).
 */
export function scratchDir(): string {
  try {
    if (statSync("/dev/shm").isDirectory()) {
      accessSync("/dev/shm", constants.W_OK);
      const { bavail, bsize } = statfsSync("/dev/shm");
      if (bavail * bsize >= 2 * 1024 ** 3) return "/dev/shm";
    }
  } catch {
    // No /dev/shm (macOS, Windows) or not ours to write: the temp dir.
  }
  return tmpdir();
}
