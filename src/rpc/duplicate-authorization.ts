import type { IncomingHttpHeaders, ServerHttp2Stream } from "node:http2";
import type { Server as NetServer } from "node:net";

/**
 * Makes every `authorization` header a request sent reach grpc-js's
 * metadata, so that the authenticator can refuse a request that sent
 * several (BAD_AUTHORIZATION) rather than serve it as whoever the first
 * names.
 *
 * Node's HTTP/2 server keeps only the first of a header it takes to have one
 * value (`authorization` among them) in the headers object it hands on, and
 * grpc-js builds a call's metadata from that object: a request with the
 * headers `Bearer <bob's token>` and `Bearer junk` was served as bob. The
 * headers as received (`rawHeaders`, the fourth argument of the server's
 * `stream` event) still hold them all; this listener, placed before
 * grpc-js's, puts them all back in the shared headers object as a list,
 * which grpc-js adds to the metadata value by value.
 */
export function keepEveryAuthorizationHeader(servers: Iterable<NetServer>): void {
  for (const server of servers)
    server.prependListener(
      "stream",
      (_stream: ServerHttp2Stream, headers: IncomingHttpHeaders, _flags: number, raw?: string[]) => {
        if (raw === undefined) return;
        const values: string[] = [];
        for (let i = 0; i + 1 < raw.length; i += 2)
          if (raw[i] === "authorization") values.push(raw[i + 1] as string);
        if (values.length > 1) (headers as Record<string, unknown>).authorization = values;
      },
    );
}
