import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { pushUncompressedAtOnce } from "../../src/rpc/message-push.js";

// A bidi method whose messages are plain text: the server answers each with
// "echo <n> <text>", n counting from 1, so order and loss both show.
const definition: grpc.ServiceDefinition = {
  chat: {
    path: "/test.Echo/Chat",
    requestStream: true,
    responseStream: true,
    requestSerialize: (s: string) => Buffer.from(s),
    requestDeserialize: (b: Buffer) => {
      const s = b.toString();
      if (s === "boom") throw new Error("not a message");
      return s;
    },
    responseSerialize: (s: string) => Buffer.from(s),
    responseDeserialize: (b: Buffer) => b.toString(),
  },
};

describe("pushUncompressedAtOnce", () => {
  let server: grpc.Server;
  let address: string;

  beforeAll(async () => {
    expect(pushUncompressedAtOnce()).toBe(true);
    expect(pushUncompressedAtOnce()).toBe(true);
    server = new grpc.Server();
    server.addService(definition, {
      chat: (call: grpc.ServerDuplexStream<string, string>) => {
        let n = 0;
        call.on("data", (s: string) => call.write(`echo ${++n} ${s}`));
        call.on("end", () => call.end());
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, p) =>
        error ? reject(error) : resolve(p),
      ),
    );
    address = `127.0.0.1:${port}`;
  });
  afterAll(() => server.forceShutdown());

  /** Sends `messages` in one burst (each with its write flags), half-closes, and collects the answers. */
  async function chat(
    messages: readonly { text: string; flags?: number }[],
    options: grpc.ChannelOptions = {},
  ): Promise<{ answers: string[]; error?: grpc.ServiceError }> {
    const Client = grpc.makeGenericClientConstructor(definition, "Echo");
    const client = new Client(address, grpc.credentials.createInsecure(), options);
    const call = (client as unknown as { chat(): grpc.ClientDuplexStream<string, string> }).chat();
    const answers: string[] = [];
    call.on("data", (s: string) => answers.push(s));
    const ended = new Promise<grpc.ServiceError | undefined>((resolve) => {
      call.on("error", (error: grpc.ServiceError) => resolve(error));
      call.on("status", (status: grpc.StatusObject) => {
        if (status.code === grpc.status.OK) resolve(undefined);
      });
    });
    for (const m of messages) {
      if (m.flags === undefined) call.write(m.text);
      else call.write(m.text, m.flags as unknown as BufferEncoding);
    }
    call.end();
    const error = await ended;
    client.close();
    return error ? { answers, error } : { answers };
  }

  const texts = Array.from({ length: 300 }, (_, i) => `m${i}`);
  const expected = texts.map((t, i) => `echo ${i + 1} ${t}`);

  it("hands uncompressed messages on in order, none lost", async () => {
    const { answers, error } = await chat(texts.map((text) => ({ text })));
    expect(error).toBeUndefined();
    expect(answers).toEqual(expected);
  });

  it("keeps the order when compressed and uncompressed messages alternate on one stream", async () => {
    // gzip on the channel; flag 2 (NoCompress) sends every third message as it is.
    const { answers, error } = await chat(
      texts.map((text, i) => (i % 3 === 0 ? { text, flags: 2 } : { text })),
      { "grpc.default_compression_algorithm": 2 },
    );
    expect(error).toBeUndefined();
    expect(answers).toEqual(expected);
  });

  it("still answers a message its deserializer refuses with INTERNAL", async () => {
    const { error } = await chat([{ text: "m0" }, { text: "boom" }, { text: "m2" }]);
    expect(error?.code).toBe(grpc.status.INTERNAL);
  });
});
