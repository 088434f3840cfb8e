import { PgDialect } from "drizzle-orm/pg-core";
import type { Db } from "../../src/store/database.js";

/**
 * A database whose every statement goes through `around` (given its text), to fail, slow or
 * observe some; so do the statements of its transactions. For `ServerOverrides.wrapDb`.
 */
export function intercepting(around: (text: string, execute: () => Promise<unknown>) => Promise<unknown>) {
  const dialect = new PgDialect();
  const wrap = (db: Db): Db =>
    new Proxy(db, {
      get(target, property, receiver) {
        if (property === "transaction")
          return (fn: (tx: Db) => Promise<unknown>, ...rest: unknown[]) =>
            (target.transaction as (...args: unknown[]) => Promise<unknown>)(
              (tx: Db) => fn(wrap(tx)),
              ...rest,
            );
        if (property !== "execute") return Reflect.get(target, property, receiver);
        return (query: Parameters<typeof target.execute>[0]) =>
          around(typeof query === "string" ? query : dialect.sqlToQuery(query.getSQL()).sql, () =>
            target.execute(query),
          );
      },
    });
  return wrap;
}
