ALTER TABLE "clusters" ADD COLUMN "partitioned_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "clusters" ADD COLUMN "expiries_resumed_at" timestamp with time zone;