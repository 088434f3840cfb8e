ALTER TABLE "resources" ADD COLUMN "request_id" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "requested_by" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "request_hash" text;--> statement-breakpoint
CREATE UNIQUE INDEX "resources_requested_by_request_id_key" ON "resources" USING btree ("requested_by","request_id");