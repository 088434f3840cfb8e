import { afterEach, describe, expect, it, vi } from "vitest";
import { listUpTo } from "../../src/cli/output.js";

/** A List call over `total` numbered items, recording the page sizes asked for. */
function listing(total: number) {
  const asked: number[] = [];
  const call = async ({ pageSize, pageToken }: { pageSize: number; pageToken: string }) => {
    asked.push(pageSize);
    const from = pageToken === "" ? 0 : Number(pageToken);
    const items = Array.from({ length: Math.min(pageSize, total - from) }, (_, i) => from + i);
    const next = from + items.length;
    return { items, nextPageToken: next < total ? String(next) : "" };
  };
  return { asked, call };
}

describe("listUpTo", () => {
  afterEach(() => {
    vi.restoreAllMocks();
  });
  const stderr = () => {
    const lines: string[] = [];
    vi.spyOn(process.stderr, "write").mockImplementation((chunk) => {
      lines.push(String(chunk));
      return true;
    });
    return lines;
  };

  it("reads pages of at most 1,000 until the limit, and says when more are left", async () => {
    const said = stderr();
    const { asked, call } = listing(3000);
    const items = await listUpTo(2500, call, (r) => r.items, { order: "oldest", noun: "lease" });
    expect(items).toEqual(Array.from({ length: 2500 }, (_, i) => i));
    expect(asked).toEqual([1000, 1000, 500]);
    expect(said).toEqual(["leasehold: showing the oldest 2500 leases; there are more (raise --limit)\n"]);
  });

  it("counts one item in the singular", async () => {
    const said = stderr();
    await listUpTo(1, listing(2).call, (r) => r.items, { order: "newest", noun: "event" });
    expect(said).toEqual(["leasehold: showing the newest 1 event; there are more (raise --limit)\n"]);
  });

  it("stops at the last page without a word when everything fit", async () => {
    const said = stderr();
    const { asked, call } = listing(1200);
    expect(await listUpTo(5000, call, (r) => r.items, { order: "first", noun: "worker" })).toHaveLength(1200);
    expect(asked).toEqual([1000, 1000]);
    expect(said).toEqual([]);
  });
});
