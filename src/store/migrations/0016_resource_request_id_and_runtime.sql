-- Resources remember the cluster they belong to (the runtime of the lease they were made in, or a
-- deployment's own): a commit's kept resources stay in it after the lease's record is deleted.
-- Create requests take a request_id, unique per principal.
ALTER TABLE "resources" ADD COLUMN "runtime" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_id" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "requested_by" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_hash" text;--> statement-breakpoint
CREATE UNIQUE INDEX "resources_requested_by_request_id_key" ON "resources" USING btree ("requested_by","request_id");--> statement-breakpoint
update resources r set runtime = l.runtime from scope_leases l where l.id = r.lease_id;--> statement-breakpoint
-- Deployments whose lease record is gone, or made without a lease: their action's cluster.
update resources r set runtime = a.cluster from actions a where a.id = r.action_id and r.runtime is null;
