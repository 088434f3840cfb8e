import { sql } from "drizzle-orm";
import { beforeAll } from "vitest";
import type { Db } from "../../src/store/database.js";
import { useFreshDatabase } from "./database.js";

/**
 * A fresh database with cluster `east`, for tests of the session statements:
 * `db` once the suite's setup ran, and `session` to add a live session `id`
 * (ended, if `ended`) of its own worker `w-<id>`, attached to stream `t-<id>`
 * of server `this-server`, its deadline `deadlineSecs` from now.
 */
export function useSessionsDatabase(): {
  readonly db: Db;
  session(id: string, deadlineSecs: number, ended?: boolean): Promise<void>;
} {
  const database = useFreshDatabase();
  beforeAll(async () => {
    await database.current.db.execute(sql`insert into clusters (name) values ('east')`);
  });
  return {
    get db() {
      return database.current.db;
    },
    async session(id, deadlineSecs, ended = false) {
      const db = database.current.db;
      await db.execute(
        sql`insert into workers (worker_id, cluster, capacity) values (${`w-${id}`}, 'east', 1)`,
      );
      await db.execute(sql`
        insert into sessions (id, worker_id, server_id, stream_token, deadline, ended_at, principal)
        values (${id}, ${`w-${id}`}, 'this-server', ${`t-${id}`}, now() + make_interval(secs => ${deadlineSecs}),
                ${ended ? sql`now()` : null}, 'anonymous')`);
    },
  };
}
