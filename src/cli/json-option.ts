import { readFileSync } from "node:fs";
import { payloadViolations } from "../rpc/request-validator.js";
import { CliError, EXIT } from "./output.js";

/** Standard input, whole, as text. */
export async function readStdin(): Promise<string> {
  const parts: Buffer[] = [];
  for await (const part of process.stdin) parts.push(part as Buffer);
  return Buffer.concat(parts).toString("utf8");
}

/**
 * The JSON object a flag gives: written inline, or `@path` to read it from a
 * file (`@-`: standard input), as curl's `--data @file`. A result or payload
 * made by another program is then passed without quoting it for the shell.
 * Anything wrong is a usage error (exit 2) that names the flag, a JSON
 * object over the server's payload limits (1 MiB as JSON, …) included: it is
 * refused before it is sent, as the server would refuse it (or, past its
 * receive limit, grpc-js would, naming no flag).
 */
export async function jsonObjectOption(flag: string, text: string): Promise<Record<string, unknown>> {
  let json = text;
  if (text.startsWith("@")) {
    const path = text.slice(1);
    if (path === "")
      throw new CliError(`${flag}: give a file after @ (or @- for standard input)`, EXIT.usage);
    try {
      json = path === "-" ? await readStdin() : readFileSync(path, "utf8");
    } catch (error) {
      throw new CliError(`${flag} ${text}: cannot read it (${(error as Error).message})`, EXIT.usage);
    }
  }
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch (error) {
    const where = json === text ? "" : ` in ${text.slice(1) === "-" ? "standard input" : text.slice(1)}`;
    throw new CliError(`${flag}: not valid JSON${where} (${(error as Error).message})`, EXIT.usage);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new CliError(`${flag}: must be a JSON object`, EXIT.usage);
  const over = payloadViolations(flag, value);
  if (over.length > 0)
    throw new CliError(over.map((v) => `${v.field}: ${v.description}`).join("; "), EXIT.usage);
  return value as Record<string, unknown>;
}
