import { expect } from "vitest";

/** A decoder of the binary format: a message, undefined for "not mine", or a throw. */
export type Decode = (bytes: Buffer) => unknown;

/** Whether `fast` decoded `bytes`; when it did, it must give exactly what `ordinary` gives. */
export function agreesWith(fast: Decode, ordinary: Decode, bytes: Buffer, what: string): boolean {
  const decoded = fast(bytes);
  if (decoded === undefined) return false;
  expect(decoded, what).toStrictEqual(ordinary(bytes));
  return true;
}

/**
 * A fast decoder never gives anything but what `ordinary` gives: for every
 * cut of each sample, and 2,000 random changes to its bytes, it declines or
 * gives the same message, and it declines what `ordinary` cannot read.
 */
export function expectNeverDiffers(
  samples: readonly Buffer[],
  fast: Decode,
  ordinary: Decode,
  seed: number,
): void {
  let decoded = 0;
  let declined = 0;
  const random = () => {
    seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
    return seed / 2 ** 31;
  };
  for (const bytes of samples) {
    for (let cut = 0; cut < bytes.length; cut++) {
      if (agreesWith(fast, ordinary, bytes.subarray(0, cut), `cut at ${cut}`)) decoded++;
      else declined++;
    }
    for (let i = 0; i < 2000; i++) {
      let changed = Buffer.from(bytes);
      for (let k = 1 + Math.floor(random() * 3); k > 0; k--) {
        const at = Math.floor(random() * changed.length);
        // Every other case inserts bytes instead of replacing them, often varint continuations
        // (0x80): overlong tags and lengths, which replacing alone never makes.
        if (i % 2 === 0) changed[at] = Math.floor(random() * 256);
        else {
          const inserted = random() < 0.5 ? 0x80 : Math.floor(random() * 256);
          changed = Buffer.concat([changed.subarray(0, at), Buffer.from([inserted]), changed.subarray(at)]);
        }
      }
      const what = changed.toString("hex");
      let readable = true;
      try {
        ordinary(changed);
      } catch {
        readable = false;
      }
      if (!readable) expect(fast(changed), what).toBeUndefined();
      else if (agreesWith(fast, ordinary, changed, what)) decoded++;
      else declined++;
    }
  }
  // Both branches ran: the property is not vacuous.
  expect(decoded).toBeGreaterThan(100);
  expect(declined).toBeGreaterThan(100);
}
