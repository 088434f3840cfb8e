import {
  type Attributes,
  DiagLogLevel,
  diag,
  isSpanContextValid,
  ROOT_CONTEXT,
  type Span,
  type SpanContext,
  SpanKind,
  type TracerProvider,
  trace,
} from "@opentelemetry/api";
import type { Logger } from "pino";

/**
 * The server's spans (OpenTelemetry), linked across processes by W3C trace
 * context: a client's `traceparent` metadata parents the submit span, the
 * submit span's context is stored with the action and parents its grant
 * spans, a grant carries its span's context to the agent, and a completion
 * carries the agent's back to the report span. Off by default: then nothing
 * is made, stored or sent, and the hot path pays one boolean test.
 */
export interface Tracing {
  readonly enabled: boolean;
  /** Starts a span, a child of `parent` (a W3C traceparent) when it is one, else a root. */
  start(name: string, parent: string | null | undefined, attributes: Attributes, kind?: SpanKind): Span;
  /** Flushes the spans not exported yet and stops the exporter. */
  close(): Promise<void>;
}

/** Tracing off: {@link Tracing.start} is never to be called (callers test `enabled`). */
export const NO_TRACING: Tracing = {
  enabled: false,
  start: () => trace.wrapSpanContext({ traceId: "", spanId: "", traceFlags: 0 }),
  close: async () => {},
};

const TRACE_PARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

/** The span context a W3C `traceparent` value names; undefined when it is not a valid one (ignored, as W3C says). */
export function parseTraceParent(value: string | null | undefined): SpanContext | undefined {
  const match = value ? TRACE_PARENT.exec(value.trim()) : null;
  if (!match) return undefined;
  const context: SpanContext = {
    traceId: match[1] as string,
    spanId: match[2] as string,
    traceFlags: Number.parseInt(match[3] as string, 16),
    isRemote: true,
  };
  return isSpanContextValid(context) ? context : undefined;
}

/** The W3C `traceparent` value of a span. */
export function traceParentOf(span: Span): string {
  const c = span.spanContext();
  return `00-${c.traceId}-${c.spanId}-${c.traceFlags.toString(16).padStart(2, "0")}`;
}

/** Tracing that makes spans with `provider`'s tracer (tests pass an in-memory one). */
export function tracingWith(provider: TracerProvider & { shutdown?(): Promise<void> }): Tracing {
  const tracer = provider.getTracer("leasehold");
  return {
    enabled: true,
    start(name, parent, attributes, kind = SpanKind.INTERNAL) {
      const context = parseTraceParent(parent);
      const parentContext = context ? trace.setSpanContext(ROOT_CONTEXT, context) : ROOT_CONTEXT;
      return tracer.startSpan(name, { kind, attributes }, parentContext);
    },
    close: async () => provider.shutdown?.(),
  };
}

/** Who makes the spans: OpenTelemetry's resource attributes `service.*`. */
export interface TracingService {
  /** `service.name`; default `leasehold`. */
  readonly name?: string;
  /** `service.instance.id`: the server id, which every log line and session's `server_id` carry too. */
  readonly instanceId: string;
  /** `service.version`: the package version. */
  readonly version: string;
}

/** The resource attributes of a server's spans. */
export function serviceAttributes(service: TracingService): Attributes {
  return {
    "service.name": service.name ?? "leasehold",
    "service.instance.id": service.instanceId,
    "service.version": service.version,
  };
}

/**
 * Tracing that exports over OTLP/HTTP (JSON) to `endpoint`, e.g.
 * `http://127.0.0.1:4318/v1/traces`, in batches. The SDK is loaded only here,
 * so a server that does not trace never loads it.
 */
export async function otlpTracing(endpoint: string, log: Logger, service: TracingService): Promise<Tracing> {
  const [{ TracerProvider, BatchSpanProcessor }, { OTLPTraceExporter }, { resourceFromAttributes }] =
    await Promise.all([
      import("@opentelemetry/sdk-trace"),
      import("@opentelemetry/exporter-trace-otlp-http"),
      import("@opentelemetry/resources"),
    ]);
  // A failed export (collector down, wrong path) is said in our log, not dropped silently.
  diag.setLogger(
    {
      error: (message, ...args) => log.warn({ args }, `opentelemetry: ${message}`),
      warn: (message, ...args) => log.warn({ args }, `opentelemetry: ${message}`),
      info: () => {},
      debug: () => {},
      verbose: () => {},
    },
    DiagLogLevel.WARN,
  );
  const provider = new TracerProvider({
    resource: resourceFromAttributes(serviceAttributes(service)),
    spanProcessors: [
      new BatchSpanProcessor({
        exporter: new OTLPTraceExporter({ url: tracesUrl(endpoint), timeoutMillis: EXPORT_TIMEOUT_MS }),
      }),
    ],
  });
  const tracing = tracingWith(provider);
  return {
    ...tracing,
    // An unreachable collector does not hold the shutdown for longer than one export.
    close: () =>
      Promise.race([tracing.close(), new Promise<void>((r) => setTimeout(r, EXPORT_TIMEOUT_MS).unref())]),
  };
}

/** How long one export may take, and the shutdown's flush at most. */
const EXPORT_TIMEOUT_MS = 2000;

/**
 * The URL spans are posted to: the endpoint as given, or with the OTLP
 * traces path added when it has none (`http://collector:4318`, the form
 * OTEL_EXPORTER_OTLP_ENDPOINT takes).
 */
export function tracesUrl(endpoint: string): string {
  const url = new URL(endpoint);
  if (url.pathname === "/" || url.pathname === "") url.pathname = "/v1/traces";
  return url.toString();
}
