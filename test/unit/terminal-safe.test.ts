import { describe, expect, it } from "vitest";
import { terminalSafe, toJson } from "../../src/cli/output.js";

describe("terminalSafe", () => {
  it("shows C0, DEL and C1 control characters escaped, so text cannot drive the terminal", () => {
    expect(terminalSafe("a\u001b[2Jb\u0007c\u0000d\u007fe\u009b31mf\u0085g")).toBe(
      "a\\x1b[2Jb\\x07c\\x00d\\x7fe\\x9b31mf\\x85g",
    );
    // A carriage return would let a value overwrite what was printed before it on the line.
    expect(terminalSafe("fine\rEVIL")).toBe("fine\\rEVIL");
  });

  it("keeps a value on one line, showing its newlines and tabs", () => {
    expect(terminalSafe("one\ntwo\tthree")).toBe("one\\ntwo\\tthree");
  });

  it("keeps newlines and tabs in text meant to span lines, and escapes the rest", () => {
    expect(terminalSafe("problems:\n\tone\r\u001b[1A", "lines")).toBe("problems:\n\tone\\r\\x1b[1A");
  });

  it("shows the bidirectional overrides and isolates escaped, so text cannot show in another order", () => {
    expect(terminalSafe("lease-\u202egpj.exe")).toBe("lease-\\u202egpj.exe");
    expect(terminalSafe("a\u2066b\u2069c\u200fd\u061ce", "lines")).toBe("a\\u2066b\\u2069c\\u200fd\\u061ce");
    // Other format characters, such as the zero-width joiner of an emoji sequence, stay.
    expect(terminalSafe("👩\u200d💻")).toBe("👩\u200d💻");
  });

  it("leaves printable text alone, beyond ASCII too", () => {
    const text = 'a lease "é-测试-🚀" ~ {[ ]} \\x1b';
    expect(terminalSafe(text)).toBe(text);
  });
});

describe("toJson", () => {
  it("writes DEL, C1 control and bidirectional characters as JSON escapes: the same value, nothing raw", () => {
    const value = { label: "a\u001b[2J\u007f\u009b\u0085é\u202e" };
    const text = toJson(value);
    expect(text).toBe('{"label":"a\\u001b[2J\\u007f\\u009b\\u0085é\\u202e"}');
    expect(JSON.parse(text)).toEqual(value);
  });
});
