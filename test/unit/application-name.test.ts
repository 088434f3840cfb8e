import { describe, expect, it } from "vitest";
import { processApplicationName, withoutApplicationName } from "../../src/store/database.js";
import { OWN_NAME } from "../../src/work/cluster-bus.js";

describe("a process's application_name", () => {
  const id = "01a24f07-6f98-7e07-b643-dd47d299d17e";

  it("is its own, after the one configured, cut so that PostgreSQL shows the whole (63 bytes)", () => {
    expect(processApplicationName(undefined, id)).toBe(`leasehold/${id}`);
    expect(processApplicationName("tchaos", id)).toBe(`tchaos leasehold/${id}`);
    const long = processApplicationName("a-very-long-name-some-dba-gave-to-every-client", id);
    expect(long).toBe(`a-very-long-name leasehold/${id}`);
    expect(Buffer.byteLength(long)).toBeLessThanOrEqual(63);
    expect(processApplicationName("émile", id)).toBe(`?mile leasehold/${id}`);
    for (const name of [undefined, "tchaos", "a-very-long-name-some-dba-gave-to-every-client"])
      expect(OWN_NAME.test(processApplicationName(name, id))).toBe(true);
  });

  it("is taken out of the URL, which postgres.js would let win", () => {
    expect(withoutApplicationName("postgres://u@h:5432/db")).toEqual({
      url: "postgres://u@h:5432/db",
      configured: undefined,
    });
    expect(withoutApplicationName("postgres://u@h:5432/db?application_name=tchaos")).toEqual({
      url: "postgres://u@h:5432/db",
      configured: "tchaos",
    });
    expect(withoutApplicationName("postgres://u@h1,h2/db?sslmode=require&application_name=a%20b")).toEqual({
      url: "postgres://u@h1,h2/db?sslmode=require",
      configured: "a b",
    });
  });
});
