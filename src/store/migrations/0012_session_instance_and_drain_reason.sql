ALTER TABLE "sessions" ADD COLUMN "instance_id" text DEFAULT '' NOT NULL;--> statement-breakpoint
ALTER TABLE "workers" ADD COLUMN "drain_reason" text DEFAULT '' NOT NULL;