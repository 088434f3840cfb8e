-- Resources remember the cluster they belong to (the runtime of the lease they were made in, or a
-- deployment's own) and their lease's creator: a commit's kept resources stay in that cluster, and
-- within reach of that creator's lease.use.own, after the lease's record is deleted.
-- Create requests take a request_id, unique per principal.
ALTER TABLE "resources" ADD COLUMN "runtime" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "lease_owner" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_id" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "requested_by" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_hash" text;--> statement-breakpoint
CREATE UNIQUE INDEX "resources_requested_by_request_id_key" ON "resources" USING btree ("requested_by","request_id");--> statement-breakpoint
update resources r set runtime = l.runtime, lease_owner = l.created_by from scope_leases l where l.id = r.lease_id;--> statement-breakpoint
-- Deployments whose lease record is gone, or made without a lease: their action's cluster.
update resources r set runtime = a.cluster from actions a where a.id = r.action_id and r.runtime is null;
