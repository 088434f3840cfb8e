import { readFileSync } from "node:fs";
import type { Command } from "commander";
import { describe, expect, it } from "vitest";
import { serveCommand } from "../../src/cli/serve-command.js";
import { createProgram } from "../../src/main.js";
import {
  addBuildInfo,
  addLargeCallMetrics,
  addProcessMetrics,
  addUnaryCallMetrics,
  createCallMetrics,
  createMetrics,
} from "../../src/metrics.js";

/**
 * README.md's Configuration and Metrics tables against the code: a flag,
 * variable or metric added to one and not the other fails here. (Nothing
 * compared them before, so `--max-unary-calls` and the unary-call metrics
 * reached `serve --help` and `/metrics` without reaching the README.)
 */
const readme = readFileSync(new URL("../../README.md", import.meta.url), "utf8");

/** The lines of the table that follows a heading, up to the first line after it that is not a row. */
function tableUnder(heading: string): string[][] {
  const lines = readme.slice(readme.indexOf(`\n${heading}\n`)).split("\n");
  const start = lines.findIndex((line) => line.startsWith("| "));
  const rows: string[][] = [];
  for (const line of lines.slice(start + 2)) {
    if (!line.startsWith("|")) break;
    // Cells split at pipes not escaped as `\|` (as in `<file\|url>`).
    rows.push(
      line
        .slice(1, -1)
        .split(/(?<!\\)\|/)
        .map((cell) => cell.trim()),
    );
  }
  return rows;
}

/** What stands between backticks in a cell. */
const quoted = (cell: string) => [...cell.matchAll(/`([^`]+)`/g)].map((m) => m[1] as string);

describe("the README's tables", () => {
  it("the Configuration table lists every flag of serve --help with its variable, and nothing else", () => {
    const fromReadme = tableUnder("## Configuration")
      .map(([flag = "", variable = ""]) => `${quoted(flag)[0]?.split(" ")[0]} ${quoted(variable)[0]}`)
      .sort();
    const fromHelp = serveCommand()
      .options.map((option) => `${option.long} ${option.envVar}`)
      .sort();
    expect(fromReadme).toEqual(fromHelp);
  });

  it("the Metrics table lists every metric /metrics serves, and the ones served before the database is ready", () => {
    const calls = createCallMetrics();
    const counts = { running: 0, waiting: 0 };
    addLargeCallMetrics(calls.registry, { counts });
    addUnaryCallMetrics(calls.registry, { counts, refused: 0 });
    const stopSampling = addProcessMetrics(calls.registry);
    addBuildInfo(calls.registry, "0.0.0", "unknown");
    try {
      const early = calls.registry.getMetricsAsArray().map((metric) => metric.name);
      const all = createMetrics(
        {
          hosted: () => ({ workers: 0, leases: 0, streamsHeldBack: 0, dispatchWaitingMs: 0 }) as never,
          databaseUp: () => true,
          inGrace: async () => 0,
          pausedClusters: async () => 0,
          actions: async () => [],
          clusterHealth: async () => [],
        },
        calls.registry,
      )
        .registry.getMetricsAsArray()
        .map((metric) => metric.name);
      const documented = tableUnder("### Metrics")
        .flatMap(([names = ""]) => quoted(names))
        .map((name) => name.replace(/\{.*\}$/, ""));
      expect([...documented].sort()).toEqual([...new Set(all)].sort());
      // "until the database is ready it serves only the `grpc_server_*`, … metrics."
      const sentence = /until the database is ready it serves only ([^.]+)\./.exec(
        readme.replace(/\n/g, " "),
      );
      const patterns = quoted(sentence?.[1] ?? "").map(
        (pattern) => new RegExp(`^${pattern.replace(/\*/g, ".*")}$`),
      );
      expect(patterns.length).toBeGreaterThan(0);
      for (const name of early)
        expect(
          patterns.some((p) => p.test(name)),
          name,
        ).toBe(true);
      for (const name of all.filter((n) => !early.includes(n)))
        expect(
          patterns.some((p) => p.test(name)),
          name,
        ).toBe(false);
    } finally {
      stopSampling();
    }
  });

  it("the command table names every option of every command but serve (whose are in Configuration)", () => {
    const rows = readme
      .slice(readme.indexOf("\n## The command line\n"))
      .split("\n")
      .filter((line) => line.startsWith("| `leasehold "));
    const missing: string[] = [];
    const visit = (command: Command, path: string[]) => {
      for (const sub of command.commands) visit(sub, [...path, sub.name()]);
      if (command.commands.length > 0 || path.length === 0 || path[0] === "serve") return;
      // The rows that name the command: its group and its own name.
      const text = rows.filter((row) => path.every((word) => row.includes(word))).join(" ");
      for (const option of command.options) {
        if (option.hidden) continue;
        // Any of its names (`--label, --labels`).
        const names = option.flags.match(/--[a-z-]+/g) ?? [];
        if (!names.some((name) => text.includes(name))) missing.push(`${path.join(" ")} ${option.flags}`);
      }
    };
    visit(createProgram(), []);
    expect(missing).toEqual([]);
  });
});
