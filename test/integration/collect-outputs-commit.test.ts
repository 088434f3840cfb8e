import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Code } from "../../src/errors.js";
import { LeaseService } from "../../src/gen/leasehold/v1/lease_pb.js";
import { ResourceService } from "../../src/gen/leasehold/v1/resource_pb.js";
import { type Database, openDatabase } from "../../src/store/database.js";
import {
  freshPostgresDatabase,
  runsPostgresTests,
  type TestStore,
  untilSomeoneWaitsForALock,
} from "../helpers/database.js";
import { startTestServer, type TestServer } from "../helpers/server.js";
import { failure } from "../helpers/status.js";
import { connectWorker } from "../helpers/worker.js";

// A commit in progress while a collect starts: only PostgreSQL has a second connection to hold it.
describe.runIf(runsPostgresTests())("CollectOutputs beside a commit of its lease", () => {
  let store: TestStore;
  let t: TestServer;
  let other: Database;
  beforeAll(async () => {
    store = await freshPostgresDatabase();
    t = await startTestServer({ store, config: { gracePeriod: "4s", heartbeatInterval: "1s" } });
    other = await openDatabase({ url: store.url, dataDir: "" });
  });
  afterAll(async () => {
    await other?.close();
    await t?.[Symbol.asyncDispose]();
    await store?.drop();
  });

  it("never asks a committed lease's deployment to stop: it fails LEASE_CLOSED instead", async () => {
    const w = await connectWorker(t.address, { workerId: "committer", cluster: "commit-race", capacity: 1 });
    const leases = t.client(LeaseService);
    const leaseId = (await leases.createLease({ runtime: "commit-race" })).lease?.id ?? "";
    await t.client(ResourceService).createDeployment({
      leaseId,
      spec: { containers: [{ name: "c", command: { argv: ["true"] } }] },
    });
    const grant = await w.next("grant");
    let revoked = false;
    void w
      .next("revoke", (r) => r.actionId === grant.actionId)
      .then(() => {
        revoked = true;
      });

    // A commit holds the lease's row while the collect starts, and commits after the collect
    // either waits for it (the collect asks only an open lease's deployments) or has already
    // asked the worker to stop.
    let collecting: ReturnType<typeof failure> | undefined;
    await other.db.transaction(async (tx) => {
      await tx.execute(sql`select id from scope_leases where id = ${leaseId} for update`);
      collecting = failure(leases.collectOutputs({ leaseId, timeout: { seconds: 5n } }));
      await untilSomeoneWaitsForALock(other.db, () => revoked);
      await tx.execute(
        sql`update scope_leases set state = 'COMMITTED', close_reason = 'COMMITTED', closed_at = now()
            where id = ${leaseId}`,
      );
      await tx.execute(sql`update resources set ownership = 'WORKSPACE' where lease_id = ${leaseId}`);
    });
    const f = await (collecting as ReturnType<typeof failure>);
    expect(f.code).toBe(Code.FailedPrecondition);
    expect(f.reason).toBe("LEASE_CLOSED");
    // The deployment of the committed lease keeps running: its worker was never asked to stop.
    expect(revoked).toBe(false);
    w.drop();
  });
});
