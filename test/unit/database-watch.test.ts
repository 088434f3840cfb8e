import { createConnection, createServer, type Server, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { type DatabaseCheck, watchDatabase } from "../../src/store/database-watch.js";

/** Keeps this thread busy for `ms`, as a saturated event loop or a long synchronous task does. */
function blockEventLoop(ms: number): void {
  const until = performance.now() + ms;
  while (performance.now() < until) {
    // busy
  }
}

const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * A stand-in database on loopback: `ping` writes a byte on one kept-open
 * connection and resolves when the byte comes back, so its answer arrives
 * as real socket I/O, read in the event loop's poll phase like PostgreSQL's.
 * `mode` says what the far end does: echo, swallow the byte, or refuse.
 */
async function fakeDatabase() {
  let mode: "echo" | "silent" = "echo";
  const sockets = new Set<Socket>();
  const server: Server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    // Pings swallowed while silent are answered, in order, once it echoes again (like queued queries).
    let owed = 0;
    socket.on("data", (data) => {
      owed += data.length;
      if (mode === "echo") {
        socket.write("x".repeat(owed));
        owed = 0;
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;
  let client: Socket | undefined;
  const waiting: (() => void)[] = [];
  const connect = () =>
    new Promise<Socket>((resolve, reject) => {
      const socket = createConnection(port, "127.0.0.1");
      socket.once("connect", () => resolve(socket));
      socket.once("error", reject);
      socket.on("data", (data) => {
        for (let i = 0; i < data.length; i++) waiting.shift()?.();
      });
      socket.on("close", () => {
        if (client === socket) client = undefined;
      });
    });
  const ping = async () => {
    client ??= await connect();
    const socket = client;
    await new Promise<void>((resolve, reject) => {
      waiting.push(resolve);
      socket.once("error", reject);
      socket.write("x");
    });
  };
  return {
    ping,
    set mode(m: "echo" | "silent") {
      mode = m;
    },
    /** Stops listening and drops every connection, as a stopped PostgreSQL does. */
    async stop() {
      for (const s of sockets) s.destroy();
      client?.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
    async close() {
      client?.destroy();
      for (const s of sockets) s.destroy();
      if (server.listening) await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** The watch's checks and state changes, with a way to await the next ones. */
function observe() {
  const checks: DatabaseCheck[] = [];
  const events: string[] = [];
  let wake: (() => void) | undefined;
  const notify = () => {
    wake?.();
    wake = undefined;
  };
  return {
    checks,
    events,
    lost: (cause: Error) => {
      events.push(`lost: ${cause.message}`);
      notify();
    },
    back: () => {
      events.push("back");
      notify();
    },
    checked: (check: DatabaseCheck) => {
      checks.push(check);
      notify();
    },
    /** Resolves once `done()` holds, re-checked after every check or state change. */
    async until(done: () => boolean): Promise<void> {
      while (!done()) await new Promise<void>((resolve) => (wake = resolve));
    },
  };
}

const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const fn of cleanup.splice(0).reverse()) await fn();
});

describe("the database watch", () => {
  it("does not blame the database for its own event loop being blocked longer than the timeout", async () => {
    const db = await fakeDatabase();
    cleanup.push(() => db.close());
    const seen = observe();
    const watch = watchDatabase(db.ping, { everyMs: 200, ...seen });
    cleanup.push(() => watch.stop());
    await seen.until(() => seen.checks.length >= 1);
    // Each block is 7 timeouts long and lands in the middle of a check; the
    // poll phase between blocks reads the answer.
    for (let i = 0; i < 4; i++) {
      blockEventLoop(1500);
      await turn();
    }
    const after = seen.checks.length;
    await seen.until(() => seen.checks.length >= after + 3);
    expect(seen.checks.filter((c) => !c.ok)).toEqual([]);
    expect(seen.events).toEqual([]);
  });

  it("reports a database that answers nothing, and its return", async () => {
    const db = await fakeDatabase();
    cleanup.push(() => db.close());
    const seen = observe();
    const watch = watchDatabase(db.ping, { everyMs: 100, ...seen });
    cleanup.push(() => watch.stop());
    await seen.until(() => seen.checks.length >= 1);
    db.mode = "silent";
    await seen.until(() => seen.events.length >= 1);
    expect(seen.events[0]).toMatch(/^lost: no answer within 100ms/);
    expect(seen.checks.at(-1)).toMatchObject({ ok: false, kind: "timeout" });
    db.mode = "echo";
    await seen.until(() => seen.events.length >= 2);
    expect(seen.events[1]).toBe("back");
  });

  it("reports a refused connection after one immediate retry", async () => {
    const db = await fakeDatabase();
    cleanup.push(() => db.close());
    const seen = observe();
    const watch = watchDatabase(db.ping, { everyMs: 100, ...seen });
    cleanup.push(() => watch.stop());
    await seen.until(() => seen.checks.length >= 1);
    await db.stop();
    await seen.until(() => seen.events.length >= 1);
    expect(seen.events[0]).toMatch(/^lost: /);
    const failed = seen.checks.filter((c) => !c.ok);
    // The first error was confirmed at once by the next check, not after another interval.
    expect(failed.slice(0, 2).map((c) => !c.ok && c.kind)).toEqual(["error", "error"]);
  });
});
