import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { type ParseArgsConfig, parseArgs } from "node:util";

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
    process.stderr.write(`${(error as Error).message}\n(--help says how to run this benchmark)\n`);
    process.exit(2);
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
