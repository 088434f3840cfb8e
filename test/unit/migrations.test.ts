import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";

const folder = new URL("../../src/store/migrations/", import.meta.url);

// drizzle's migrator skips, without a word, a journal entry whose `when` is
// not above the last applied one; guard the journal against that.
describe("the migration journal", () => {
  const journal = JSON.parse(readFileSync(new URL("meta/_journal.json", folder), "utf8")) as {
    entries: { idx: number; when: number; tag: string }[];
  };

  it("has strictly increasing timestamps", () => {
    const whens = journal.entries.map((e) => e.when);
    expect(whens).toEqual([...whens].sort((a, b) => a - b));
    expect(new Set(whens).size).toBe(whens.length);
  });

  it("lists every SQL file, and only those", () => {
    const files = readdirSync(folder).filter((f) => f.endsWith(".sql"));
    expect(files.sort()).toEqual(journal.entries.map((e) => `${e.tag}.sql`).sort());
  });
});
