ALTER TABLE "actions" ADD COLUMN "phase_details" jsonb;--> statement-breakpoint
ALTER TABLE "actions" ADD COLUMN "stop_reason" text;--> statement-breakpoint
ALTER TABLE "resources" ADD COLUMN "action_id" text;