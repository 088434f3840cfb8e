import { mkdtempSync, rmSync } from "node:fs";
import http2 from "node:http2";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Duplex } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addStaticToken } from "../../src/auth/static-tokens.js";
import { ListActionsRequestSchema } from "../../src/gen/leasehold/v1/action_pb.js";
import { runsDriverNeutralTests } from "../helpers/database.js";
import { grpcFrame, hpackLiteral as literal, rawCall } from "../helpers/raw-grpc.js";
import { startTestServer, type TestServer } from "../helpers/server.js";

const PREFACE_BYTES = 24;
const HEADERS = 1;
const END_HEADERS = 4;
const PADDED_OR_PRIORITY = 0x08 | 0x20;

/**
 * A connection to `address` that adds the header `name: value` at the end of
 * every HEADERS frame the client sends. Node's HTTP/2 client sends one value
 * of `authorization` at most; a field literal without indexing leaves the
 * HPACK table as it was, so it can follow the client's own fields.
 */
function addingHeader(address: string, name: string, value: string): Duplex {
  const [host, port] = address.split(":") as [string, string];
  const socket = net.connect({ host, port: Number(port) });
  let pending = Buffer.alloc(0);
  let prefaceLeft = PREFACE_BYTES;
  const connection = new Duplex({
    read() {},
    write(chunk: Buffer, _encoding, done) {
      pending = Buffer.concat([pending, chunk]);
      const out: Buffer[] = [];
      const preface = Math.min(prefaceLeft, pending.length);
      out.push(pending.subarray(0, preface));
      pending = pending.subarray(preface);
      prefaceLeft -= preface;
      while (prefaceLeft === 0 && pending.length >= 9) {
        const length = pending.readUIntBE(0, 3);
        if (pending.length < 9 + length) break;
        let frame = pending.subarray(0, 9 + length);
        pending = pending.subarray(9 + length);
        const flags = frame[4] as number;
        if (frame[3] === HEADERS && flags & END_HEADERS && !(flags & PADDED_OR_PRIORITY)) {
          const payload = Buffer.concat([frame.subarray(9), literal(name, value)]);
          const head = Buffer.from(frame.subarray(0, 9));
          head.writeUIntBE(payload.length, 0, 3);
          frame = Buffer.concat([head, payload]);
        }
        out.push(frame);
      }
      socket.write(Buffer.concat(out), done);
    },
    final(done) {
      socket.end();
      done();
    },
    destroy(error, done) {
      socket.destroy();
      done(error);
    },
  });
  socket.on("data", (chunk: Buffer) => connection.push(chunk));
  socket.on("end", () => connection.push(null));
  socket.on("error", (error) => connection.destroy(error));
  return connection;
}

describe.runIf(runsDriverNeutralTests())("a call with several authorization headers", () => {
  let dir: string;
  let t: TestServer;
  let token: string;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "leasehold-two-authorizations-"));
    const tokens = join(dir, "tokens.yaml");
    token = addStaticToken(tokens, {
      principal: "bob",
      bindings: [{ role: "reader", clusters: ["*"], workerIds: "*" }],
    });
    t = await startTestServer({ config: { authTokens: tokens } });
  }, 60_000);
  afterAll(async () => {
    await t?.[Symbol.asyncDispose]();
    rmSync(dir, { recursive: true, force: true });
  });

  /** ListActions with `Bearer <first>`, and then `authorization: <second>` when given. */
  async function listActions(first: string, second?: string) {
    const session = http2.connect(
      `http://${t.address}`,
      second === undefined
        ? {}
        : { createConnection: () => addingHeader(t.address, "authorization", second) },
    );
    session.on("error", () => {});
    try {
      const call = rawCall(
        session,
        "/leasehold.v1.ActionService/ListActions",
        grpcFrame(ListActionsRequestSchema, {}),
        { authorization: `Bearer ${first}` },
      );
      return await call.status;
    } finally {
      session.close();
    }
  }

  it("is refused UNAUTHENTICATED, whichever comes first, not served as the first names", async () => {
    expect(await listActions(token)).toEqual({ code: "0", message: "OK" });
    for (const [first, second] of [
      [token, "Bearer junk"],
      ["junk", `Bearer ${token}`],
      [token, `Bearer ${token}`],
    ] as const)
      expect(await listActions(first, second)).toEqual({
        code: "16",
        message: "send one authorization header, not several",
      });
  });
});
