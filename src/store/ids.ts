import { getRandomValues } from "node:crypto";
import { V7Generator } from "uuidv7";

/**
 * Random words for {@link uuidv7}, drawn from the system's CSPRNG 256 at a
 * time: the library's default draws 8 at a time, and a bulk submit of 1,000
 * actions then spent more time asking the kernel than making its ids.
 */
const random = {
  buffer: new Uint32Array(256),
  cursor: 256,
  nextUint32(): number {
    if (this.cursor === this.buffer.length) {
      getRandomValues(this.buffer);
      this.cursor = 0;
    }
    return this.buffer[this.cursor++] as number;
  },
};

const generator = new V7Generator(random);

/**
 * A new UUIDv7 string: time-ordered (index inserts land at the right edge),
 * monotonic within this process, 74 random bits.
 */
export const uuidv7 = (): string => generator.generate().toString();
