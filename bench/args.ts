import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { type ParseArgsConfig, parseArgs } from "node:util";
import { parseDuration } from "../src/config.js";

/**
 * `parseArgs` for a benchmark script, strict as it is, with a way out for
 * people: `--help` (or `-h`) prints the script's opening comment, which
 * says how to run it, and exits 0; a flag it does not know, or one missing
 * its value, prints what is wrong and exits 2, without a stack trace.
 * `scriptUrl` is the script's `import.meta.url`.
 */
export function benchArgs<T extends ParseArgsConfig>(
  scriptUrl: string,
  config: T,
): ReturnType<typeof parseArgs<T>> {
  const args = config.args ?? process.argv.slice(2);
  if (args.includes("--help") || args.includes("-h")) {
    process.stdout.write(usage(scriptUrl));
    process.exit(0);
  }
  try {
    return parseArgs(config);
  } catch (error) {
    return refuse((error as Error).message);
  }
}

/**
 * Ends the script as a flag it does not know does: `message` (which names
 * the flag) and the way to --help on stderr, exit 2. Scripts check their
 * flags with it before they start anything or make a temporary directory.
 */
export function refuse(message: string): never {
  process.stderr.write(`${message}\n(--help says how to run this benchmark)\n`);
  process.exit(2);
}

/** The value of a whole-number `flag` (e.g. "--actions"), at least `min`; anything else is refused. */
export function wholeNumberFlag(flag: string, text: string, min = 1): number {
  const n = Number(text);
  if (text.trim() === "" || !Number.isSafeInteger(n) || n < min)
    refuse(`${flag}: expected a whole number of at least ${min}, not ${JSON.stringify(text)}`);
  return n;
}

/** The value of `flag` when it is one of `choices`; anything else is refused. */
export function choiceFlag<C extends string>(flag: string, text: string, choices: readonly C[]): C {
  if (!(choices as readonly string[]).includes(text))
    refuse(`${flag}: expected one of ${choices.join(", ")}, not ${JSON.stringify(text)}`);
  return text as C;
}

/** A duration `flag` ("10s", "1500ms", as the server's options) in milliseconds; anything else is refused. */
export function durationFlag(flag: string, text: string): number {
  try {
    return parseDuration(flag, text);
  } catch (error) {
    return refuse((error as Error).message);
  }
}

/** The script's opening comment, without its comment marks. */
export function usage(scriptUrl: string): string {
  const source = readFileSync(fileURLToPath(scriptUrl), "utf8");
  const comment = /^\/\*\*\n([\s\S]*?)\n\s*\*\//.exec(source)?.[1] ?? "";
  return `${comment
    .split("\n")
    .map((line) => line.replace(/^ \* ?/, "").replace(/^ \*$/, ""))
    .join("\n")}\n`;
}
