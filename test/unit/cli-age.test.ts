import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { describe, expect, it } from "vitest";
import { age } from "../../src/cli/output.js";

describe("the CLI's ages (workers list's LAST SEEN)", () => {
  const now = new Date(Date.UTC(2026, 11, 7, 12));
  const earlier = (ms: number) => age(timestampFromDate(new Date(now.getTime() - ms)), now);

  it("say how long ago a time was, in its largest whole unit from two of them", () => {
    expect(earlier(3_400)).toBe("3s ago");
    expect(earlier(119_000)).toBe("119s ago");
    expect(earlier(5 * 60_000 + 10_000)).toBe("5m ago");
    expect(earlier(3 * 3_600_000)).toBe("3h ago");
    expect(earlier(4 * 86_400_000)).toBe("4d ago");
  });

  it("say 0s for a time a little ahead of this machine's clock, and - for none", () => {
    expect(earlier(-800)).toBe("0s ago");
    expect(age(undefined, now)).toBe("-");
  });
});
