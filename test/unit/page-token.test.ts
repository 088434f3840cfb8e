import { describe, expect, it } from "vitest";
import {
  decodePageToken,
  decodeSequencePageToken,
  encodePageToken,
  pageSize,
} from "../../src/work/page-token.js";

describe("page tokens", () => {
  it("round-trip the cursor for the same filters", () => {
    const filter = { cluster: "a", state: "QUEUED" };
    expect(decodePageToken(encodePageToken("id-9", filter), { ...filter })).toEqual({ after: "id-9" });
    expect(decodePageToken("", filter)).toBeUndefined();
  });

  it("are refused with other filters or when forged", () => {
    const token = encodePageToken("id-9", { cluster: "a" });
    expect(() => decodePageToken(token, { cluster: "b" })).toThrow(
      /^page_token: was issued for different filters/,
    );
    expect(() => decodePageToken("%%%", {})).toThrow(/^page_token: is not a token this server issued/);
    expect(() => decodePageToken(Buffer.from("{}").toString("base64url"), {})).toThrow(
      /^page_token: is not a token/,
    );
  });

  it("refuse a forged key that could not be an id: NUL, a lone surrogate, or over 256 characters", () => {
    for (const key of ["a\u0000b", "\ud800", "k".repeat(257)]) {
      expect(() => decodePageToken(encodePageToken(key, {}), {})).toThrow(/^page_token: is not a token/);
    }
    expect(decodePageToken(encodePageToken("k".repeat(256), {}), {})).toEqual({ after: "k".repeat(256) });
  });

  it("of sequences carry a whole number, or are refused", () => {
    expect(decodeSequencePageToken(encodePageToken("42", {}), {})).toBe(42);
    expect(decodeSequencePageToken("", {})).toBe(0);
    for (const key of ["abc", "-1", "1e3", "4.5", "99999999999999999", ""]) {
      expect(() => decodeSequencePageToken(encodePageToken(key, {}), {})).toThrow(
        /^page_token: is not a token/,
      );
    }
  });

  it("default the page size to 100 and bound it to 1000", () => {
    expect(pageSize(0)).toBe(100);
    expect(pageSize(7)).toBe(7);
    expect(() => pageSize(1001)).toThrow(/^page_size: must be at most 1000/);
  });
});
