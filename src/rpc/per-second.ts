/**
 * A cap on how often something is done, such as writing a log line a hostile
 * client can cause: `limited(fn)` calls `fn` at most `times` times in each
 * second of the wall clock. The calls it skips are counted, and the next call
 * of `fn` gets their number (0 when none were skipped), so that a log line can
 * say how many lines it stands for.
 */
export function perSecond(times: number): (fn: (skippedBefore: number) => void) => void {
  let second = 0;
  let done = 0;
  let skipped = 0;
  return (fn) => {
    const now = Math.floor(Date.now() / 1000);
    if (now !== second) {
      second = now;
      done = 0;
    }
    if (done >= times) {
      skipped += 1;
      return;
    }
    done += 1;
    const before = skipped;
    skipped = 0;
    fn(before);
  };
}
