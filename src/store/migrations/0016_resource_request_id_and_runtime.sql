-- Resources remember the cluster they belong to (the runtime of the lease they were made in, or a
-- deployment's own) and their lease's creator: a commit's kept resources stay in that cluster, and
-- within reach of that creator's lease.use.own, after the lease's record is deleted.
-- Create requests take a request_id, unique per principal.
-- This file was edited after builds had applied it (see README.md here), and drizzle runs it again
-- on their databases, whose newest applied migration is older than this one's journal entry: those
-- of 6f98e02 to e81a932 (`0016_resource_request_id`: the request columns and their index) and of
-- 270bad0 to 49b310f (the first text of this one: no lease_owner). On such a database the request
-- columns are moved behind runtime and lease_owner (copied, the old ones dropped with their index),
-- so that it ends with the columns of a fresh database in the same order; every statement after
-- this block holds over either.
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'resources' AND column_name = 'request_id') THEN
    ALTER TABLE "resources" RENAME COLUMN "request_id" TO "request_id_before_0016";
    ALTER TABLE "resources" RENAME COLUMN "requested_by" TO "requested_by_before_0016";
    ALTER TABLE "resources" RENAME COLUMN "request_hash" TO "request_hash_before_0016";
  END IF;
END
$$;
--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN IF NOT EXISTS "runtime" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN IF NOT EXISTS "lease_owner" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_id" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "requested_by" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_hash" text;--> statement-breakpoint
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'resources'
               AND column_name = 'request_id_before_0016') THEN
    UPDATE "resources" SET "request_id" = "request_id_before_0016", "requested_by" = "requested_by_before_0016",
      "request_hash" = "request_hash_before_0016";
    -- Their unique index goes with them.
    ALTER TABLE "resources" DROP COLUMN "request_id_before_0016", DROP COLUMN "requested_by_before_0016",
      DROP COLUMN "request_hash_before_0016";
  END IF;
END
$$;
--> statement-breakpoint
CREATE UNIQUE INDEX "resources_requested_by_request_id_key" ON "resources" USING btree ("requested_by","request_id");--> statement-breakpoint
update resources r set runtime = l.runtime, lease_owner = l.created_by from scope_leases l
  where l.id = r.lease_id and (r.runtime is null or r.lease_owner is null);--> statement-breakpoint
-- Deployments whose lease record is gone, or made without a lease: their action's cluster.
update resources r set runtime = a.cluster from actions a where a.id = r.action_id and r.runtime is null;
