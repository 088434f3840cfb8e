DROP INDEX "actions_request_id_key";--> statement-breakpoint
DROP INDEX "scope_leases_request_id_key";--> statement-breakpoint
CREATE UNIQUE INDEX "actions_created_by_request_id_key" ON "actions" USING btree ("created_by","request_id");--> statement-breakpoint
CREATE UNIQUE INDEX "scope_leases_created_by_request_id_key" ON "scope_leases" USING btree ("created_by","request_id");