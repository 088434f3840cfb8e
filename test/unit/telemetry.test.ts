import { describe, expect, it } from "vitest";
import { parseServerConfig } from "../../src/config.js";
import { parseTraceParent, tracesUrl } from "../../src/telemetry.js";

describe("tracing options", () => {
  it("takes an OTLP/HTTP collector URL, adding the traces path when it has none", () => {
    expect(parseServerConfig({}).otlpEndpoint).toBeUndefined();
    expect(parseServerConfig({ otlpEndpoint: "http://collector:4318" }).otlpEndpoint).toBe(
      "http://collector:4318",
    );
    expect(tracesUrl("http://collector:4318")).toBe("http://collector:4318/v1/traces");
    expect(tracesUrl("https://otel.example/custom/traces")).toBe("https://otel.example/custom/traces");
    for (const bad of ["collector:4318", "grpc://collector:4317", "http://"]) {
      expect(() => parseServerConfig({ otlpEndpoint: bad }), bad).toThrow(
        /^--otlp-endpoint: must be an http\(s\) URL of an OTLP\/HTTP collector/,
      );
    }
  });

  it("reads W3C traceparent values and ignores what is not one", () => {
    expect(parseTraceParent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).toEqual({
      traceId: "4bf92f3577b34da6a3ce929d0e0e4736",
      spanId: "00f067aa0ba902b7",
      traceFlags: 1,
      isRemote: true,
    });
    for (const bad of ["", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "garbage", undefined]) {
      expect(parseTraceParent(bad), String(bad)).toBeUndefined();
    }
  });
});
