ALTER TABLE "sessions" ADD COLUMN IF NOT EXISTS "instance_id" text DEFAULT '' NOT NULL;--> statement-breakpoint
ALTER TABLE "workers" ADD COLUMN IF NOT EXISTS "drain_reason" text DEFAULT '' NOT NULL;