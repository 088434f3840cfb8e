-- --history-retention: how far the event log has been removed (one row), and the indexes that let
-- a removal find a scope lease's events and the action of a deployment.
CREATE TABLE "history" (
	"singleton" boolean PRIMARY KEY DEFAULT true NOT NULL,
	"events_removed_through" bigint DEFAULT 0 NOT NULL
);
--> statement-breakpoint
INSERT INTO "history" DEFAULT VALUES;--> statement-breakpoint
CREATE INDEX "events_lease_idx" ON "events" USING btree ("lease_id","sequence") WHERE "events"."lease_id" is not null;--> statement-breakpoint
CREATE INDEX "resources_action_idx" ON "resources" USING btree ("action_id") WHERE "resources"."action_id" is not null;
