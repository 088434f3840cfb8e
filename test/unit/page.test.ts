import { describe, expect, it } from "vitest";
import { PAGE_BYTES, toPage } from "../../src/work/page.js";
import { decodePageToken } from "../../src/work/page-token.js";

describe("a page", () => {
  const rows = ["a", "b", "c", "d"];
  const lastKey = (token: string) => decodePageToken(token, {})?.after;

  it("ends before its items' size passes PAGE_BYTES, and points after its last item", () => {
    const page = toPage(rows, 3, (r) => r, {}, { sizeOf: () => PAGE_BYTES / 2 });
    expect(page.items).toEqual(["a", "b"]);
    expect(lastKey(page.nextPageToken)).toBe("b");
  });

  it("holds one item even when that one is larger", () => {
    const page = toPage(rows, 3, (r) => r, {}, { sizeOf: () => PAGE_BYTES + 1 });
    expect(page.items).toEqual(["a"]);
    expect(lastKey(page.nextPageToken)).toBe("a");
  });

  it("has more after it when the store stopped reading early, and is the last otherwise", () => {
    expect(lastKey(toPage(["a"], 3, (r) => r, {}, { more: true }).nextPageToken)).toBe("a");
    expect(toPage(["a", "b"], 3, (r) => r, {}).nextPageToken).toBe("");
    expect(lastKey(toPage(rows, 3, (r) => r, {}).nextPageToken)).toBe("c");
  });
});
